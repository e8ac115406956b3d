"""Test metrics against confusion matrices computed by hand."""

import numpy as np
import pytest

from supcon.errors import UserError
from supcon.metrics import classification_metrics


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
