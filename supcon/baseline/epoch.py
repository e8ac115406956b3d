"""One baseline epoch: ``train_one_epoch``, the classifier step over a loader, and :class:`NonFiniteLoss`.

The caller owns the epoch loop, validation and saving (:class:`supcon.baseline.trainer.BaselineTrainer`
on :class:`supcon.engine.RunEngine`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from supcon.baseline.losses import ClassifierLoss, logits_to_probabilities
from supcon.errors import UserError


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite (the run's earlier checkpoints are kept)."""



def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: ClassifierLoss,
    loader,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    epoch: int,
    *,
    should_stop: Callable[[int], bool] = lambda step: False,
    progress=None,
) -> dict[str, float] | None:
    """Train one epoch (0-based ``epoch``); returns ``loss`` (incl. auxiliary terms), ``accuracy``,
    ``images`` and ``seconds`` over all processes, or None when ``should_stop(step)`` cut it short.

    Raises:
        UserError: the loss became NaN or infinite.
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with accelerator.autocast():
            outputs = model(images)
        loss = loss_fn(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        with torch.no_grad():
            predicted = logits_to_probabilities(outputs["logits"]).argmax(1)
            loss_sum += loss.detach().double() * labels.shape[0]
            correct += (predicted == labels).sum()
            seen += labels.shape[0]
        if progress is not None:
            progress.update(1)
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / seen.item():.4f}",
                                     acc=f"{correct.item() / seen.item():.3f}")
        if should_stop(step) and step + 1 < len(loader):  # a finished epoch is kept
            return None
    totals = torch.stack([loss_sum, correct.double(), seen.double()])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    loss_total, correct_total, seen_total = totals.tolist()
    loss_value = loss_total / max(seen_total, 1)
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"the training loss became non-finite in epoch {epoch + 1}; the last good checkpoint is "
                            "kept. Try a lower --learning-rate")
    return {"loss": loss_value, "accuracy": correct_total / max(seen_total, 1), "images": seen_total,
            "seconds": time.perf_counter() - start}

