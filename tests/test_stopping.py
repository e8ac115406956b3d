"""The ``--until plateau`` rule on scripted probe curves: the trend of the live probe over the last share of the run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from supcon.stopping import PlateauRule, probe_trend, still_rising


def run_rule(accuracies, every=5, num_val=200, correct=None, **kwargs):
    """Feed the rule a probe every ``every`` epochs; returns (rule, the epoch it fired at or None)."""
    rule = PlateauRule(**kwargs)
    for i, accuracy in enumerate(accuracies):
        epoch = every * (i + 1)
        rule.record_probe(epoch, accuracy, num_val, correct[i] if correct else "")
        if rule.check(epoch) is not None:
            return rule, epoch
    return rule, None


def per_image_probes(epochs, accuracy_at, num_val=200, flip=0.04, seed=0):
    """Probes of one run on fixed val images: image i is right when its difficulty is below the accuracy of the
    epoch, and each probe flips a few images at random (the wobble of one probe's fit)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=num_val)
    strings, accuracies = [], []
    for epoch in epochs:
        right = (difficulty < accuracy_at(epoch)) ^ (rng.uniform(size=num_val) < flip)
        strings.append("".join("1" if r else "0" for r in right))
        accuracies.append(float(right.mean()))
    return accuracies, strings


def test_the_trend_is_a_least_squares_line_with_its_residual_error():
    epochs = [60, 70, 80, 90, 100]
    accuracies = [0.70, 0.74, 0.71, 0.76, 0.77]
    fit = stats.linregress(epochs, accuracies)
    trend = probe_trend([{"epoch": e, "accuracy": a, "num_val": 200} for e, a in zip(epochs, accuracies)])
    assert trend.kind == "residual" and (trend.first_epoch, trend.last_epoch, trend.probes) == (60, 100, 5)
    assert trend.slope == pytest.approx(fit.slope) and trend.standard_error == pytest.approx(fit.stderr)
    assert trend.gain(100) == pytest.approx(100 * fit.slope)
    assert trend.upper_gain(100) == pytest.approx(100 * (fit.slope + fit.stderr))


def test_the_per_image_error_counts_when_it_is_the_larger():
    """Probes on one line (no residual) whose images swap places: the slope's noise shows image by image."""
    epochs = [10, 20, 30, 40]
    strings = ["1100", "0110", "0011", "1001"]  # 50% each time, by different images
    probes = [{"epoch": e, "accuracy": 0.5, "num_val": 4, "correct": c} for e, c in zip(epochs, strings)]
    trend = probe_trend(probes)
    slopes = [stats.linregress(epochs, [int(c[i]) for c in strings]).slope for i in range(4)]
    assert trend.kind == "per-image" and trend.slope == pytest.approx(0.0)
    assert trend.standard_error == pytest.approx(np.std(slopes, ddof=1) / math.sqrt(4))
    # the same accuracies without the per-image results: only the floor of half an image is left
    plain = probe_trend([{k: v for k, v in p.items() if k != "correct"} for p in probes])
    spread = sum((e - 25) ** 2 for e in epochs)
    assert plain.kind == "residual" and plain.standard_error == pytest.approx((0.5 / 4) / math.sqrt(spread))


def test_a_slow_steady_rise_keeps_training():
    """A point every ten epochs (74% at 0), as SupCon's live probe rose on a texture set: never settled, in
    20 runs of it (each probe's wobble drawn anew)."""
    epochs = list(range(10, 310, 10))
    for seed in range(20):
        accuracies, strings = per_image_probes(epochs, lambda e: 0.74 + 0.001 * e, seed=seed)
        rule, fired = run_rule(accuracies, every=10, correct=strings, ceiling=1000)
        assert fired is None and rule.decision is None, seed


def test_a_plateau_stops_once_the_window_holds_only_flat_probes():
    # epochs 5..25 rise to 80%, then stay there. Epoch 55 is the first whose window, the last half of the run
    # (27.5, 55], holds six probes (30-55), all at 80%: no gain at that pace, only the floor of half an image
    curve = [0.55, 0.65, 0.75, 0.78, 0.80] + [0.80] * 25
    rule, fired = run_rule(curve, ceiling=400)
    assert fired == 55
    decision = rule.decision
    assert (decision.epoch, decision.cooldown_epochs, decision.last_epoch) == (55, 11, 66)  # 20% of 55 epochs
    assert decision.best_accuracy == pytest.approx(0.80) and decision.best_epoch == 25
    assert decision.message().startswith("the live probe settled: at its pace over epochs 30-55 (6 probes, +0.0 "
                                         "points), 55 more epochs would add +0.0 points")
    assert "below --plateau-tolerance (3.0)" in decision.message()
    assert decision.message().endswith("cooled down over epochs 56-66; stopped")


@pytest.mark.parametrize("wobble, fires", [(0.0, True), (0.02, False)])
def test_one_standard_error_of_margin_keeps_a_wobbling_slow_rise_training(wobble, fires):
    """Probes every 5 epochs to 60, rising 2 points over the run: doubling it would add 2 points, under the
    3-point tolerance. On a smooth line that settles the run; with 2 points of wobble per probe the pace is
    uncertain by more than the difference, so it trains on."""
    rule = PlateauRule(ceiling=1000)
    # the wobble of the six probes of the window (35-60): up, down, down, down, down, up, which tilts no line
    signs = dict(zip(range(35, 65, 5), [1, -1, -1, -1, -1, 1]))
    for epoch in range(5, 65, 5):
        rule.record_probe(epoch, 0.80 + 0.02 * epoch / 60 + wobble * signs.get(epoch, 0), 200)
    trend = probe_trend([p for p in rule.probes if p["epoch"] > 30])
    assert trend.gain(60) == pytest.approx(0.02)
    assert (rule.check(60) is not None) == fires


def test_the_ceiling_forces_a_cooldown_that_ends_on_it():
    rule, fired = run_rule([0.50 + 0.02 * i for i in range(30)], ceiling=60)
    # 60 = 50 + ceil(0.2 x 50): the last start from which the cool-down ends by epoch 60
    assert rule.latest_start == 50 and fired == 50
    assert rule.decision.last_epoch == 60 and rule.decision.reason.startswith("reached epoch 50")


def test_still_rising_names_a_finished_run_that_had_not_settled():
    epochs = list(range(10, 210, 10))
    rising, rising_strings = per_image_probes(epochs, lambda e: 0.70 + 0.001 * e)
    probes = [{"epoch": e, "accuracy": a, "num_val": 200, "correct": c}
              for e, a, c in zip(epochs, rising, rising_strings)]
    trend = still_rising(probes, 200)
    assert trend is not None and trend.first_epoch == 110 and trend.gain(200) > 0.1  # a point per ten epochs
    flat = [{"epoch": e, "accuracy": 0.85 + (0.01 if i % 2 else -0.01), "num_val": 200}
            for i, e in enumerate(epochs)]
    assert still_rising(flat, 200) is None


def test_the_decision_survives_a_resume_through_its_state():
    epochs = list(range(5, 205, 5))
    curve, strings = per_image_probes(epochs, lambda e: min(0.60 + 0.004 * e, 0.85))
    uninterrupted, fired = run_rule(curve, correct=strings, ceiling=400)
    assert fired is not None
    half = PlateauRule(ceiling=400)
    cut = epochs.index(fired) // 2
    for epoch, accuracy, correct in zip(epochs[:cut], curve[:cut], strings[:cut]):
        half.record_probe(epoch, accuracy, 200, correct)
        assert half.check(epoch) is None
    resumed = PlateauRule(ceiling=400)
    resumed.load_state_dict(half.state_dict())
    for epoch, accuracy, correct in zip(epochs[cut:], curve[cut:], strings[cut:]):
        resumed.record_probe(epoch, accuracy, 200, correct)
        if resumed.check(epoch) is not None:
            break
    assert resumed.decision == uninterrupted.decision and fired == resumed.decision.epoch
