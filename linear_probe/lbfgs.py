"""``probe-all --head-solver lbfgs``: the logistic regression of :mod:`supcon.logistic` as a probe head."""

from __future__ import annotations

import torch

from linear_probe.probe import HeadResult
from supcon.logistic import fit_logistic_regression


def train_lbfgs_head(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                     val_labels: torch.Tensor, num_classes: int) -> HeadResult:
    """``probe-all --head-solver lbfgs``: :func:`supcon.logistic.fit_logistic_regression` as a probe head result.

    The head is one fit, so its "head epoch" is 1; the per-epoch curves hold one value per C of
    :data:`supcon.logistic.C_GRID`, and ``regularization_c`` the chosen C. The weights are an ``nn.Linear``
    state dict, loaded by check-accuracies like an SGD head's.
    """
    fit = fit_logistic_regression(train_features, train_labels, val_features, val_labels, num_classes)
    weights = {"weight": fit.weight, "bias": fit.bias}
    return HeadResult(fit.val_accuracy, 1, fit.val_loss, weights,
                      val_accuracy_per_epoch=fit.val_accuracy_per_c, val_loss_per_epoch=fit.val_loss_per_c,
                      train_loss_per_epoch=fit.train_loss_per_c, regularization_c=fit.c,
                      final_state_dict=weights)  # one fit: its best head is its final head
