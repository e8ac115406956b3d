"""Test metrics against confusion matrices computed by hand; intervals against their nominal coverage."""

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from supcon.errors import UserError
from supcon.metrics import (
    bootstrap_intervals,
    classification_metrics,
    resampled_metrics,
    resampled_operating_metrics,
    wilson_interval,
)


def one_hot_probabilities(predictions, num_classes):
    """Probabilities whose arg-max is ``predictions`` (0.6 on the prediction, the rest shared)."""
    probabilities = np.full((len(predictions), num_classes), 0.4 / (num_classes - 1))
    probabilities[np.arange(len(predictions)), predictions] = 0.6
    return probabilities


# true:      0 0 0 0 1 1 1 2 2 2
# predicted: 0 0 1 2 1 1 0 2 2 1
# confusion matrix (rows true, columns predicted): [[2,1,1],[1,2,0],[0,1,2]]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDICTIONS = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])
NAMES = ["ant", "bee", "cow"]


def test_three_classes_macro_matches_hand_computation():
    m = classification_metrics(LABELS, one_hot_probabilities(PREDICTIONS, 3), NAMES, "macro")
    assert m.confusion_matrix == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m.accuracy == pytest.approx(6 / 10)
    # precision per class = diagonal / column sum: 2/3, 2/4, 2/3; recall = diagonal / row sum: 2/4, 2/3, 2/3
    assert m.per_class["ant"]["precision"] == pytest.approx(2 / 3)
    assert m.per_class["bee"]["precision"] == pytest.approx(1 / 2)
    assert m.per_class["ant"]["recall"] == pytest.approx(1 / 2)
    assert m.per_class["cow"]["recall"] == pytest.approx(2 / 3)
    # F1 = 2PR / (P + R): ant 4/7, bee 4/7, cow 2/3
    assert m.per_class["ant"]["f1"] == pytest.approx(4 / 7)
    assert m.per_class["bee"]["f1"] == pytest.approx(4 / 7)
    assert m.per_class["cow"]["f1"] == pytest.approx(2 / 3)
    assert [m.per_class[n]["support"] for n in NAMES] == [4, 3, 3]
    assert m.precision == pytest.approx(11 / 18)
    assert m.recall == pytest.approx(11 / 18)
    assert m.f1 == pytest.approx((4 / 7 + 4 / 7 + 2 / 3) / 3)
    # three classes: one-vs-rest macro AUC (scores 0.6 on the prediction, 0.2 elsewhere; ties count half):
    # ant (4 pos x 6 neg) 16/24, bee (3 x 7) 14.5/21, cow (3 x 7) 16/21; no curve
    assert m.roc_auc == pytest.approx((16 / 24 + 14.5 / 21 + 16 / 21) / 3)
    assert m.roc_curve is None
    assert m.num_samples == 10


def test_three_classes_weighted_and_micro():
    weighted = classification_metrics(LABELS, one_hot_probabilities(PREDICTIONS, 3), NAMES, "weighted")
    assert weighted.precision == pytest.approx((4 * 2 / 3 + 3 * 1 / 2 + 3 * 2 / 3) / 10)
    assert weighted.recall == pytest.approx(6 / 10)  # weighted recall equals accuracy
    micro = classification_metrics(LABELS, one_hot_probabilities(PREDICTIONS, 3), NAMES, "micro")
    assert micro.precision == micro.recall == micro.f1 == pytest.approx(6 / 10)


def test_binary_metrics_and_roc_auc():
    labels = np.array([0, 0, 1, 1])
    positive = np.array([0.1, 0.4, 0.35, 0.8])
    probabilities = np.stack([1 - positive, positive], axis=1)
    m = classification_metrics(labels, probabilities, ["neg", "pos"], "binary")
    # predictions 0 0 0 1 -> [[2, 0], [1, 1]]; positive class: precision 1/1, recall 1/2, F1 2/3
    assert m.confusion_matrix == [[2, 0], [1, 1]]
    assert m.accuracy == pytest.approx(0.75)
    assert (m.precision, m.recall, m.f1) == pytest.approx((1.0, 0.5, 2 / 3))
    # of the 4 (positive, negative) pairs, 3 rank the positive higher (0.35 < 0.4 is the miss)
    assert m.roc_auc == pytest.approx(0.75)
    assert m.roc_curve["fpr"][0] == 0 and m.roc_curve["tpr"][-1] == 1
    macro = classification_metrics(labels, probabilities, ["neg", "pos"], "macro")
    # negative class: precision 2/3, recall 1, F1 4/5; macro F1 = (4/5 + 2/3) / 2
    assert macro.f1 == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_missing_class_in_predictions_gives_zero_not_a_warning_crash():
    labels = np.array([0, 1, 2, 2])
    m = classification_metrics(labels, one_hot_probabilities(np.array([0, 0, 2, 2]), 3), NAMES)
    assert m.per_class["bee"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m.confusion_matrix == [[1, 0, 0], [1, 0, 0], [0, 0, 2]]


def test_binary_average_needs_two_classes():
    with pytest.raises(UserError, match="--average binary needs two classes"):
        classification_metrics(LABELS, one_hot_probabilities(PREDICTIONS, 3), NAMES, "binary")


def test_summary_is_baseline_trains_per_epoch_columns():
    labels = np.array([0, 0, 1, 1])
    positive = np.array([0.1, 0.4, 0.35, 0.8])
    summary = classification_metrics(labels, np.stack([1 - positive, positive], axis=1)).summary()
    assert set(summary) == {"loss", "accuracy", "auc", "f1"}
    assert summary["accuracy"] == pytest.approx(0.75) and summary["auc"] == pytest.approx(0.75)
    assert summary["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))  # mean -log p(true class)
    missing = classification_metrics(np.array([0, 0]), np.array([[0.7, 0.3], [0.6, 0.4]])).summary()
    assert np.isnan(missing["auc"])  # one class only: undefined, not an error


@pytest.mark.parametrize("num_classes,average", [
    (n, a) for n in (2, 3, 10) for a in ("macro", "micro", "weighted", "binary") if a != "binary" or n == 2])
def test_resampled_metrics_equal_scikit_learn_on_every_resample(num_classes, average):
    """The fast statistic of the bootstrap (confusion counts, ranks) against scikit-learn's own functions."""
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 120)
    scores = rng.random((120, num_classes))
    scores[np.arange(120), labels] += rng.random(120)
    probabilities = np.round(scores, 1) + 1e-3  # rounded: tied scores, which AUC counts as half
    probabilities /= probabilities.sum(1, keepdims=True)
    index = rng.integers(0, 120, (6, 120))
    fast = resampled_metrics(labels, probabilities, index, average)
    for b in range(6):
        y, p = labels[index[b]], probabilities[index[b]]
        precision, recall, f1, _ = precision_recall_fscore_support(
            y, p.argmax(1), labels=list(range(num_classes)), average=average, zero_division=0)
        auc = (roc_auc_score(y, p[:, 1]) if num_classes == 2
               else roc_auc_score(y, p, multi_class="ovr", labels=list(range(num_classes))))
        expected = [np.mean(p.argmax(1) == y), precision, recall, f1, auc]
        assert fast[:, b] == pytest.approx(expected)


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    low, high = wilson_interval(359, 359)
    assert high == 1 and 0.98 < low < 0.995  # never the zero-width interval of the normal approximation


def test_bootstrap_accuracy_interval_covers_the_true_accuracy_at_its_nominal_rate():
    """1,000 simulated test sets of 300 images from a classifier of known accuracy 0.9: ~95% coverage."""
    rng = np.random.default_rng(0)
    true_accuracy, size, covered = 0.9, 300, 0
    for trial in range(1000):
        correct = rng.random(size) < true_accuracy
        [(low, high)] = bootstrap_intervals(lambda index, correct=correct: correct[index].mean(axis=-1)[None], size,
                                            400, seed=trial)
        covered += low <= true_accuracy <= high
    assert 930 <= covered <= 970


@pytest.mark.slow
def test_every_interval_of_classification_metrics_covers_at_its_nominal_rate():
    """Precision, recall, F1 and AUC of a fixed two-class scorer, over 300 test sets of 400 images.

    The true values come from one test set of 400,000 images of the same scorer.
    """
    rng = np.random.default_rng(1)

    def test_set(size):
        labels = rng.integers(0, 2, size)
        score = 1 / (1 + np.exp(-(2 * labels - 1) * 1.5 - rng.normal(size=size)))
        return labels, np.stack([1 - score, score], axis=1)

    truth = classification_metrics(*test_set(400_000), average="binary")
    names = ("accuracy", "precision", "recall", "f1", "roc_auc")
    covered = dict.fromkeys(names, 0)
    for trial in range(300):
        metrics = classification_metrics(*test_set(400), average="binary", bootstrap=500, seed=trial)
        for name in names:
            low, high = metrics.intervals[name]
            covered[name] += low <= getattr(truth, name) <= high
    assert all(0.92 * 300 <= count <= 0.98 * 300 for count in covered.values()), covered


def test_intervals_are_seeded_and_contain_the_value():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2] * 5)
    probabilities = one_hot_probabilities((labels + (np.arange(50) % 7 == 0)) % 3, 3)
    first = classification_metrics(labels, probabilities, NAMES, bootstrap=300, seed=3)
    again = classification_metrics(labels, probabilities, NAMES, bootstrap=300, seed=3)
    other = classification_metrics(labels, probabilities, NAMES, bootstrap=300, seed=4)
    assert first.intervals == again.intervals and first.intervals != other.intervals
    for name, (low, high) in first.intervals.items():
        assert low <= getattr(first, name) <= high
    assert first.bootstrap["resamples"] == 300 and classification_metrics(labels, probabilities).intervals == {}


# --- two classes decided by a threshold on one positive class --------------------------------------------------

# positive probabilities and labels of 8 images; at threshold 0.3 on class 1:
#   label:     0    0    0    0    0    1    1    1
#   P(pos):  0.1  0.2  0.35 0.4  0.05 0.25 0.6  0.9
#   decided:   0    0    1    1    0    0    1    1   -> TP 2, FN 1, FP 2, TN 3
BINARY_LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1])
BINARY_POSITIVE = np.array([0.1, 0.2, 0.35, 0.4, 0.05, 0.25, 0.6, 0.9])


def binary_probabilities():
    return np.stack([1 - BINARY_POSITIVE, BINARY_POSITIVE], axis=1)


def test_a_threshold_decides_every_threshold_dependent_metric():
    m = classification_metrics(BINARY_LABELS, binary_probabilities(), ["neg", "pos"], "binary", threshold=0.3)
    assert m.confusion_matrix == [[3, 2], [1, 2]] and m.threshold == 0.3 and m.positive_class == "pos"
    assert m.accuracy == pytest.approx(5 / 8)
    assert (m.precision, m.recall, m.f1) == pytest.approx((2 / 4, 2 / 3, 4 / 7))
    assert (m.sensitivity, m.specificity) == pytest.approx((2 / 3, 3 / 5))
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 3 / 5) / 2)
    # threshold-free: the same as scikit-learn's, whatever the threshold
    assert m.roc_auc == pytest.approx(roc_auc_score(BINARY_LABELS, BINARY_POSITIVE))
    assert m.auprc == pytest.approx(average_precision_score(BINARY_LABELS, BINARY_POSITIVE))
    argmax = classification_metrics(BINARY_LABELS, binary_probabilities(), ["neg", "pos"], "binary")
    assert argmax.threshold is None and argmax.confusion_matrix == [[5, 0], [1, 2]]
    assert (argmax.sensitivity, argmax.specificity) == pytest.approx((2 / 3, 1.0))
    assert (argmax.roc_auc, argmax.auprc) == pytest.approx((m.roc_auc, m.auprc))


def test_the_first_class_as_positive_swaps_sensitivity_and_specificity():
    m = classification_metrics(BINARY_LABELS, binary_probabilities(), ["neg", "pos"], "binary", positive=0,
                               threshold=0.7)
    # P(neg) = 1 - P(pos) >= 0.7 where P(pos) <= 0.3: images 0, 1, 4, 5 are called neg
    assert m.confusion_matrix == [[3, 2], [1, 2]] and m.positive_class == "neg"
    assert (m.sensitivity, m.specificity) == pytest.approx((3 / 5, 2 / 3))
    assert (m.precision, m.recall) == pytest.approx((3 / 4, 3 / 5))  # binary average: of the positive class
    assert m.roc_auc == pytest.approx(roc_auc_score(BINARY_LABELS == 0, 1 - BINARY_POSITIVE))
    assert m.auprc == pytest.approx(average_precision_score(BINARY_LABELS == 0, 1 - BINARY_POSITIVE))


def test_more_classes_get_balanced_accuracy_only_and_refuse_a_threshold():
    m = classification_metrics(LABELS, one_hot_probabilities(PREDICTIONS, 3), NAMES, bootstrap=200)
    assert m.balanced_accuracy == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)  # the mean recall
    assert m.sensitivity is m.specificity is m.auprc is m.positive_class is None
    assert set(m.intervals) == {"accuracy", "precision", "recall", "f1", "roc_auc", "balanced_accuracy"}
    with pytest.raises(UserError, match="a decision threshold needs two classes"):
        classification_metrics(LABELS, one_hot_probabilities(PREDICTIONS, 3), NAMES, threshold=0.5)


@pytest.mark.parametrize("positive", [0, 1])
def test_resampled_operating_metrics_equal_scikit_learn_on_every_resample(positive):
    rng = np.random.default_rng(positive)
    labels = (rng.random(80) < 0.25).astype(int)  # imbalanced
    score = np.round(np.clip(0.3 * labels + rng.random(80) * 0.7, 0, 1), 1)  # tied scores
    probabilities = np.stack([1 - score, score], axis=1)
    predictions = np.where(probabilities[:, positive] >= 0.45, positive, 1 - positive)
    index = rng.integers(0, 80, (8, 80))
    fast = resampled_operating_metrics(labels, probabilities, predictions, index, positive)
    for b in range(8):
        y, p, decided = labels[index[b]], probabilities[index[b]], predictions[index[b]]
        recall = recall_score(y, decided, labels=[0, 1], average=None, zero_division=0)
        expected = [recall[positive], recall[1 - positive], balanced_accuracy_score(y, decided),
                    average_precision_score(y == positive, p[:, positive])]
        assert fast[:, b] == pytest.approx(expected)


def test_every_new_metric_gets_an_interval_around_its_value():
    labels = np.tile(BINARY_LABELS, 6)
    probabilities = np.tile(binary_probabilities(), (6, 1))
    m = classification_metrics(labels, probabilities, ["neg", "pos"], bootstrap=300, seed=1, threshold=0.3)
    for name in ("sensitivity", "specificity", "balanced_accuracy", "auprc", "roc_auc"):
        low, high = m.intervals[name]
        assert low <= getattr(m, name) <= high and low < high
