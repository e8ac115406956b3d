"""A classifier's metrics on a labelled set, with seeded bootstrap intervals: one function for every caller.

``classification_metrics`` is used by ``check-accuracies`` (SupCon and baseline runs), by the
baseline grid's test columns and by baseline-train's per-epoch validation, so a baseline's F1 and
AUC mean the same thing in every table. Point values come from scikit-learn. Intervals are scipy's
percentile bootstrap over the images (``scipy.stats.bootstrap``, seeded); for speed the statistic of
a resample is computed from its confusion matrix and, for AUC, from ranks (``scipy.stats.rankdata``,
the Mann-Whitney identity), both checked against scikit-learn in the tests; AUPRC is scikit-learn's
``average_precision_score`` on each resample.

Two classes can be decided by a threshold on the positive class's probability (``threshold``,
``positive``; :func:`decide`) instead of the arg-max: every threshold-dependent metric (accuracy,
precision, recall, F1, the confusion matrix, sensitivity, specificity, balanced accuracy) is then of
those decisions, while AUROC and AUPRC are threshold-free.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from supcon.errors import UserError

#: Metrics that get an interval, in the order of :func:`resampled_metrics`' rows.
INTERVAL_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
#: Metrics of a decision about one positive class (two classes), in the order of
#: :func:`resampled_operating_metrics`' rows; with more classes only ``balanced_accuracy`` is defined.
OPERATING_METRICS = ("sensitivity", "specificity", "balanced_accuracy", "auprc")
#: ``--bootstrap`` default: about a second on 359 images and 10 classes on one CPU core.
DEFAULT_BOOTSTRAP = 1000
CONFIDENCE = 0.95
#: Share of resamples allowed to leave a metric undefined (AUC without a class); the interval then comes
#: from the others, and is ``None`` beyond it.
MAX_UNDEFINED_SHARE = 0.01
#: Resamples x images x classes held in memory at once.
_BATCH_ELEMENTS = 4_000_000


@dataclass
class TestMetrics:
    """Metrics of one model on one labelled folder; ``per_class`` maps class name to its values.

    ``intervals`` maps each of :data:`INTERVAL_METRICS` to ``[low, high]`` (``None`` when undefined,
    e.g. AUC when a resample lacks a class), and of the :data:`OPERATING_METRICS` that are defined;
    empty without a bootstrap. ``roc_auc`` (AUROC): of the positive class for two classes, else
    one-vs-rest macro; ``None`` when a class is missing from the labels.

    Two classes: ``positive_class`` (the second unless chosen), ``threshold`` on its probability
    (``None``: the arg-max decision), ``sensitivity`` and ``specificity`` (the recall of the positive
    and of the other class) and ``auprc`` (scikit-learn's average precision of the positive class).
    ``balanced_accuracy``: the mean recall over the classes present (scikit-learn's), for any number.
    """

    __test__ = False  # not a pytest class

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
    log_loss: float | None = None
    positive_class: str | None = None
    threshold: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    balanced_accuracy: float | None = None
    auprc: float | None = None
    intervals: dict[str, list[float] | None] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    roc_curve: dict[str, list[float]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """``loss``, ``accuracy``, ``auc`` (NaN when undefined) and ``f1``: the per-epoch columns of baseline-train."""
        return {"loss": math.nan if self.log_loss is None else self.log_loss, "accuracy": self.accuracy,
                "auc": math.nan if self.roc_auc is None else self.roc_auc, "f1": self.f1}


def wilson_interval(successes: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy); ``(0, 1)`` for an empty set."""
    if total <= 0:
        return 0.0, 1.0
    interval = stats.binomtest(int(successes), int(total)).proportion_ci(confidence_level=confidence,
                                                                        method="wilson")
    return float(interval.low), float(interval.high)


def decide(probabilities: np.ndarray, positive: int = 1, threshold: float | None = None) -> np.ndarray:
    """Predicted class ids ``[N]``: the arg-max, or for two classes ``positive`` where its probability is at
    least ``threshold`` (else the other class)."""
    probabilities = np.asarray(probabilities)
    if threshold is None:
        return probabilities.argmax(axis=1)
    return np.where(probabilities[:, positive] >= threshold, positive, 1 - positive)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str] | None = None,
                           average: str = "macro", bootstrap: int = 0, seed: int = 0,
                           confidence: float = CONFIDENCE, positive: int = 1,
                           threshold: float | None = None) -> TestMetrics:
    """Metrics of the decisions on ``probabilities`` ``[N, C]`` against ``labels`` ``[N]``.

    Args:
        class_names: names of the ``C`` classes [default: ``"0"`` ... ``"C-1"``].
        average: scikit-learn's averaging of precision/recall/F1 over classes: ``macro`` (default),
            ``micro``, ``weighted``, or ``binary`` (two classes; of the positive class). Per-class
            values are always reported too.
        bootstrap: resamples of the images for the intervals (0: no intervals).
        seed: seed of the resampling (the same seed gives the same intervals).
        confidence: of the intervals.
        positive: two classes: the index of the positive class (sensitivity, AUROC, AUPRC, ``binary``).
        threshold: two classes: predict ``positive`` where its probability is at least this
            [default: the arg-max decision].

    Raises:
        UserError: ``binary`` or a threshold with other than two classes; ``positive`` not 0 or 1.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows drift from 1
    num_classes = probabilities.shape[1]
    class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    _check_decision(num_classes, average, positive, threshold)
    predictions = decide(probabilities, positive, threshold)
    label_ids = list(range(num_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=label_ids, average=average, pos_label=positive if average == "binary" else 1,
        zero_division=0,
    )
    class_p, class_r, class_f, support = precision_recall_fscore_support(
        labels, predictions, labels=label_ids, average=None, zero_division=0,
    )
    per_class = {
        name: {"precision": float(class_p[i]), "recall": float(class_r[i]), "f1": float(class_f[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    roc_auc, curve = _roc_auc(labels, probabilities, positive), None
    if num_classes == 2 and roc_auc is not None:
        fpr, tpr, _ = roc_curve(labels == positive, probabilities[:, positive])
        curve = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    metrics = TestMetrics(
        accuracy=float(accuracy_score(labels, predictions)), precision=float(precision), recall=float(recall),
        f1=float(f1), average=average, num_samples=int(labels.shape[0]), class_names=class_names,
        confusion_matrix=confusion_matrix(labels, predictions, labels=label_ids).tolist(), per_class=per_class,
        roc_auc=roc_auc, log_loss=float(log_loss(labels, probabilities, labels=label_ids)) if len(labels) else None,
        roc_curve=curve, threshold=None if threshold is None else float(threshold),
        **operating_metrics(labels, probabilities, predictions, positive, class_names),
    )
    if bootstrap > 0 and len(labels) > 0:
        _add_intervals(metrics, labels, probabilities, predictions, average, positive, bootstrap, seed, confidence)
    return metrics


def _check_decision(num_classes: int, average: str, positive: int, threshold: float | None) -> None:
    if average == "binary" and num_classes != 2:
        raise UserError(f"--average binary needs two classes, the test folder has {num_classes}; use macro")
    if threshold is not None and num_classes != 2:
        raise UserError(f"a decision threshold needs two classes, the test folder has {num_classes}")
    if positive not in (0, 1):
        raise UserError(f"the positive class must be class 0 or 1, got {positive}")


def operating_metrics(labels: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray, positive: int = 1,
                      class_names: list[str] | None = None) -> dict[str, Any]:
    """The :data:`OPERATING_METRICS` of ``predictions`` and ``positive_class`` (two classes; else only
    ``balanced_accuracy``); a metric whose class is missing from the labels is ``None``."""
    if not len(labels):
        return {}
    with warnings.catch_warnings():  # a class missing from the labels: the mean over the others, as documented
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(labels, predictions))
    if probabilities.shape[1] != 2:
        return {"balanced_accuracy": balanced}
    is_positive = labels == positive
    predicted_positive = predictions == positive
    sensitivity = float(predicted_positive[is_positive].mean()) if is_positive.any() else None
    specificity = float((~predicted_positive[~is_positive]).mean()) if (~is_positive).any() else None
    auprc = float(average_precision_score(is_positive, probabilities[:, positive])) if is_positive.any() else None
    name = class_names[positive] if class_names is not None else str(positive)
    return {"positive_class": name, "sensitivity": sensitivity, "specificity": specificity,
            "balanced_accuracy": balanced, "auprc": auprc}


def _add_intervals(metrics: TestMetrics, labels: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray,
                   average: str, positive: int, bootstrap: int, seed: int, confidence: float) -> None:
    """Set ``metrics.intervals`` (one bootstrap: the same resamples for every metric) and ``metrics.bootstrap``."""
    names = INTERVAL_METRICS + (OPERATING_METRICS if probabilities.shape[1] == 2 else ("balanced_accuracy",))

    def statistic(index: np.ndarray) -> np.ndarray:
        return np.concatenate([resampled_metrics(labels, probabilities, index, average, predictions, positive),
                               resampled_operating_metrics(labels, probabilities, predictions, index, positive)])

    bounds = bootstrap_intervals(statistic, len(labels), bootstrap, seed, confidence,
                                 elements_per_resample=len(labels) * probabilities.shape[1])
    metrics.intervals = {name: bounds[i] for i, name in enumerate(names)}
    metrics.bootstrap = {"resamples": int(bootstrap), "seed": int(seed), "confidence": confidence,
                         "method": "percentile bootstrap over test images (scipy.stats.bootstrap)"}


def _roc_auc(labels: np.ndarray, probabilities: np.ndarray, positive: int = 1) -> float | None:
    num_classes = probabilities.shape[1]
    if len(np.unique(labels)) != num_classes:
        return None
    if num_classes == 2:
        return float(roc_auc_score(labels == positive, probabilities[:, positive]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro",
                               labels=list(range(num_classes))))


def bootstrap_intervals(statistic, num_samples: int, resamples: int, seed: int, confidence: float = CONFIDENCE,
                        elements_per_resample: int | None = None) -> list[list[float] | None]:
    """Percentile bootstrap intervals of a vectorised statistic of resampled image indices.

    Args:
        statistic: maps an index array ``[B, N]`` to values ``[K, B]`` (NaN where undefined).
        num_samples: ``N``, the number of images.
        resamples: ``B`` in all.
        seed: of the resampling.
        elements_per_resample: memory per resample, to size scipy's batches.

    Returns:
        ``K`` intervals ``[low, high]``; ``None`` where more than :data:`MAX_UNDEFINED_SHARE` of the
        resamples gave NaN (below that, the interval of the defined ones).
    """
    batch = max(1, _BATCH_ELEMENTS // max(1, elements_per_resample or num_samples))
    with warnings.catch_warnings():  # every resample equal (e.g. 100% accuracy): the interval is that value
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((np.arange(num_samples),), lambda index, axis=-1: statistic(index),
                                 n_resamples=resamples, vectorized=True, method="percentile", batch=batch,
                                 confidence_level=confidence, rng=np.random.default_rng(seed))
    low = np.atleast_1d(result.confidence_interval.low)
    high = np.atleast_1d(result.confidence_interval.high)
    distribution = np.atleast_2d(result.bootstrap_distribution)
    intervals = []
    for lo, hi, values in zip(low, high, distribution, strict=True):
        undefined = np.mean(~np.isfinite(values))
        if 0 < undefined <= MAX_UNDEFINED_SHARE:  # e.g. a few resamples of a small test set lack a class
            lo, hi = np.nanpercentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
        intervals.append([float(lo), float(hi)] if np.isfinite(lo) and np.isfinite(hi) else None)
    return intervals


def resampled_metrics(labels: np.ndarray, probabilities: np.ndarray, index: np.ndarray, average: str,
                      predictions: np.ndarray | None = None, positive: int = 1) -> np.ndarray:
    """:data:`INTERVAL_METRICS` of each resample ``index[b]`` of the images: ``[5, B]`` (scikit-learn's definitions).

    Args:
        labels: ``[N]`` class ids.
        probabilities: ``[N, C]``.
        index: ``[B, N]`` image indices of ``B`` resamples (or ``[N]`` for one).
        average: as in :func:`classification_metrics`.
        predictions: ``[N]`` class ids [default: the arg-max of ``probabilities``].
        positive: two classes: the positive class (``binary`` average, AUC).
    """
    index = np.atleast_2d(np.asarray(index, dtype=np.int64))
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1) if predictions is None else np.asarray(predictions, dtype=np.int64)
    resampled_labels = labels[index]
    counts = confusion_counts(resampled_labels, predictions[index], num_classes)
    accuracy = np.trace(counts, axis1=1, axis2=2) / index.shape[1]
    precision, recall, f1 = precision_recall_f1(counts, average, positive)
    auc = resampled_roc_auc(resampled_labels, probabilities[index], positive)
    return np.stack([accuracy, precision, recall, f1, auc])


def resampled_operating_metrics(labels: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray,
                                index: np.ndarray, positive: int = 1) -> np.ndarray:
    """:data:`OPERATING_METRICS` of each resample ``index[b]``: ``[4, B]`` for two classes, else
    ``balanced_accuracy`` alone ``[1, B]``; NaN where a class the metric needs is missing.

    Sensitivity, specificity and balanced accuracy come from confusion counts (as
    :func:`operating_metrics`); AUPRC is scikit-learn's ``average_precision_score`` of each resample.
    """
    index = np.atleast_2d(np.asarray(index, dtype=np.int64))
    num_classes = probabilities.shape[1]
    counts = confusion_counts(labels[index], np.asarray(predictions, dtype=np.int64)[index], num_classes)
    actual = counts.sum(axis=2).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.diagonal(counts, axis1=1, axis2=2) / actual  # NaN for a class missing from the resample
    balanced = np.nanmean(np.where(actual > 0, recall, np.nan), axis=1)
    if num_classes != 2:
        return balanced[None]
    auprc = np.full(index.shape[0], np.nan)
    for row, sample in enumerate(index):
        is_positive = labels[sample] == positive
        if is_positive.any():
            auprc[row] = average_precision_score(is_positive, probabilities[sample, positive])
    return np.stack([recall[:, positive], recall[:, 1 - positive], balanced, auprc])


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices ``[B, true, predicted]`` of ``B`` rows of labels and predictions ``[B, N]``."""
    rows = labels.shape[0]
    codes = labels * num_classes + predictions + (num_classes * num_classes) * np.arange(rows)[:, None]
    return np.bincount(codes.ravel(), minlength=rows * num_classes * num_classes).reshape(
        rows, num_classes, num_classes)


def precision_recall_f1(counts: np.ndarray, average: str,
                        positive: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 ``[B]`` from confusion matrices ``[B, C, C]`` as scikit-learn defines them
    (every class counted, ``zero_division=0``; ``binary``: of class ``positive``)."""
    true_positives = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    predicted = counts.sum(axis=1).astype(np.float64)
    actual = counts.sum(axis=2).astype(np.float64)
    if average == "micro":
        true_positives, predicted, actual = (x.sum(axis=1, keepdims=True) for x in (true_positives, predicted, actual))
    precision = np.divide(true_positives, predicted, out=np.zeros_like(predicted), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros_like(actual), where=actual > 0)
    f1 = np.divide(2 * true_positives, predicted + actual, out=np.zeros_like(actual), where=predicted + actual > 0)
    if average == "binary":
        return precision[:, positive], recall[:, positive], f1[:, positive]
    if average == "weighted":
        weights = actual / actual.sum(axis=1, keepdims=True)
        return (precision * weights).sum(1), (recall * weights).sum(1), (f1 * weights).sum(1)
    return precision.mean(1), recall.mean(1), f1.mean(1)


def resampled_roc_auc(labels: np.ndarray, probabilities: np.ndarray, positive: int = 1) -> np.ndarray:
    """ROC AUC ``[B]`` of ``B`` resamples (labels ``[B, N]``, probabilities ``[B, N, C]``), as :func:`_roc_auc`.

    Uses AUC = (rank sum of the positives - n1 (n1 + 1) / 2) / (n1 n0) with tied scores given their mean
    rank; NaN where a class is missing. Two classes: of class ``positive``.
    """
    num_classes = probabilities.shape[-1]
    classes = [positive] if num_classes == 2 else range(num_classes)
    per_class = []
    for one in classes:
        is_positive = labels == one
        ranks = stats.rankdata(probabilities[..., one], axis=-1)
        n1 = is_positive.sum(axis=-1).astype(np.float64)
        n0 = labels.shape[-1] - n1
        with np.errstate(divide="ignore", invalid="ignore"):
            per_class.append(((ranks * is_positive).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0))
    auc = np.mean(per_class, axis=0)
    return np.where(np.isfinite(auc), auc, np.nan)
