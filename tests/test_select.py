"""Selection of a run's (checkpoint, head) from validation results: the within-noise default and max-val-acc."""

import dataclasses

import numpy as np
import pytest
from scipy.stats import norm

from linear_probe.heads import HeadRecord
from linear_probe.select import MAX_VAL_ACC, TREND, WITHIN_NOISE, select, select_best
from supcon.checkpoint import FileStamp


def select_max(records):
    return select_best(records, MAX_VAL_ACC)


def record(checkpoint="ckpt_epoch_10.pth", epoch=10, accuracy=0.9, loss=0.3, head_epoch=50, steps=0, key="k"):
    return HeadRecord(
        checkpoint=checkpoint, checkpoint_stamp=FileStamp("0" * 64, 1, 1), backbone_epoch=epoch,
        steps_into_epoch=steps, best_val_accuracy=accuracy, best_head_epoch=head_epoch, best_val_loss=loss,
        settings={}, settings_key=key, class_names=["a", "b"], val_folder="v", train_folder="t", num_train=1,
        num_val=1, feature_dim=4,
    )


def test_highest_val_accuracy_wins_whatever_the_loss():
    best = select_max([record(epoch=10, accuracy=0.90, loss=0.1), record(epoch=20, accuracy=0.91, loss=0.9)])
    assert best.backbone_epoch == 20


def test_tie_on_accuracy_goes_to_lower_val_loss():
    best = select_max([record(epoch=30, accuracy=0.9, loss=0.40), record(epoch=10, accuracy=0.9, loss=0.20),
                        record(epoch=20, accuracy=0.9, loss=0.30)])
    assert best.backbone_epoch == 10


def test_tie_on_accuracy_and_loss_goes_to_later_backbone_state():
    later_mid_epoch = record(checkpoint="last.pth", epoch=20, steps=3)
    best = select_max([record(epoch=10), record(checkpoint="ckpt_epoch_20.pth", epoch=20), later_mid_epoch])
    assert best is later_mid_epoch


def test_then_earlier_head_epoch_then_name():
    a, b = record(head_epoch=40), record(head_epoch=7)
    assert select_max([a, b]) is b
    c, d = record(key="aaa"), record(key="bbb")
    assert select_max([c, d]) is d and select_max([d, c]) is d  # order of the input does not matter


def test_selection_uses_nothing_but_validation_fields():
    """Changing every field but the validation results and positions cannot change the choice."""
    cases = [(10, 0.8, 0.5), (20, 0.95, 0.2), (30, 0.9, 0.1)]
    records = [record(epoch=epoch, accuracy=accuracy, loss=loss) for epoch, accuracy, loss in cases]
    best = select_max(records)
    shuffled = [dataclasses.replace(r, val_folder="elsewhere", num_val=99, settings={"x": 1})
                for r in records[::-1]]
    assert select_max(shuffled).backbone_epoch == best.backbone_epoch == 20


def test_no_records_is_an_error():
    with pytest.raises(ValueError):
        select_max([])


# --- the default rule: within-noise -------------------------------------------------------------------------------


def curve_record(epoch, accuracies, losses, num_val=359):
    """A probe record with per-head-epoch val curves (best head epoch = first maximum, as probe-all keeps)."""
    best = int(np.argmax(accuracies))
    return dataclasses.replace(
        record(checkpoint=f"ckpt_epoch_{epoch}.pth", epoch=epoch, accuracy=float(accuracies[best]),
               loss=float(losses[best]), head_epoch=best + 1),
        num_val=num_val, val_accuracy_per_epoch=[float(a) for a in accuracies],
        val_loss_per_epoch=[float(v) for v in losses])


def test_within_noise_scores_the_settled_head_not_its_luckiest_epoch():
    lucky = curve_record(10, [0.90, 0.99, 0.90, 0.90, 0.90, 0.90, 0.90, 0.90, 0.90, 0.90], [0.3] * 10, num_val=1000)
    steady = curve_record(20, [0.95] * 10, [0.3] * 10, num_val=1000)
    assert select_max([lucky, steady]) is lucky  # 99% once, at head epoch 2
    assert select_best([lucky, steady], WITHIN_NOISE) is steady  # settled: 95% vs 90%, 5 points apart on 1,000 images


def test_within_noise_takes_the_lowest_val_loss_among_the_indistinguishable():
    # 359 val images at 99%: a 95% interval is about +-1 point, so 98.6-99.4% are one group
    a = curve_record(10, [0.994] * 10, [0.050] * 10)
    b = curve_record(20, [0.989] * 10, [0.030] * 10)
    c = curve_record(30, [0.960] * 10, [0.010] * 10)  # lowest loss, but 3.4 points below: resolvably worse
    selection = select([a, b, c], WITHIN_NOISE)
    assert selection.record is b
    assert [r.backbone_epoch for r in selection.within_noise] == [10, 20]
    note = selection.note()
    assert "3 probed checkpoints span 3.40 points" in note and "359 val images" in note
    assert "2 are within that noise of the best" in note and "backbone epoch 20" in note


def test_within_noise_with_everything_equal_goes_to_the_later_backbone():
    records = [curve_record(epoch, [0.9] * 5, [0.2] * 5) for epoch in (5, 15, 10)]
    assert select_best(records, WITHIN_NOISE).backbone_epoch == 15


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown selection rule"):
        select([record()], "best-test")


def simulated_probe(rng, true_accuracies, num_val=359, head_epochs=10, checkpoint_noise=0.5, epoch_noise=0.15,
                    per_image=True):
    """Probe records of one simulated run: every checkpoint's head validated on the same val images.

    Image i is classified correctly by checkpoint c at head epoch e when its margin
    ``threshold_c - (hardness_i + own_ci + jitter_cei) > 0``: hardness is shared by every checkpoint (the same
    val images), ``own`` is the checkpoint's own view of them, ``jitter`` the head's epoch-to-epoch wobble
    (larger while the cosine learning rate is high). The val loss is the mean logistic loss of the margins.
    Thresholds make checkpoint c's expected accuracy ``true_accuracies[c]``. ``per_image``: record each
    final head's result per val image (as probe-all does), else leave it out (as in older head files).
    """
    hardness = rng.normal(size=num_val)
    spread = np.sqrt(1 + checkpoint_noise ** 2)
    learning_rate = 0.5 * (1 + np.cos(np.pi * np.arange(head_epochs) / head_epochs))[:, None]
    records = []
    for c, true in enumerate(true_accuracies):
        threshold = norm.ppf(true) * spread
        own = rng.normal(0, checkpoint_noise, num_val)
        jitter = rng.normal(0, 1, (head_epochs, num_val)) * epoch_noise * (0.3 + learning_rate)
        margins = threshold - (hardness + own + jitter)
        simulated = curve_record(5 * (c + 1), (margins > 0).mean(1), np.logaddexp(0, -3 * margins).mean(1), num_val)
        if per_image:
            simulated.final_val_correct = "".join("1" if m > 0 else "0" for m in margins[-1])
        records.append(simulated)
    return records


@pytest.mark.parametrize("shape", ["plateau", "peak"])
def test_within_noise_picks_truer_checkpoints_than_max_val_acc_on_noisy_curves(shape):
    """Over simulated runs, the default's choice is on average closer to the truly best checkpoint.

    plateau: rises to 99% and stays (what ``--from auto`` leaves to probe); peak: best in the middle,
    1.2 points lower at both ends. The regret is the true accuracy of the best checkpoint minus the
    chosen one's.
    """
    epochs = np.arange(11)
    true = (0.975 + 0.015 * (1 - np.exp(-epochs / 3)) if shape == "plateau"
            else 0.985 - 0.012 * ((epochs - 6) / 5) ** 2)
    rng = np.random.default_rng(0)
    regret = {WITHIN_NOISE: [], MAX_VAL_ACC: []}
    for _ in range(150):
        records = simulated_probe(rng, true)
        for rule in regret:
            regret[rule].append(true.max() - true[select_best(records, rule).backbone_epoch // 5 - 1])
    assert np.mean(regret[WITHIN_NOISE]) < np.mean(regret[MAX_VAL_ACC])


# --- the default rule: trend -----------------------------------------------------------------------------------------


def settled_curve(epochs, accuracies, losses, num_val=200):
    """One record per checkpoint whose every head epoch has the given val accuracy and loss."""
    return [curve_record(epoch, [accuracy] * 10, [loss] * 10, num_val)
            for epoch, accuracy, loss in zip(epochs, accuracies, losses, strict=True)]


def test_trend_takes_a_late_checkpoint_of_a_rising_curve_where_within_noise_takes_an_early_one():
    """The issue's run: settled val accuracy rises from 65% to 78% on 200 val images (about +-6 points of
    noise), and the early checkpoints' heads have the lower val loss; within-noise took epoch 15."""
    epochs = list(range(5, 65, 5))
    accuracies = [0.65, 0.70, 0.72, 0.73, 0.74, 0.75, 0.75, 0.76, 0.77, 0.78, 0.78, 0.78]
    losses = [0.80, 0.72, 0.70, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79]
    records = settled_curve(epochs, accuracies, losses)
    assert select_best(records, WITHIN_NOISE).backbone_epoch <= 20
    selection = select(records, TREND)
    assert selection.record.backbone_epoch == 60
    assert select(records).rule == TREND  # the default


def test_trend_takes_the_peak_region_of_a_falling_curve():
    epochs = list(range(5, 65, 5))
    accuracies = [0.70, 0.80, 0.88, 0.90, 0.89, 0.86, 0.82, 0.78, 0.75, 0.72, 0.70, 0.68]
    selection = select(settled_curve(epochs, accuracies, [0.5] * 12), TREND)
    assert 15 <= selection.record.backbone_epoch <= 30  # around the peak at 20, not the fallen end
    assert selection.advice() is None


def test_trend_is_not_moved_by_one_lucky_checkpoint():
    """A single checkpoint 6 points (two standard errors) above the rest of a flat curve is smoothed away."""
    accuracies = [0.80, 0.80, 0.86, 0.80, 0.80, 0.80, 0.80, 0.80]
    records = settled_curve(list(range(10, 90, 10)), accuracies, [0.5] * 8)
    assert select_max(records).backbone_epoch == 30
    assert select_best(records, TREND).backbone_epoch == 80


def test_trend_says_when_the_curve_still_rises_at_the_last_checkpoint():
    epochs = list(range(5, 65, 5))
    rising = settled_curve(epochs, [0.60 + 0.015 * i for i in range(12)], [0.5] * 12)
    advice = select(rising, TREND).advice()
    assert advice is not None and advice.startswith("still improving at epoch 60")
    assert "train longer" in advice
    plateau = settled_curve(epochs, [0.60, 0.70, 0.75, 0.78] + [0.80, 0.79, 0.80, 0.80, 0.79, 0.80, 0.80, 0.80],
                            [0.5] * 12)
    assert select(plateau, TREND).advice() is None
    short = settled_curve([5, 10], [0.6, 0.8], [0.5, 0.5])
    assert select(short, TREND).advice() is None  # two checkpoints tell no trend


def test_trend_smooths_each_probe_setting_on_its_own_curve():
    """Heads of other probe settings are not neighbours: a second settings key does not blur the first."""
    a = settled_curve([10, 20, 30], [0.70, 0.80, 0.90], [0.5] * 3)
    b = [dataclasses.replace(r, settings_key="other") for r in settled_curve([10, 20, 30], [0.5] * 3, [0.5] * 3)]
    from linear_probe.select import smoothed_scores

    smoothed = smoothed_scores(a + b)
    assert smoothed["ckpt_epoch_30.pth__k"] == pytest.approx(0.85)
    assert smoothed["ckpt_epoch_20.pth__other"] == pytest.approx(0.5)


SHAPES = {  # true accuracy of 12 checkpoints
    "rising": lambda e: 0.65 + 0.13 * e / 11,
    "plateau": lambda e: 0.80 - 0.10 * np.exp(-e / 2),
    "falling": lambda e: 0.85 - 0.12 * ((e - 3) / 8) ** 2,
}


def regrets(shape, rules, runs=120, num_val=200, seed=0):
    """Mean regret (true accuracy of the truly best checkpoint minus the chosen one's) of each rule."""
    epochs = np.arange(12)
    true = np.array([SHAPES[shape](e) for e in epochs])
    rng = np.random.default_rng(seed)
    out = {rule: [] for rule in rules}
    for _ in range(runs):
        records = simulated_probe(rng, true, num_val=num_val)
        for rule in rules:
            out[rule].append(true.max() - true[select_best(records, rule).backbone_epoch // 5 - 1])
    return {rule: float(np.mean(v)) for rule, v in out.items()}


def test_trend_beats_the_other_rules_on_simulated_rising_curves():
    mean = regrets("rising", (TREND, WITHIN_NOISE, MAX_VAL_ACC))
    assert mean[TREND] < mean[WITHIN_NOISE] and mean[TREND] < mean[MAX_VAL_ACC]
    assert mean[TREND] < 0.01  # within a point of the truly best checkpoint on average


def test_trend_is_no_worse_than_the_other_rules_on_simulated_plateaus():
    mean = regrets("plateau", (TREND, WITHIN_NOISE, MAX_VAL_ACC))
    assert mean[TREND] <= mean[WITHIN_NOISE] and mean[TREND] <= mean[MAX_VAL_ACC]


def test_trend_stays_within_one_standard_error_of_the_peak_of_simulated_falling_curves():
    """The price of preferring later checkpoints: on a curve that falls after its peak (85% -> 73%) the rule may
    take a checkpoint past the peak, but on average less than one standard error of the peak's accuracy."""
    mean = regrets("falling", (TREND,))
    assert mean[TREND] < np.sqrt(0.85 * 0.15 / 200)
