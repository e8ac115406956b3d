"""Learning-rate rules: the linear scaling rule, the reference SupCon schedules and WSD, by explicit step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BASE_LR = 0.5
BASE_BATCH = 1024
AUTO_WARM_ABOVE_BATCH = 256
#: ``--schedule`` choices: the seeds' cosine, step decay at fixed epochs, and warm-up/stable/decay.
SCHEDULES = ("cosine", "step", "wsd")


def linear_scaled_lr(global_batch: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
    """Learning rate scaled linearly with the global batch: ``0.5 * global_batch / 1024``."""
    return base_lr * global_batch / base_batch


@dataclass
class LRSchedule:
    """The reference SupCon schedules and WSD, evaluated at an explicit optimisation step.

    Cosine: the learning rate is set once per epoch to
    ``eta_min + (lr - eta_min) * (1 + cos(pi * epoch / epochs)) / 2`` with ``epoch`` counted
    from 1 and ``eta_min = lr * decay_rate ** 3``. Step: ``lr * decay_rate ** k`` where ``k`` is
    the number of decay epochs already passed. Warm-up: over the first ``warm_epochs`` the rate
    rises linearly per step from ``warmup_from`` to the epoch-``warm_epochs`` value.

    WSD (``kind="wsd"``, warm-up / stable / decay): ``lr`` after the warm-up until the cool-down
    starts after epoch ``cooldown_start`` (0-based step ``cooldown_start * steps_per_epoch``), then a
    linear fall per step to ``eta_min`` at the end of epoch ``cooldown_start + cooldown_epochs``. With
    ``cooldown_start=None`` the rate stays constant: a run that can end at any time, whose cool-down is
    decided later (``supcon-train --until plateau``). ``cosine`` is ignored for WSD.
    """

    base_lr: float
    epochs: int
    steps_per_epoch: int
    cosine: bool = True
    decay_epochs: list[int] = field(default_factory=list)
    decay_rate: float = 0.1
    warm: bool = False
    warm_epochs: int = 10
    warmup_from: float = 0.01
    kind: str | None = None  # "cosine", "step" or "wsd"; None: by ``cosine``
    cooldown_start: int | None = None
    cooldown_epochs: int = 0

    @property
    def schedule(self) -> str:
        return self.kind or ("cosine" if self.cosine else "step")

    @staticmethod
    def cooldown_length(epochs_so_far: int, fraction: float) -> int:
        """Epochs of a cool-down over ``fraction`` of the epochs trained so far (at least one)."""
        return max(1, math.ceil(fraction * epochs_so_far - 1e-9))

    def with_cooldown(self, start: int, length: int) -> LRSchedule:
        """This WSD schedule with a cool-down of ``length`` epochs starting after epoch ``start``."""
        from dataclasses import replace

        return replace(self, cooldown_start=start, cooldown_epochs=length, epochs=start + length)

    @property
    def eta_min(self) -> float:
        return self.base_lr * self.decay_rate**3

    def epoch_lr(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch`` before warm-up is applied (WSD: at the epoch's first step)."""
        if self.schedule == "wsd":
            return self._wsd_lr((epoch - 1) * self.steps_per_epoch)
        if self.schedule == "cosine":
            eta_min = self.eta_min
            return eta_min + (self.base_lr - eta_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        passed = sum(epoch > e for e in self.decay_epochs)
        return self.base_lr * self.decay_rate**passed

    def _wsd_lr(self, step: int) -> float:
        if self.cooldown_start is None:
            return self.base_lr
        start = self.cooldown_start * self.steps_per_epoch
        if step < start:
            return self.base_lr
        length = max(1, self.cooldown_epochs * self.steps_per_epoch)
        progress = min(1.0, (step - start + 1) / length)  # the last step of the cool-down is at eta_min
        return self.base_lr + progress * (self.eta_min - self.base_lr)

    def lr_at(self, step: int) -> float:
        """Learning rate for the 0-based optimisation ``step``."""
        epoch = step // self.steps_per_epoch + 1
        if self.warm and epoch <= self.warm_epochs:
            warmup_to = self.epoch_lr(self.warm_epochs)
            progress = step / (self.warm_epochs * self.steps_per_epoch)
            return self.warmup_from + progress * (warmup_to - self.warmup_from)
        if self.schedule == "wsd":
            return self._wsd_lr(step)
        return self.epoch_lr(epoch)
