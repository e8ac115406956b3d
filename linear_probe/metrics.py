"""Test metrics from scikit-learn: accuracy, precision, recall, F1, confusion matrix, ROC AUC (two classes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from supcon.errors import UserError


@dataclass
class TestMetrics:
    """Metrics of one model on the test folder; ``per_class`` maps class name to its values."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    average: str
    num_samples: int
    class_names: list[str]
    confusion_matrix: list[list[int]]
    per_class: dict[str, dict[str, float]]
    roc_auc: float | None = None
    roc_curve: dict[str, list[float]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                           average: str = "macro") -> TestMetrics:
    """Metrics of the arg-max predictions of ``probabilities`` ``[N, C]`` against ``labels`` ``[N]``.

    Args:
        average: scikit-learn's averaging of precision/recall/F1 over classes: ``macro`` (default),
            ``micro``, ``weighted``, or ``binary`` (two classes; the positive class is the second,
            ``class_names[1]``). Per-class values are always reported too.

    Raises:
        UserError: ``binary`` with other than two classes.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    if average == "binary" and num_classes != 2:
        raise UserError(f"--average binary needs two classes, the test folder has {num_classes}; use macro")
    predictions = probabilities.argmax(axis=1)
    label_ids = list(range(num_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=label_ids, average=average, pos_label=1, zero_division=0,
    )
    class_p, class_r, class_f, support = precision_recall_fscore_support(
        labels, predictions, labels=label_ids, average=None, zero_division=0,
    )
    per_class = {
        name: {"precision": float(class_p[i]), "recall": float(class_r[i]), "f1": float(class_f[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    roc_auc, curve = None, None
    if num_classes == 2 and len(np.unique(labels)) == 2:
        scores = probabilities[:, 1]
        roc_auc = float(roc_auc_score(labels, scores))
        fpr, tpr, _ = roc_curve(labels, scores)
        curve = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return TestMetrics(
        accuracy=float(accuracy_score(labels, predictions)), precision=float(precision), recall=float(recall),
        f1=float(f1), average=average, num_samples=int(labels.shape[0]), class_names=list(class_names),
        confusion_matrix=confusion_matrix(labels, predictions, labels=label_ids).tolist(), per_class=per_class,
        roc_auc=roc_auc, roc_curve=curve,
    )
