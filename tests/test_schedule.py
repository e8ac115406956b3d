"""Learning rate: linear scaling, cosine and step schedules, warm-up (values computed by hand)."""

from __future__ import annotations

import csv

import pytest
import yaml
from click.testing import CliRunner

from supcon.cli import train_command
from supcon.schedule import LRSchedule, linear_scaled_lr
from tests.conftest import write_image_folder


@pytest.mark.parametrize("global_batch,expected", [(32, 0.015625), (64, 0.03125), (256, 0.125), (1024, 0.5),
                                                   (8, 0.00390625)])
def test_linear_scaling_rule(global_batch, expected):
    assert linear_scaled_lr(global_batch) == pytest.approx(expected)


def test_batch_per_process_times_processes_is_the_global_batch():
    # 2 processes of 32 are one global batch of 64
    assert linear_scaled_lr(32 * 2) == pytest.approx(2 * 0.015625)


COSINE = LRSchedule(base_lr=0.5, epochs=100, steps_per_epoch=10, cosine=True, decay_rate=0.1)


def test_cosine_start_middle_end():
    # eta_min = 0.5 * 0.1**3 = 0.0005; lr(epoch) = 0.0005 + 0.4995 * (1 + cos(pi * epoch / 100)) / 2
    assert COSINE.eta_min == pytest.approx(0.0005)
    # epoch 1 (first step): cos(pi / 100) = 0.9995065603657316
    assert COSINE.lr_at(0) == pytest.approx(0.0005 + 0.4995 * (1 + 0.9995065603657316) / 2)
    assert COSINE.lr_at(0) == pytest.approx(0.49987676345)
    # constant within an epoch
    assert COSINE.lr_at(9) == COSINE.lr_at(0)
    # epoch 50 (steps 490..499): cos(pi / 2) = 0
    assert COSINE.lr_at(490) == pytest.approx(0.25025)
    assert COSINE.lr_at(499) == pytest.approx(0.25025)
    # last epoch (100): cos(pi) = -1, i.e. eta_min
    assert COSINE.lr_at(999) == pytest.approx(0.0005)


def test_cosine_is_monotone_non_increasing():
    values = [COSINE.lr_at(step) for step in range(0, 1000, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_decay_start_middle_end():
    schedule = LRSchedule(base_lr=0.5, epochs=100, steps_per_epoch=10, cosine=False, decay_epochs=[30, 60, 90],
                          decay_rate=0.1)
    assert schedule.lr_at(0) == pytest.approx(0.5)
    assert schedule.lr_at(299) == pytest.approx(0.5)  # epoch 30: decays after it
    assert schedule.lr_at(300) == pytest.approx(0.05)  # epoch 31
    assert schedule.lr_at(499) == pytest.approx(0.05)  # epoch 50, the middle
    assert schedule.lr_at(600) == pytest.approx(0.005)  # epoch 61
    assert schedule.lr_at(999) == pytest.approx(0.0005)  # epoch 100


def test_warm_up_rises_linearly_per_step_to_the_epoch_10_value():
    schedule = LRSchedule(base_lr=0.1, epochs=100, steps_per_epoch=10, cosine=False, decay_epochs=[50],
                          warm=True, warm_epochs=10, warmup_from=0.01)
    assert schedule.lr_at(0) == pytest.approx(0.01)
    assert schedule.lr_at(50) == pytest.approx(0.01 + 0.5 * (0.1 - 0.01))  # half-way through 100 warm-up steps
    assert schedule.lr_at(99) == pytest.approx(0.01 + 0.99 * (0.1 - 0.01))
    assert schedule.lr_at(100) == pytest.approx(0.1)  # epoch 11: the schedule itself
    assert schedule.lr_at(500) == pytest.approx(0.01)  # epoch 51, after the decay


def test_warm_up_with_cosine_aims_at_the_cosine_value_of_epoch_10():
    schedule = LRSchedule(base_lr=0.5, epochs=100, steps_per_epoch=10, cosine=True, warm=True, warm_epochs=10,
                          warmup_from=0.01)
    # cos(pi * 10 / 100) = 0.9510565162951535
    warmup_to = 0.0005 + 0.4995 * (1 + 0.9510565162951535) / 2
    assert schedule.lr_at(0) == pytest.approx(0.01)
    assert schedule.lr_at(50) == pytest.approx(0.01 + 0.5 * (warmup_to - 0.01))
    assert schedule.lr_at(99) == pytest.approx(0.01 + 0.99 * (warmup_to - 0.01))
    # cos(pi * 11 / 100) = 0.9408807689542255
    assert schedule.lr_at(100) == pytest.approx(0.0005 + 0.4995 * (1 + 0.9408807689542255) / 2)


def test_no_warm_up_unless_asked():
    schedule = LRSchedule(base_lr=0.1, epochs=100, steps_per_epoch=10, cosine=False)
    assert schedule.lr_at(0) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def big_batch_folder(tmp_path_factory):
    """270 tiny images: enough for one batch above 256."""
    return write_image_folder(tmp_path_factory.mktemp("big_batch") / "train", 90, size=12)


def _one_epoch(folder, run_dir, batch_size):
    args = ["--data-folder", str(folder), "--run-dir", str(run_dir), "--model", "test_resnet", "--small-input",
            "--size", "8", "--batch-size", str(batch_size), "--epochs", "1", "--num-workers", "0",
            "--knn-every", "0", "--quiet"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return result.output, config, rows


def test_warm_up_switches_on_above_batch_256_and_says_so(big_batch_folder, tmp_path):
    output, config, rows = _one_epoch(big_batch_folder, tmp_path / "run", 264)
    assert "global batch 264 > 256: 10-epoch linear warm-up switched on" in output
    assert config["warm"] is True
    assert config["learning_rate"] == pytest.approx(0.5 * 264 / 1024)
    assert float(rows[0]["lr"]) == pytest.approx(0.01)  # the first step of the warm-up


def test_no_automatic_warm_up_at_batch_256(big_batch_folder, tmp_path):
    output, config, rows = _one_epoch(big_batch_folder, tmp_path / "run", 256)
    assert "warm-up" not in output
    assert config["warm"] is False
    assert config["learning_rate"] == pytest.approx(0.125)
    # one epoch of one: the cosine value at epoch 1 of 1 is eta_min = 0.125 * 0.001
    assert float(rows[0]["lr"]) == pytest.approx(0.000125)


WSD = LRSchedule(base_lr=0.4, epochs=20, steps_per_epoch=10, kind="wsd", decay_rate=0.1, cooldown_start=10,
                 cooldown_epochs=10)


def test_wsd_is_constant_then_falls_linearly_per_step_to_eta_min():
    assert WSD.lr_at(0) == pytest.approx(0.4) and WSD.lr_at(99) == pytest.approx(0.4)  # stable: epochs 1-10
    # cool-down over steps 100..199: the first is 1/100 of the way to eta_min = 0.4 * 0.001, the middle half-way
    assert WSD.lr_at(100) == pytest.approx(0.4 + 0.01 * (0.0004 - 0.4))
    assert WSD.lr_at(149) == pytest.approx(0.4 + 0.5 * (0.0004 - 0.4))
    assert WSD.lr_at(199) == pytest.approx(0.0004)
    values = [WSD.lr_at(step) for step in range(200)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_without_a_cooldown_stays_constant_and_one_is_added_later():
    open_ended = LRSchedule(base_lr=0.4, epochs=80, steps_per_epoch=10, kind="wsd", warm=True, warm_epochs=2,
                            warmup_from=0.04)
    assert open_ended.lr_at(0) == pytest.approx(0.04)  # the warm-up aims at the stable rate
    assert open_ended.lr_at(10) == pytest.approx(0.04 + 0.5 * (0.4 - 0.04))
    assert open_ended.lr_at(20) == pytest.approx(0.4) and open_ended.lr_at(799) == pytest.approx(0.4)
    # the run stops improving after epoch 30: a cool-down over 40% of the 30 epochs, epochs 31-42
    cooled = open_ended.with_cooldown(30, LRSchedule.cooldown_length(30, 0.4))
    assert (cooled.cooldown_start, cooled.cooldown_epochs, cooled.epochs) == (30, 12, 42)
    assert cooled.lr_at(299) == pytest.approx(0.4) and cooled.lr_at(419) == pytest.approx(0.0004)
    assert cooled.lr_at(0) == open_ended.lr_at(0)  # the past is unchanged
    assert LRSchedule.cooldown_length(3, 0.1) == 1  # at least one epoch
