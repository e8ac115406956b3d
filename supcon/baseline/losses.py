"""The classification loss (cross-entropy, or one logit with BCE), auxiliary losses, probabilities."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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
    """

    def __init__(self, kind: str = "ce", aux_weight: float = 0.3):
        self.kind = kind
        self.aux_weight = aux_weight

    def single(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss of one set of logits (no auxiliary terms)."""
        logits = logits.float()
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction=reduction)
        return F.cross_entropy(logits, labels, reduction=reduction)

    def __call__(self, outputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        loss = self.single(outputs["logits"], labels)
        for aux_logits in outputs.get("aux_logits") or []:
            loss = loss + self.aux_weight * self.single(aux_logits, labels)
        return loss
