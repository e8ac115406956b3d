"""``--from auto`` on synthetic loss curves with known plateaus."""

import math

import numpy as np
import pytest

from linear_probe.plateau import choose_from_epoch, choose_from_run, smooth
from supcon.errors import UserError


def test_exponential_decay_plateau_matches_closed_form():
    epochs = list(range(1, 501))
    losses = [1 + 4 * math.exp(-e / 50) for e in epochs]
    chosen = choose_from_epoch(epochs, losses, tolerance=0.1)
    # 500 epochs: smoothed over +-5 epochs, which pulls the first point down to 4.7317 (the mean of
    # epochs 1-6), so the range is 3.7315; remaining fall after e ~ 4 exp(-e/50) <= 0.37315
    # =>  e >= 50 ln(4 / 0.37315) = 118.6
    assert chosen.epoch == 119
    assert chosen.knn_epoch is None and "10%" in chosen.reason


def test_step_curve_plateau_is_the_last_step():
    rng = np.random.default_rng(0)
    epochs = list(range(1, 201))
    losses = [(5 if e <= 50 else 3 if e <= 120 else 1) + rng.normal(0, 0.01) for e in epochs]
    assert 121 <= choose_from_epoch(epochs, losses).epoch <= 123


def test_tolerance_moves_the_choice():
    epochs = list(range(1, 501))
    losses = [1 + 4 * math.exp(-e / 50) for e in epochs]
    # at 30%: e >= 50 ln(4 / (0.3 * 3.7315)) = 63.7
    assert choose_from_epoch(epochs, losses, tolerance=0.3).epoch == 64


def test_collapsed_level_is_never_the_plateau():
    # flat at the collapsed level log(2B - 1) for 15 epochs, then learning (as in issue 5's report)
    level = math.log(255)
    epochs = list(range(1, 61))
    losses = [level] * 15 + [level - 0.4 * (1 - math.exp(-(e - 15) / 5)) for e in range(16, 61)]
    chosen = choose_from_epoch(epochs, losses, collapsed=[level] * 60)
    assert chosen.epoch > 15
    # without the collapsed column the same curve also starts later than the flat part, by its falls
    assert choose_from_epoch(epochs, losses).epoch == chosen.epoch


def test_collapsed_throughout_is_an_error():
    level = math.log(255)
    with pytest.raises(UserError, match="collapsed level"):
        choose_from_epoch([1, 2, 3, 4], [level] * 4, collapsed=[level] * 4)


def test_knn_plateau_earlier_than_loss_wins():
    epochs = list(range(1, 501))
    losses = [1 + 4 * math.exp(-e / 50) for e in epochs]
    knn = [None if e % 10 else min(0.9, 0.3 + 0.6 * e / 60) for e in epochs]  # saturates at epoch 60
    chosen = choose_from_epoch(epochs, losses, knn=knn)
    assert chosen.knn_epoch == 60 and chosen.loss_epoch > 100
    assert chosen.epoch == 60 and "kNN" in chosen.reason


def test_flat_knn_is_ignored():
    epochs = list(range(1, 501))
    losses = [1 + 4 * math.exp(-e / 50) for e in epochs]
    chosen = choose_from_epoch(epochs, losses, knn=[1.0] * 500)
    assert chosen.knn_epoch is None and chosen.epoch == chosen.loss_epoch
    assert "not used" in chosen.reason


def test_too_few_epochs_is_an_error():
    with pytest.raises(UserError, match="at least 3 logged epochs"):
        choose_from_epoch([1, 2], [3.0, 2.0])


def test_smooth_is_a_centred_moving_average():
    assert smooth([0, 3, 6, 9], 1) == [1.5, 3, 6, 7.5]
    assert smooth([1, 2], 0) == [1, 2]


def test_reads_the_runs_metrics_csv(tmp_path):
    rows = ["epoch,loss,collapsed_loss,spread,knn_accuracy,lr,images_per_s,epoch_seconds"]
    rows += [f"{e},{1 + 4 * math.exp(-e / 5):.6f},9.0,0.05,,0.1,10,1" for e in range(1, 51)]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    # e >= 5 ln(1 / 0.1) = 11.5 (as above, for a time constant of 5)
    assert 11 <= choose_from_run(tmp_path).epoch <= 13
    with pytest.raises(UserError, match="metrics.csv"):
        choose_from_run(tmp_path / "nowhere")
