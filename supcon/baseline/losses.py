"""The classification loss (cross-entropy, or one logit with BCE), auxiliary losses, class weights, probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from supcon.errors import UserError


def class_weights_for(kind: str, labels: Sequence[int], class_names: Sequence[str]) -> list[float] | None:
    """The loss weight of each class under ``--class-weights kind``: None for ``none``; for ``balanced``,
    scikit-learn's ``compute_class_weight("balanced")``: ``n_images / (n_classes * n_images_of_the_class)``.

    Raises:
        UserError: ``balanced`` and a class without training images (its weight would be infinite).
    """
    if kind == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts.tolist()) if count == 0]
    if empty:
        raise UserError(f"--class-weights {kind}: class {empty[0]!r} has no training images left")
    weights = compute_class_weight(kind, classes=np.arange(len(class_names)), y=np.asarray(labels))
    return [float(w) for w in weights]


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[N, C]``: softmax, or for one logit ``[1 - sigmoid, sigmoid]`` (2 classes)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - positive, positive], dim=1)
    return torch.softmax(logits, dim=1)


class ClassifierLoss:
    """``loss(outputs, labels)``: the main loss plus ``aux_weight`` x each auxiliary classifier's loss.

    Args:
        kind: ``"ce"`` (cross-entropy over C logits) or ``"bce"`` (binary cross-entropy on a single
            logit; label 1, the second class, is the positive one).
        aux_weight: weight of each auxiliary loss (0.3 in GoogLeNet); auxiliary outputs are only
            present in training mode, so evaluation uses the main loss alone.
        class_weights: a weight per class for the training loss (:func:`class_weights_for`), or None. The
            mean is then weighted (divided by the summed weights of the batch's labels), as
            ``F.cross_entropy(weight=...)`` does; :meth:`single`, which validation calls, stays unweighted.
    """

    def __init__(self, kind: str = "ce", aux_weight: float = 0.3, class_weights: Sequence[float] | None = None):
        self.kind = kind
        self.aux_weight = aux_weight
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None

    def single(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
               weighted: bool = False) -> torch.Tensor:
        """The loss of one set of logits (no auxiliary terms); ``weighted``: with the class weights, if any."""
        logits = logits.float()
        weight = None
        if weighted and self.class_weights is not None:
            if self.class_weights.device != logits.device:  # moved once, not at every step
                self.class_weights = self.class_weights.to(logits.device)
            weight = self.class_weights
        if self.kind == "bce":
            if weight is None:
                return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction=reduction)
            per_image = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")
            weights = weight[labels]
            if reduction == "mean":
                return (per_image * weights).sum() / weights.sum()
            return (per_image * weights).sum() if reduction == "sum" else per_image * weights
        return F.cross_entropy(logits, labels, weight=weight, reduction=reduction)

    def __call__(self, outputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        loss = self.single(outputs["logits"], labels, weighted=True)
        for aux_logits in outputs.get("aux_logits") or []:
            loss = loss + self.aux_weight * self.single(aux_logits, labels, weighted=True)
        return loss
