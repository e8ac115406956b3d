"""The live probe: how good the encoder is on the task, measured during training.

Every ``--probe-every`` epochs ``supcon-train`` fits the L-BFGS logistic regression of
:mod:`supcon.logistic` (C chosen on val, the SimCLR/CLIP linear evaluation) on the frozen features of
the training images (a seeded subset of ``--probe-max-images`` when there are more) and scores it
on the val folder: val accuracy with its 95% Wilson interval, and val cross-entropy. The features
are the kNN monitor's (one encoder pass serves both when they fall on the same epoch).

Which val images the head gets right is kept too (``val_correct``), so that two probes of the run
can be compared image by image (:mod:`supcon.stopping`).

The result goes to ``metrics.csv`` (``probe_accuracy``, ``probe_low``, ``probe_high``,
``probe_loss``, ``probe_num_val``, ``probe_seconds``: the fit, plus the encoder pass when the kNN
monitor did not need it anyway), TensorBoard (``monitor/probe_accuracy``), the epoch's log line and the checkpoint
saved at that epoch (``live_probe``), where ``probe-all`` finds it; ``--until plateau`` decides on it
(:mod:`supcon.stopping`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from supcon.logistic import fit_logistic_regression
from supcon.metrics import wilson_interval

#: The metrics.csv columns of the live probe (empty on epochs without one).
PROBE_FIELDS = ["probe_accuracy", "probe_low", "probe_high", "probe_loss", "probe_num_val", "probe_seconds"]


@dataclass
class LiveProbe:
    """One live probe: its val accuracy (with the 95% interval), val loss and what it was fit on."""

    epoch: int
    val_accuracy: float
    val_low: float
    val_high: float
    val_loss: float
    num_train: int
    num_val: int
    c: float
    seconds: float  # the fit (the trainer adds the encoder pass when it was made for the probe alone)
    val_correct: str = ""  # "1"/"0" per val image, in the val folder's order: probes compared image by image

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self) -> dict[str, float]:
        return {"probe_accuracy": round(self.val_accuracy, 6), "probe_low": round(self.val_low, 6),
                "probe_high": round(self.val_high, 6), "probe_loss": round(self.val_loss, 6),
                "probe_num_val": self.num_val, "probe_seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        return (f"probe {100 * self.val_accuracy:.1f}% [{100 * self.val_low:.1f}, {100 * self.val_high:.1f}] "
                f"loss {self.val_loss:.3f}")


def probe_subset(num_images: int, max_images: int, seed: int) -> np.ndarray | None:
    """Indices of the training images the live probe fits on (None: all of them); the same at every probe."""
    if num_images <= max_images:
        return None
    return np.sort(np.random.default_rng(seed).permutation(num_images)[:max_images])


def live_probe(epoch: int, train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
               val_labels: torch.Tensor, num_classes: int, max_images: int, seed: int) -> LiveProbe:
    """Fit the logistic regression on (a seeded subset of) the training features and score it on val."""
    start = time.perf_counter()
    subset = probe_subset(len(train_labels), max_images, seed)
    if subset is not None:
        index = torch.as_tensor(subset)
        train_features, train_labels = train_features[index], train_labels[index]
    fit = fit_logistic_regression(train_features.cpu(), train_labels.cpu(), val_features.cpu(), val_labels.cpu(),
                                  num_classes)
    num_val = len(val_labels)
    low, high = wilson_interval(round(fit.val_accuracy * num_val), num_val)
    correct = "".join("1" if hit else "0" for hit in (fit.val_predictions == val_labels.cpu().long()).tolist())
    return LiveProbe(epoch, float(fit.val_accuracy), float(low), float(high), float(fit.val_loss),
                     len(train_labels), num_val, float(fit.c), time.perf_counter() - start, correct)
