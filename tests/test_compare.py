"""Paired comparison of two runs on the same test images: McNemar's exact test and the paired F1 bootstrap."""

import numpy as np
import pytest

from linear_probe.compare import compare_to_best, mcnemar_exact, paired_f1_difference


def paired(only_a, only_b, both=20, neither=5):
    """Correctness vectors with the given counts of each (A, B) outcome."""
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return np.array(a), np.array(b)


@pytest.mark.parametrize("only_a, only_b, expected", [
    (0, 5, 2 / 2 ** 5),          # all 5 discordant pairs one way: 2 x (1/2)^5 = 0.0625
    (1, 9, 22 / 2 ** 10),        # 2 x P(X <= 1), X ~ Bin(10, 1/2) = 2 x 11/1024
    (3, 3, 1.0),                 # balanced: no evidence at all
    (2, 12, 2 * 106 / 2 ** 14),  # 2 x (1 + 14 + 91) / 16384 = 0.01294
])
def test_mcnemar_exact_p_values_of_hand_built_tables(only_a, only_b, expected):
    a, b = paired(only_a, only_b)
    assert mcnemar_exact(a, b) == (only_a, only_b, pytest.approx(expected))
    assert mcnemar_exact(b, a)[2] == pytest.approx(expected)  # symmetric


def test_mcnemar_ignores_images_both_get_right_or_wrong():
    assert mcnemar_exact(*paired(1, 9, both=0, neither=0))[2] == mcnemar_exact(*paired(1, 9, both=500))[2]
    assert mcnemar_exact(*paired(0, 0)) == (0, 0, 1.0)


def test_paired_f1_difference_sees_a_consistent_small_gain_that_unpaired_intervals_would_not():
    """B fixes 12 of A's mistakes and breaks none, on 1,000 images: a sure improvement of 1.2 points."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    predictions_b = np.where(rng.random(1000) < 0.9, labels, 1 - labels)
    predictions_a = predictions_b.copy()
    fixed = np.flatnonzero(predictions_b == labels)[:12]
    predictions_a[fixed] = 1 - labels[fixed]
    low, high = paired_f1_difference(labels, predictions_a, predictions_b, 2, resamples=500)
    assert high < 0 and low > -0.03  # A - B: always negative, about -1.2 points
    result = compare_to_best(labels, predictions_a, predictions_b, 2, "macro", 500, 0)
    assert (result.only_this, result.only_best) == (0, 12) and result.p_value == pytest.approx(2 / 2 ** 12)
    assert result.distinguishable and result.describe().startswith("differs (p=0.000488, 0:12; F1 diff [-")


def test_identical_predictions_are_the_same():
    labels = np.array([0, 1, 1, 0, 1])
    result = compare_to_best(labels, labels, labels, 2, "macro", 100, 0)
    assert not result.distinguishable and result.f1_difference == [0.0, 0.0] and result.p_value == 1.0


def test_verdict_says_beats_ties_or_loses_by_the_paired_test():
    from linear_probe.compare import verdict

    labels = np.zeros(100, dtype=int)
    rival = np.zeros(100, dtype=int)
    rival[:20] = 1  # the rival gets 80 right
    better = np.zeros(100, dtype=int)  # all 100 right: 20 only it gets right, none the other way
    result = verdict("supcon", labels, better, "ce", rival)
    assert (result.outcome, result.only_this, result.only_rival) == ("beats", 20, 0)
    assert result.p_value < 1e-5 and "supcon (100.00%) beats the best supervised run ce (80.00%)" in result.sentence()
    assert verdict("supcon", labels, rival, "ce", better).outcome == "loses to"
    close = rival.copy()
    close[:2] = 0  # two more right than the rival: not beyond noise
    tie = verdict("supcon", labels, close, "ce", rival)
    assert tie.outcome == "ties with" and "(within noise)" in tie.sentence() and tie.p_value == pytest.approx(0.5)


def test_the_verdict_says_when_the_supcon_run_was_stopped_before_it_settled():
    from linear_probe.compare import verdict

    labels = np.zeros(50, dtype=int)
    rival = np.zeros(50, dtype=int)
    rival[:10] = 1
    advice = "still improving at epoch 60: ... train longer (a new run with a larger --epochs)"
    settled = verdict("supcon", labels, rival, "ce", labels)
    assert "stopped before it settled" not in settled.sentence() and settled.to_dict()["stopped_early"] is None
    early = verdict("supcon", labels, rival, "ce", labels, stopped_early=advice)
    assert early.outcome == settled.outcome == "loses to"
    assert early.sentence().startswith(settled.sentence())
    assert early.sentence().endswith(f"supcon was stopped before it settled, so this verdict may change with more "
                                     f"training: {advice}.")
    assert early.to_dict()["stopped_early"] == advice
