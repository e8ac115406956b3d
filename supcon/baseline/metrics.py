"""Classification metrics from class probabilities (scikit-learn): loss, accuracy, ROC AUC, macro F1."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score


def roc_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC: of the positive class for 2 classes, else one-vs-rest macro; NaN when undefined.

    Undefined when the labels hold a single class (or, for several, not every class).
    """
    num_classes = probabilities.shape[1]
    try:
        if num_classes == 2:
            return float(roc_auc_score(labels, probabilities[:, 1]))
        return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro",
                                   labels=list(range(num_classes))))
    except ValueError:
        return math.nan


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``loss`` (cross-entropy of the probabilities), ``accuracy``, ``auc`` (NaN if undefined), ``f1`` (macro)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows drift from 1
    labels = np.asarray(labels)
    classes = list(range(probabilities.shape[1]))
    predicted = probabilities.argmax(axis=1)
    return {
        "loss": float(log_loss(labels, probabilities, labels=classes)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "auc": roc_auc(probabilities, labels),
        "f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
    }
