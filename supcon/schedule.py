"""Learning-rate rules: the linear scaling rule and the reference SupCon schedules, by explicit step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BASE_LR = 0.5
BASE_BATCH = 1024
AUTO_WARM_ABOVE_BATCH = 256


def linear_scaled_lr(global_batch: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
    """Learning rate scaled linearly with the global batch: ``0.5 * global_batch / 1024``."""
    return base_lr * global_batch / base_batch


@dataclass
class LRSchedule:
    """The reference SupCon schedule, evaluated at an explicit optimisation step.

    Cosine: the learning rate is set once per epoch to
    ``eta_min + (lr - eta_min) * (1 + cos(pi * epoch / epochs)) / 2`` with ``epoch`` counted
    from 1 and ``eta_min = lr * decay_rate ** 3``. Step: ``lr * decay_rate ** k`` where ``k`` is
    the number of decay epochs already passed. Warm-up: over the first ``warm_epochs`` the rate
    rises linearly per step from ``warmup_from`` to the epoch-``warm_epochs`` value.
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

    @property
    def eta_min(self) -> float:
        return self.base_lr * self.decay_rate**3

    def epoch_lr(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch`` before warm-up is applied."""
        if self.cosine:
            eta_min = self.eta_min
            return eta_min + (self.base_lr - eta_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        passed = sum(epoch > e for e in self.decay_epochs)
        return self.base_lr * self.decay_rate**passed

    def lr_at(self, step: int) -> float:
        """Learning rate for the 0-based optimisation ``step``."""
        epoch = step // self.steps_per_epoch + 1
        if self.warm and epoch <= self.warm_epochs:
            warmup_to = self.epoch_lr(self.warm_epochs)
            progress = step / (self.warm_epochs * self.steps_per_epoch)
            return self.warmup_from + progress * (warmup_to - self.warmup_from)
        return self.epoch_lr(epoch)
