"""The classical classifiers of ``baseline-train --model svm|logreg|knn``: fit on feature tensors, chosen on val.

Hyper-parameters are chosen on the validation features from small fixed grids, the first (simplest)
setting winning a tie:

- ``svm``: RBF kernel, C in :data:`SVM_C_GRID` x gamma = factor / (D x Var(X)) for factor in
  :data:`SVM_GAMMA_FACTORS` (scikit-learn's ``"scale"`` gamma times 0.1..10); smaller C, then smaller
  gamma, first.
- ``logreg``: multinomial logistic regression by L-BFGS, C in ``supcon.logistic.C_GRID``
  (1e-4..1e4, half-decade steps) on standardised features, ties to the lower val cross-entropy, then
  smaller C (the SimCLR/CLIP linear evaluation, shared with ``probe-all --head-solver lbfgs``).
- ``knn``: k in :data:`KNN_K_GRID`, Euclidean distance, uniform votes; larger k first.

Each grid point is fit on the training features only, so the chosen one is the final model: nothing is
refit on validation images. A fitted model is a dict of tensors (so it is saved in a checkpoint that
loads with ``torch.load(weights_only=True)``; no scikit-learn object is pickled): the SVM's support
vectors, dual coefficients, intercepts, per-class support counts and gamma; the logistic regression's
weights and biases; the kNN's training features and labels; the scaler's mean/std.
:func:`classifier_probabilities` rebuilds the predictions from them (tested equal to scikit-learn's
own). The SVM gives no calibrated probabilities (scikit-learn's Platt scaling would need an inner
cross-validation): it gets a softmax of its one-vs-rest scores (scikit-learn's ``decision_function``),
whose arg-max is the SVM's prediction and whose order gives the ROC curve.

The features come from :mod:`supcon.baseline.classical_features`; the run directory from
:mod:`supcon.baseline.classical`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from supcon.errors import UserError
from supcon.logistic import fit_logistic_regression, linear_scores, standardizer

SVM_C_GRID = (0.1, 1.0, 10.0, 100.0)
#: Multiples of scikit-learn's ``gamma="scale"``, 1 / (features x variance of the training features).
SVM_GAMMA_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
#: Largest first: on a val tie the smoother classifier wins.
KNN_K_GRID = (21, 15, 11, 7, 5, 3, 1)
#: Rows of test/val features scored at once (bounds the kernel/distance matrices' memory).
CHUNK = 4096
NAMES = {"svm": "RBF SVM", "logreg": "logistic regression", "knn": "kNN"}


def svm_scores(features: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """scikit-learn's ``SVC.decision_function`` (one-vs-rest shape) from the stored tensors, ``[N, C]``.

    libsvm's one-vs-one layout: for classes ``i < j`` (pair ``p`` in that order), the decision is
    ``sum(dual_coef[j-1, SV of i] * K) + sum(dual_coef[i, SV of j] * K) + intercept[p]``; positive
    votes for ``i``. The votes plus the summed confidences squashed to (-1/3, 1/3) give the
    one-vs-rest scores (scikit-learn's ``_ovr_decision_function``). Two classes: scikit-learn stores
    the negated coefficients, and the score pair is ``[-d/2, d/2]`` of its decision ``d``.
    """
    support = params["support_vectors"].double()
    dual = params["dual_coef"].double()
    intercept = params["intercept"].double()
    counts = [int(c) for c in params["n_support"]]
    num_classes = len(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    squared = torch.cdist(features.double(), support).square()
    kernel = torch.exp(-float(params["gamma"]) * squared)
    if num_classes == 2:
        decision = kernel @ dual[0] + intercept[0]
        return torch.stack([-decision / 2, decision / 2], dim=1)
    votes = torch.zeros(features.shape[0], num_classes, dtype=torch.float64)
    confidence = torch.zeros_like(votes)
    pair = 0
    for i in range(num_classes):
        for j in range(i + 1, num_classes):
            rows_i, rows_j = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
            decision = kernel[:, rows_i] @ dual[j - 1, rows_i] + kernel[:, rows_j] @ dual[i, rows_j] + intercept[pair]
            votes[:, i] += (decision >= 0).double()
            votes[:, j] += (decision < 0).double()
            confidence[:, i] += decision
            confidence[:, j] -= decision
            pair += 1
    return votes + confidence / (3 * (confidence.abs() + 1))


def knn_probabilities(features: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Share of each class among the ``k`` nearest training features (Euclidean), ``[N, C]``."""
    bank = params["train_features"].double()
    labels = params["train_labels"].long()
    k = min(int(params["k"]), bank.shape[0])
    nearest = torch.cdist(features.double(), bank).topk(k, dim=1, largest=False).indices
    votes = torch.nn.functional.one_hot(labels[nearest], int(params["num_classes"])).double()
    return votes.mean(dim=1)


def classifier_probabilities(features: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Class probabilities ``[N, C]`` (an SVM: softmax of its scores) of raw features, in chunks."""
    outputs = []
    for start in range(0, features.shape[0], CHUNK):
        x = features[start:start + CHUNK].double()
        if params.get("scaler_mean") is not None:
            x = (x - params["scaler_mean"].double()) / params["scaler_std"].double()
        if params["model"] == "svm":
            outputs.append(torch.softmax(svm_scores(x, params), dim=1))
        elif params["model"] == "knn":
            outputs.append(knn_probabilities(x, params))
        else:
            outputs.append(torch.softmax(linear_scores(x, params["weight"].double(), params["bias"].double()), dim=1))
    return torch.cat(outputs)


def _accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities.argmax(1) == labels.long()).double().mean().item())


@dataclass
class Selection:
    """The chosen classifier (as tensors), its hyper-parameters, val accuracy, and every grid point's result."""

    params: dict[str, Any]
    hyperparameters: dict[str, float]
    val_accuracy: float
    grid: list[dict[str, Any]]


def fit_and_select(model: str, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                   val_y: torch.Tensor, num_classes: int, standardize: bool) -> Selection:
    """Fit every grid point of ``model`` on the training features; keep the best by val accuracy.

    Args:
        model: ``svm``, ``logreg`` or ``knn``.
        train_x, train_y: ``[N, D]`` features and ``[N]`` labels the classifier is fit on.
        val_x, val_y: the validation features and labels that choose the grid point.
        num_classes: classes of the task.
        standardize: scale each dimension by the training mean/std first (svm and knn; logreg always does).
    """
    if model == "logreg":
        fit = fit_logistic_regression(train_x, train_y, val_x, val_y, num_classes)
        grid = [{"C": c, "val_accuracy": round(a, 6), "val_loss": round(v, 6)}
                for c, a, v in zip(fit.c_grid, fit.val_accuracy_per_c, fit.val_loss_per_c)]
        params = {"model": "logreg", "num_classes": num_classes, "weight": fit.weight.double(),
                  "bias": fit.bias.double(), "scaler_mean": None, "scaler_std": None}
        return Selection(params, {"C": fit.c}, fit.val_accuracy, grid)

    x = train_x.double().numpy()
    scaler: dict[str, Any] = {"scaler_mean": None, "scaler_std": None}
    if standardize:
        mean, std = standardizer(x)
        x = (x - mean) / std
        scaler = {"scaler_mean": torch.from_numpy(mean), "scaler_std": torch.from_numpy(std)}
    y = train_y.numpy()
    grid: list[dict[str, Any]] = []
    best: Selection | None = None
    for hyper in _grid_points(model, x):
        start = time.perf_counter()
        params = {"model": model, "num_classes": num_classes, **scaler, **_fit_params(model, hyper, x, y, num_classes)}
        val_accuracy = _accuracy(classifier_probabilities(val_x, params), val_y)
        grid.append({**hyper, "val_accuracy": round(val_accuracy, 6),
                     "seconds": round(time.perf_counter() - start, 4)})
        if best is None or val_accuracy > best.val_accuracy:
            best = Selection(params, hyper, val_accuracy, grid)
    return best


def _grid_points(model: str, x: np.ndarray) -> list[dict[str, float]]:
    if model == "knn":
        return [{"k": k} for k in KNN_K_GRID if k <= x.shape[0]]
    scale = 1.0 / (x.shape[1] * max(float(x.var()), 1e-12))
    return [{"C": c, "gamma": float(f"{factor * scale:.6g}")} for c in SVM_C_GRID for factor in SVM_GAMMA_FACTORS]


def _fit_params(model: str, hyper: dict[str, float], x: np.ndarray, y: np.ndarray,
                num_classes: int) -> dict[str, Any]:
    """Fit one grid point; returns the tensors that predict."""
    if model == "knn":
        return {"k": int(hyper["k"]), "train_features": torch.from_numpy(x), "train_labels": torch.from_numpy(y)}
    from sklearn.svm import SVC

    missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise UserError(f"the SVM needs training images of every class; class indices {missing} have none")
    svm = SVC(C=hyper["C"], kernel="rbf", gamma=hyper["gamma"]).fit(x, y)
    return {"support_vectors": torch.from_numpy(svm.support_vectors_),
            "dual_coef": torch.from_numpy(svm.dual_coef_), "intercept": torch.from_numpy(svm.intercept_),
            "n_support": torch.from_numpy(svm.n_support_.astype(np.int64)), "gamma": float(hyper["gamma"])}


def describe(model: str, extractor_description: str, hyperparameters: dict[str, float]) -> str:
    """The Network column, e.g. ``RBF SVM on 8 px pixels (baseline, C 1, gamma 0.00347)``."""
    values = ", ".join(f"{k} {v:g}" for k, v in hyperparameters.items())
    return f"{NAMES[model]} on {extractor_description} (baseline, {values})"
