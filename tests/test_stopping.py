"""The ``--until plateau`` rule on scripted probe and loss curves."""

from __future__ import annotations

import math

import pytest

from supcon.stopping import PlateauRule, accuracy_standard_error


def run_rule(accuracies, losses=None, every=5, num_val=200, **kwargs):
    """Feed the rule a probe every ``every`` epochs; returns (rule, the epoch it fired at or None)."""
    rule = PlateauRule(**kwargs)
    for i, accuracy in enumerate(accuracies):
        epoch = every * (i + 1)
        for e in range(epoch - every + 1, epoch + 1):
            rule.record_loss(e, losses(e) if losses else 5.0 - 0.01 * min(e, 20))
        rule.record_probe(epoch, accuracy, num_val)
        if rule.check(epoch) is not None:
            return rule, epoch
    return rule, None


def test_a_rising_curve_never_stops_early():
    rule, fired = run_rule([0.50 + 0.02 * i for i in range(20)], ceiling=400)
    assert fired is None and rule.decision is None


def test_a_plateau_stops_after_the_patience_window_with_a_cooldown_of_its_share():
    # rises by 5-10 points per probe to 75% at epoch 15, then within a point or two of 80%; 200 val images
    curve = [0.55, 0.65, 0.75, 0.77, 0.79, 0.80, 0.79, 0.80] + [0.80] * 12
    rule, fired = run_rule(curve, ceiling=400)
    # the loss falls until epoch 20, so epochs up to 30 keep training on the loss alone. Epoch 35: window (21, 35],
    # best before it 77% (epoch 20), one standard error 2.98 points: 80% at 30 is 3 points up, an improvement;
    # likewise epoch 40. Epoch 45: window (27, 45], best before it 79% (epoch 25), 2.88 points: nothing above 81.9%.
    assert fired == 45
    decision = rule.decision
    assert (decision.epoch, decision.cooldown_epochs, decision.last_epoch) == (45, 9, 54)  # 20% of 45 epochs
    assert decision.best_accuracy == pytest.approx(0.80) and decision.best_epoch == 30
    assert decision.message().startswith("no live probe of the last 40% of the run beat epoch 25's 79.0% by more "
                                         "than one unpaired standard error (2.9 points")
    assert decision.message().endswith("cooled down over epochs 46-54; stopped")


def test_a_falling_loss_keeps_training_although_the_probe_is_flat():
    rule, fired = run_rule([0.70] * 30, losses=lambda e: 5.0 - 0.01 * e, ceiling=400)  # the loss falls throughout
    assert fired is None
    _, fired = run_rule([0.70] * 30, losses=lambda e: 4.0, ceiling=400)  # the same probes with a flat loss stop
    assert fired == 15  # the first epoch whose window (9, 15] holds two probes and one before it


def test_the_ceiling_forces_a_cooldown_that_ends_on_it():
    rule, fired = run_rule([0.50 + 0.02 * i for i in range(30)], ceiling=60)
    # 60 = 50 + ceil(0.2 x 50): the last start from which the cool-down ends by epoch 60
    assert rule.latest_start == 50 and fired == 50
    assert rule.decision.last_epoch == 60 and rule.decision.reason.startswith("reached epoch 50")


@pytest.mark.parametrize("last, fires", [(0.74, False), (0.72, True)])
def test_noise_is_one_standard_error_of_the_val_set(last, fires):
    """At epoch 35 the window is (21, 35]; the best before it is 70%, whose standard error on 200 images is 3.24
    points: 74% inside the window is an improvement, 72% is not."""
    assert accuracy_standard_error(0.70, 200) == pytest.approx(math.sqrt(0.70 * 0.30 / 200))
    rule = PlateauRule(ceiling=400)
    for epoch, accuracy in zip(range(5, 40, 5), [0.50, 0.60, 0.65, 0.70, 0.70, 0.70, last], strict=True):
        rule.record_probe(epoch, accuracy, 200)
    for epoch in range(1, 36):
        rule.record_loss(epoch, 4.0)
    assert (rule.check(35) is not None) == fires


def test_the_decision_survives_a_resume_through_its_state():
    curve = [0.60, 0.70, 0.75, 0.78, 0.80] + [0.80] * 15
    uninterrupted, fired = run_rule(curve, ceiling=400)
    half = PlateauRule(ceiling=400)
    for i, accuracy in enumerate(curve[:6]):
        epoch = 5 * (i + 1)
        for e in range(epoch - 4, epoch + 1):
            half.record_loss(e, 5.0 - 0.01 * min(e, 20))
        half.record_probe(epoch, accuracy, 200)
        assert half.check(epoch) is None
    resumed = PlateauRule(ceiling=400)
    resumed.load_state_dict(half.state_dict())
    for i, accuracy in enumerate(curve[6:], start=6):
        epoch = 5 * (i + 1)
        for e in range(epoch - 4, epoch + 1):
            resumed.record_loss(e, 5.0 - 0.01 * min(e, 20))
        resumed.record_probe(epoch, accuracy, 200)
        if resumed.check(epoch) is not None:
            break
    assert resumed.decision == uninterrupted.decision and fired == resumed.decision.epoch
