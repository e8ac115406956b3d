"""Paired comparison of runs evaluated on the same test images.

Two models tested on the same images are compared image by image, not by their headline numbers:
McNemar's exact test on the images exactly one of the two gets right (scipy's exact binomial test
of the discordant pairs), and a paired bootstrap interval of the F1 difference (the same resamples
of the images for both models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from supcon.metrics import CONFIDENCE, bootstrap_intervals, confusion_counts, precision_recall_f1

#: Significance level of the "distinguishable from the best" mark.
ALPHA = 0.05

EXPLANATION = (
    "vs best: each run against the run with the highest test accuracy on the same test images. p: McNemar's "
    "exact test on the images exactly one of the two classifies correctly; F1 diff: paired 95% bootstrap "
    "interval of (this run - best). 'same' means neither test finds a difference at 5%: the order of those "
    "rows is not established by this test set."
)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test of two classifiers on the same images.

    Args:
        correct_a: ``[N]`` booleans, model A right on image i.
        correct_b: ``[N]`` booleans for model B on the same images.

    Returns:
        ``(only_a, only_b, p)``: images only A gets right, only B gets right, and the two-sided exact
        p-value (binomial test of ``only_a`` out of ``only_a + only_b`` at 1/2; 1.0 with no discordant pair).
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_f1_difference(labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
                         num_classes: int, average: str = "macro", resamples: int = 1000, seed: int = 0,
                         confidence: float = CONFIDENCE, positive: int = 1) -> list[float] | None:
    """Bootstrap interval of F1(A) - F1(B), both on the same resamples of the images (``binary``: of class
    ``positive``)."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = [np.asarray(p, dtype=np.int64) for p in (predictions_a, predictions_b)]

    def difference(index: np.ndarray) -> np.ndarray:
        resampled = labels[index]
        f1 = [precision_recall_f1(confusion_counts(resampled, p[index], num_classes), average, positive)[2]
              for p in predictions]
        return (f1[0] - f1[1])[None]

    return bootstrap_intervals(difference, len(labels), resamples, seed, confidence)[0]


@dataclass
class PairedResult:
    """One run against the reference (best) run."""

    only_this: int
    only_best: int
    p_value: float
    f1_difference: list[float] | None

    @property
    def distinguishable(self) -> bool:
        excludes_zero = self.f1_difference is not None and (self.f1_difference[0] > 0 or self.f1_difference[1] < 0)
        return self.p_value < ALPHA or excludes_zero

    def describe(self) -> str:
        diff = "-" if self.f1_difference is None else (
            f"[{100 * self.f1_difference[0]:+.2f}, {100 * self.f1_difference[1]:+.2f}]")
        verdict = "differs" if self.distinguishable else "same"
        return f"{verdict} (p={self.p_value:.3g}, {self.only_this}:{self.only_best}; F1 diff {diff})"

    def to_dict(self) -> dict:
        return {"only_this_correct": self.only_this, "only_best_correct": self.only_best,
                "mcnemar_exact_p": self.p_value, "f1_difference_interval": self.f1_difference,
                "distinguishable": self.distinguishable}


def compare_to_best(labels: np.ndarray, predictions: np.ndarray, best_predictions: np.ndarray, num_classes: int,
                    average: str, resamples: int, seed: int, positive: int = 1) -> PairedResult:
    """McNemar and the paired F1 bootstrap of one run against the best, on the same labelled images."""
    only_this, only_best, p_value = mcnemar_exact(predictions == labels, best_predictions == labels)
    difference = (paired_f1_difference(labels, predictions, best_predictions, num_classes, average, resamples, seed,
                                       positive=positive) if resamples > 0 else None)
    return PairedResult(only_this, only_best, p_value, difference)


@dataclass
class Verdict:
    """A SupCon-based run against the best supervised run on the same test images (McNemar's exact test)."""

    run: str
    rival: str
    accuracy: float
    rival_accuracy: float
    only_this: int
    only_rival: int
    p_value: float
    #: the SupCon run's probe curve still rose at its last checkpoint: what to do (from probe-all's advice)
    stopped_early: str | None = None

    @property
    def outcome(self) -> str:
        """``beats``, ``loses to`` or ``ties with`` (the difference is within this test set's noise)."""
        if self.p_value >= ALPHA:
            return "ties with"
        return "beats" if self.only_this > self.only_rival else "loses to"

    def sentence(self) -> str:
        tie = " (within noise)" if self.outcome == "ties with" else ""
        return (f"{self.run} ({100 * self.accuracy:.2f}%) {self.outcome} the best supervised run {self.rival} "
                f"({100 * self.rival_accuracy:.2f}%){tie}: McNemar's exact test on accuracy p={self.p_value:.3g}, "
                f"{self.only_this} test images only it gets right, {self.only_rival} only {self.rival}."
                + (f" {self.run} was stopped before it settled, so this verdict may change with more training: "
                   f"{self.stopped_early}." if self.stopped_early else ""))

    def to_dict(self) -> dict:
        return {"run": self.run, "rival": self.rival, "outcome": self.outcome, "accuracy": self.accuracy,
                "rival_accuracy": self.rival_accuracy, "only_this_correct": self.only_this,
                "only_rival_correct": self.only_rival, "mcnemar_exact_p": self.p_value,
                "stopped_early": self.stopped_early}


def verdict(run: str, labels: np.ndarray, predictions: np.ndarray, rival: str,
            rival_predictions: np.ndarray, stopped_early: str | None = None) -> Verdict:
    """``run`` against ``rival`` on the same labelled test images (``stopped_early``: the run's advice to train
    longer, when its probe curve still rose)."""
    only_this, only_rival, p_value = mcnemar_exact(predictions == labels, rival_predictions == labels)
    return Verdict(run, rival, float(np.mean(predictions == labels)), float(np.mean(rival_predictions == labels)),
                   only_this, only_rival, p_value, stopped_early)
