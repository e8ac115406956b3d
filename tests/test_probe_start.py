"""``--from auto`` on synthetic loss curves with known plateaus."""

import math

import numpy as np
import pytest

from linear_probe.probe_start import choose_from_epoch, choose_from_run, smooth
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


def test_the_live_probe_replaces_the_knn_curve_and_starts_where_it_reaches_its_best_within_noise():
    epochs = list(range(1, 101))
    losses = [1 + 4 * math.exp(-e / 40) for e in epochs]  # the loss plateau comes late (about epoch 100)
    probe = [None] * 100
    # 400 val images: one standard error at 90% is 1.5 points; epoch 30 (89%) is the first within it of 90%
    for epoch, accuracy in [(10, 0.70), (20, 0.85), (30, 0.89), (40, 0.90), (50, 0.895), (60, 0.90)]:
        probe[epoch - 1] = accuracy
    knn = [None] * 100
    knn[4], knn[9] = 0.5, 0.9  # a kNN curve that would say epoch 10: ignored when the probe is there
    chosen = choose_from_epoch(epochs, losses, knn=knn, probe=probe, probe_num_val=400)
    assert chosen.epoch == 30 and chosen.knn_epoch == 30
    assert "live probe's val accuracy is within one standard error of its best from epoch 30" in chosen.reason
    without = choose_from_epoch(epochs, losses, knn=knn)
    assert without.knn_epoch == 10


def test_after_until_plateau_probe_all_starts_where_the_run_found_its_plateau(tmp_path):
    """A run's metrics.csv as supcon-train --until plateau writes it (probe columns, the val set size)."""
    import csv

    rows = []
    for epoch in range(1, 13):
        accuracy = min(0.5 + 0.05 * epoch, 0.8) if epoch % 2 == 0 else None
        rows.append({"epoch": epoch, "loss": 5 - 0.1 * epoch, "probe_accuracy": accuracy,
                     "probe_num_val": 200 if accuracy is not None else None})
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "loss", "probe_accuracy", "probe_num_val"])
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    chosen = choose_from_run(tmp_path)
    # probes 60% (epoch 2), 70% (4), 80% (6, 8, 10, 12); one standard error at 80% on 200 images is 2.8 points
    assert chosen.epoch == 6
