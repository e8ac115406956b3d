"""One SupCon epoch: ``train_one_epoch``, the two-view step over a loader, resumable part way.

The caller owns the epoch loop, saving and logging (:class:`supcon.trainer.SupConTrainer` on
:class:`supcon.engine.RunEngine`); the optimisation step itself is :func:`supcon.gradcache.contrastive_step`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from supcon.errors import UserError
from supcon.gradcache import contrastive_step
from supcon.health import embedding_spread
from supcon.losses import SupConLoss
from supcon.memory import ProjectionMemory
from supcon.schedule import LRSchedule


@dataclass
class EpochState:
    """Progress through one epoch, saved in a mid-epoch checkpoint so it resumes exactly."""

    steps_done: int = 0
    loss_sum: float = 0.0
    spread_sum: float = 0.0
    seconds: float = 0.0


class _StepWindow:
    """Per-step loss and spread in a small device buffer; one host transfer every ``size`` steps.

    Each step writes one row (two device copies, no host sync); :meth:`flush` brings back the sums and
    the first non-finite loss in one ``tolist``. A per-step check would stall the GPU's queue every step.
    """

    def __init__(self, size: int, device: torch.device, loss_sum: float, spread_sum: float):
        self.rows = torch.zeros(max(size, 1), 2, device=device)
        self.pending = 0
        self.loss_sum, self.spread_sum = loss_sum, spread_sum

    @property
    def full(self) -> bool:
        return self.pending == self.rows.shape[0]

    def add(self, loss: torch.Tensor, spread: torch.Tensor) -> None:
        self.rows[self.pending, 0] = loss
        self.rows[self.pending, 1] = spread
        self.pending += 1

    def flush(self, last_step_in_epoch: int, epoch: int, steps_per_epoch: int) -> None:
        """Add the pending rows to the sums.

        Raises:
            UserError: one of their losses is not finite (names the epoch and step).
        """
        # One transfer; the sums are taken on the host in step order, so where a window starts (a resume
        # mid-epoch moves it) cannot change the epoch's mean loss in its last bits.
        rows = self.rows[:self.pending].tolist()
        for offset, (loss, spread) in enumerate(rows):
            if not math.isfinite(loss):
                bad_step = last_step_in_epoch - self.pending + 1 + offset
                raise UserError(
                    f"loss became non-finite at epoch {epoch + 1}, step {bad_step + 1} of {steps_per_epoch} "
                    f"(global step {epoch * steps_per_epoch + bad_step}); the last good checkpoint is kept. "
                    "Try a lower --learning-rate or --precision fp32"
                )
            self.loss_sum += loss
            self.spread_sum += spread
        self.pending = 0


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: SupConLoss,
    loader,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    accelerator: Accelerator,
    epoch: int,
    *,
    supervised: bool = True,
    state: EpochState | None = None,
    augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    channels_last: bool = False,
    should_stop: Callable[[int], bool] = lambda step: False,
    log_every: int = 10,
    progress=None,
    chunk_size: int | None = None,
    memory: ProjectionMemory | None = None,
    memory_warmup: int = 0,
) -> EpochState:
    """Train for one epoch (0-based ``epoch``) from ``state.steps_done``; returns the updated state.

    Args:
        augment: for the GPU data path, turns a device batch of images into ``[B, n_views, C, H, W]``
            views; ``None`` when the loader already yields views.
        should_stop: called after each step with the step index within the epoch; True stops early
            (``state.steps_done`` then tells where to resume).
        progress: an optional tqdm bar, advanced per step.
        chunk_size: images per forward pass (gradient caching, :mod:`supcon.gradcache`); None: the whole batch.
        memory: a cross-batch memory of earlier projections; it is contrasted against from epoch
            ``memory_warmup`` (0-based) on, and filled from the start.

    Raises:
        UserError: the loss became NaN or infinite (names the epoch and step).
    """
    state = state or EpochState()
    model.train()
    device = accelerator.device
    steps_per_epoch = schedule.steps_per_epoch
    window = _StepWindow(log_every, device, state.loss_sum, state.spread_sum)
    start_time = time.perf_counter()
    steps = 0
    step_in_epoch = state.steps_done - 1
    for step_in_epoch, (images, labels) in enumerate(loader, start=state.steps_done):
        global_step = epoch * steps_per_epoch + step_in_epoch
        lr = schedule.lr_at(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        views = augment(images, global_step) if augment is not None else images
        loss, first_view = contrastive_step(model, loss_fn, optimizer, accelerator, views, labels,
                                            channels_last=channels_last, supervised=supervised,
                                            chunk_size=chunk_size, memory=memory, use_memory=epoch >= memory_warmup)
        window.add(loss, embedding_spread(first_view))
        steps += 1
        last_of_epoch = step_in_epoch + 1 == steps_per_epoch
        stopping = should_stop(step_in_epoch) and not last_of_epoch
        # Also check before stopping early: the caller saves the state we stop in.
        if window.full or last_of_epoch or stopping:
            window.flush(step_in_epoch, epoch, steps_per_epoch)
            if progress is not None:
                done = state.steps_done + steps
                elapsed = state.seconds + time.perf_counter() - start_time
                progress.set_postfix(
                    loss=f"{window.loss_sum / done:.4f}", lr=f"{lr:.3g}",
                    img_s=f"{done * views.shape[0] * accelerator.num_processes / max(elapsed, 1e-9):.0f}")
        if progress is not None:
            progress.update(1)
        if stopping:
            break
    if window.pending:  # the loader ended before the epoch's last step (e.g. a benchmark's few batches)
        window.flush(step_in_epoch, epoch, steps_per_epoch)
    return EpochState(steps_done=state.steps_done + steps, loss_sum=window.loss_sum, spread_sum=window.spread_sum,
                      seconds=state.seconds + time.perf_counter() - start_time)
