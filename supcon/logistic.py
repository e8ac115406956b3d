"""Logistic regression by L-BFGS on frozen features, its regularisation chosen on validation.

The linear-evaluation protocol of SimCLR (Chen et al. 2020, appendix B) and CLIP (Radford et al.
2021, appendix A): an L2-regularised multinomial logistic regression fit to convergence by L-BFGS
(scikit-learn) on features of the un-augmented images, with the regularisation strength chosen on
a validation set. CLIP sweeps C over 1e-6..1e6; we sweep :data:`C_GRID`, half-decade steps over
1e-4..1e4, which covers the optimum of standardised features.

The features are standardised with the training set's per-dimension mean and std before the fit
(it makes one C grid fit any backbone and helps L-BFGS converge); the scaling is folded into the
returned weights, so the result is a plain linear layer on the raw features, the same kind of head
``probe-all``'s SGD protocol gives and ``check-accuracies`` loads.

Used by ``probe-all --head-solver lbfgs`` (``linear_probe.lbfgs``) and the classical
``baseline-train --model logreg`` (``supcon.baseline.classical_models``).

Choice on validation: the highest val accuracy; on a tie the lower val cross-entropy; then the
smaller C (the stronger regularisation). Each C's fit starts from the previous (smaller) C's
solution (``warm_start``), which is what makes a sweep take seconds.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

#: Inverse L2 strengths tried, strongest regularisation first (10^-4 .. 10^4 in half-decade steps).
C_GRID: tuple[float, ...] = tuple(float(f"{10 ** (k / 2):.6g}") for k in range(-8, 9))
#: L-BFGS iterations per C (CLIP's 1,000).
MAX_ITER = 1000
#: A feature dimension whose training std is below this is left unscaled (constant pixels, dead units).
MIN_STD = 1e-6


@dataclass
class LogisticFit:
    """A fitted logistic regression as a linear layer on the raw features, and how C was chosen."""

    weight: torch.Tensor  # [num_classes, dim], float32
    bias: torch.Tensor  # [num_classes]
    c: float
    val_accuracy: float
    val_loss: float
    val_accuracy_per_c: list[float] = field(default_factory=list)
    val_loss_per_c: list[float] = field(default_factory=list)
    train_loss_per_c: list[float] = field(default_factory=list)
    c_grid: list[float] = field(default_factory=list)
    seconds: float = 0.0
    val_predictions: torch.Tensor | None = None  # [num_val] class indices of the chosen C's head


def standardizer(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of ``features`` (std 1 where a dimension is constant)."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    return mean, np.where(std < MIN_STD, 1.0, std)


def linear_scores(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``features @ weight.T + bias``: the logits of the fitted head."""
    return features @ weight.T.to(features.dtype) + bias.to(features.dtype)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, labels).item())


def fit_logistic_regression(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                            val_labels: torch.Tensor, num_classes: int,
                            c_grid: tuple[float, ...] | list[float] = C_GRID,
                            max_iter: int = MAX_ITER) -> LogisticFit:
    """Fit one logistic regression per C on the training features; keep the best by val accuracy.

    Args:
        train_features: ``[N, D]`` training features (any float dtype, CPU or GPU).
        train_labels: ``[N]`` class indices in ``[0, num_classes)``.
        val_features: ``[M, D]`` validation features.
        val_labels: ``[M]``.
        num_classes: outputs of the head (a class with no training image gets a constant low logit).
        c_grid: inverse regularisation strengths, tried in this order (ties go to the earlier one).
        max_iter: L-BFGS iterations per C.

    Returns:
        The chosen C's weights as a linear layer on the raw features, its val accuracy and
        cross-entropy, and the per-C curves.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    x_train = train_features.detach().cpu().double().numpy()
    y_train = train_labels.detach().cpu().numpy()
    x_val = val_features.detach().cpu().double()
    y_val = val_labels.detach().cpu().long()
    mean, std = standardizer(x_train)
    scaled = (x_train - mean) / std
    present = np.unique(y_train)
    model = LogisticRegression(C=float(c_grid[0]), max_iter=max_iter, warm_start=True)
    best: tuple | None = None
    fit = LogisticFit(torch.empty(0), torch.empty(0), 0.0, -1.0, float("inf"), c_grid=[float(c) for c in c_grid])
    for c in c_grid:
        model.set_params(C=float(c))
        with warnings.catch_warnings():
            # a weakly regularised fit of separable features may stop at max_iter; its val score still counts
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(scaled, y_train)
        weight, bias = _fold(model.coef_, model.intercept_, present, num_classes, mean, std)
        val_logits = linear_scores(x_val, weight, bias)
        # float32 mean, as the SGD head's evaluate_head computes it: the same count of correct images must
        # give the same number, or check-accuracies' choice between the two kinds of head would hinge on rounding
        val_accuracy = float((val_logits.argmax(1) == y_val).float().mean().item())
        val_loss = _cross_entropy(val_logits, y_val)
        train_logits = linear_scores(torch.from_numpy(x_train), weight, bias)
        fit.val_accuracy_per_c.append(val_accuracy)
        fit.val_loss_per_c.append(val_loss)
        fit.train_loss_per_c.append(_cross_entropy(train_logits, torch.from_numpy(y_train).long()))
        if best is None or (val_accuracy, -val_loss) > best[:2]:
            best = (val_accuracy, -val_loss, c, weight, bias, val_logits.argmax(1))
    fit.val_accuracy, fit.val_loss, fit.c = best[0], -best[1], float(best[2])
    fit.weight, fit.bias, fit.val_predictions = best[3].float(), best[4].float(), best[5]
    fit.seconds = time.perf_counter() - start
    return fit


def _fold(coef: np.ndarray, intercept: np.ndarray, present: np.ndarray, num_classes: int, mean: np.ndarray,
          std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's coefficients on standardised features -> ``[num_classes, D]`` weights on raw ones.

    Two classes: scikit-learn keeps one row ``w`` (the second class's log-odds); ``[-w/2, +w/2]``
    gives the same softmax probabilities. Classes absent from the training set get weight 0 and a
    bias far below the others (never predicted).
    """
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64)
    if coef.shape[0] == 1 and len(present) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, intercept.min() - 1e4 if len(intercept) else 0.0)
    weight[present] = coef / std
    bias[present] = intercept - (coef / std) @ mean
    return torch.from_numpy(weight), torch.from_numpy(bias)

