"""The grid: one run per optimizer x learning rate x seed, a table per cell, and resuming an interrupted grid."""

from __future__ import annotations

import math
import signal

import pytest
import yaml

import supcon.baseline.grid as grid_module
from supcon.baseline.config import BaselineConfig, expand_grid, is_grid
from supcon.baseline.grid import summarize
from supcon.baseline.train import BaselineResult
from tests.test_baseline_cli import TINY_ARGS, assert_one_line_error, invoke, read_csv, snapshot

GRID_ARGS = [*TINY_ARGS, "--epochs", "1", "--batch-size", "12", "--optimizer", "sgd,adam", "--learning-rate", "0.01",
             "--seeds", "2"]


def test_expand_grid_orders_cells_and_ignores_momentum_for_adam():
    config = BaselineConfig(optimizer="sgd,adam", learning_rate="1e-3, 1e-2", momentum=[0.9, 0.99], seeds=2, seed=5)
    cells = [(c.optimizer, c.learning_rate, c.momentum, c.seed) for c in expand_grid(config)]
    assert len(cells) == 2 * 2 * 2 + 2 * 2  # sgd: lr x momentum x seed; adam: lr x seed
    assert cells[:3] == [("sgd", 1e-3, 0.9, 5), ("sgd", 1e-3, 0.9, 6), ("sgd", 1e-3, 0.99, 5)]
    assert cells[-1] == ("adam", 1e-2, 0.9, 6)
    assert [c.seed for c in expand_grid(BaselineConfig(seeds="0,4,7"))] == [0, 4, 7]
    assert is_grid(BaselineConfig(seeds=1)) and is_grid(BaselineConfig(learning_rate="1e-3,1e-2"))
    assert not is_grid(BaselineConfig(learning_rate="1e-3"))


def test_summary_gives_mean_and_sample_spread_over_seeds():
    rows = [{"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9, "betas": None, "batch_size": 8,
             "epochs_run": 4, "best_epoch": b, "test_loss": 0.5, "test_accuracy": a, "test_auc": auc, "test_f1": 0.5}
            for b, a, auc in [(2, 0.6, 0.8), (4, 0.8, math.nan)]]
    rows.append({**rows[0], "optimizer": "adam", "momentum": None, "betas": "0.9,0.999"})
    summary = summarize(rows)
    assert [(s["optimizer"], s["seeds"]) for s in summary] == [("sgd", 2), ("adam", 1)]
    assert summary[0]["test_accuracy_mean"] == pytest.approx(0.7)
    assert summary[0]["test_accuracy_std"] == pytest.approx(0.1414213562)  # sample std (ddof=1)
    assert summary[0]["best_epoch_mean"] == 3
    assert (summary[0]["test_auc_mean"], summary[0]["test_auc_std"]) == (0.8, 0.0)  # undefined AUCs left out
    assert summary[1]["test_accuracy_std"] == 0.0


def test_grid_writes_one_row_per_cell_and_resumes_where_it_stopped(image_root, tmp_path, monkeypatch):
    grid_dir = tmp_path / "grid"
    args = ["--data-folder", image_root / "train", "--run-dir", grid_dir, *GRID_ARGS]
    real_train = grid_module.train
    trained = []

    def interrupted_at_the_third_run(config, **kwargs):
        trained.append(config.run_dir)
        if len(trained) == 3:  # as if Ctrl-C arrived while the third run trained
            return BaselineResult(run_dir=config.run_dir, epochs_done=0, interrupted_by=signal.SIGINT)
        return real_train(config, **kwargs)

    monkeypatch.setattr(grid_module, "train", interrupted_at_the_third_run)
    result = invoke(args)
    assert result.exit_code == 130, result.output
    assert len(read_csv(grid_dir / "grid_results.csv")) == 2
    finished_before = {name: snapshot(grid_dir / name) for name in ("sgd_lr0.01_m0.9_seed0", "sgd_lr0.01_m0.9_seed1")}

    assert_one_line_error(invoke(args), "already exists", "--resume")  # no silent restart over it
    assert_one_line_error(invoke([*args, "--resume", "--learning-rate", "0.02"]), "different configuration")

    trained.clear()
    monkeypatch.setattr(grid_module, "train", lambda config, **kwargs: trained.append(config.run_dir)
                        or real_train(config, **kwargs))
    result = invoke([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert [p.split("/")[-1] for p in trained] == ["adam_lr0.01_seed0", "adam_lr0.01_seed1"]  # the rest was skipped
    for name, files in finished_before.items():
        assert snapshot(grid_dir / name) == files

    rows = read_csv(grid_dir / "grid_results.csv")  # one row per run
    assert [(r["optimizer"], r["seed"]) for r in rows] == [("sgd", "0"), ("sgd", "1"), ("adam", "0"), ("adam", "1")]
    for row in rows:
        assert 0 <= float(row["test_accuracy"]) <= 1 and float(row["test_loss"]) > 0 and row["best_epoch"] == "1"
    summary = read_csv(grid_dir / "grid_summary.csv")  # one row per cell
    assert [(r["optimizer"], r["learning_rate"], r["seeds"]) for r in summary] == [("sgd", "0.01", "2"),
                                                                                  ("adam", "0.01", "2")]
    table = (grid_dir / "grid_summary.md").read_text().splitlines()
    assert table[0] == "| Optimizer | LR | Momentum | Epochs (best) | Batch | Test loss | Test acc | AUC | F1 | Seeds |"
    assert len(table) == 4 and table[2].startswith("| sgd | 0.01 | 0.9 | 1 (1.0 ± 0.0) | 12 |")
    assert "± " in table[3] and "| adam | 0.01 | betas 0.9,0.999 |" in table[3]
    assert table[2] in result.output  # printed too
    grid_yaml = yaml.safe_load((grid_dir / "grid.yaml").read_text())
    assert len(grid_yaml["runs"]) == 4 and grid_yaml["options"]["optimizer"] == ["sgd", "adam"]
    run_config = yaml.safe_load((grid_dir / "adam_lr0.01_seed1" / "config.yaml").read_text())
    assert (run_config["run_info"]["kind"], run_config["optimizer"], run_config["seed"]) == ("baseline", "adam", 1)


def test_grid_needs_a_test_folder(tmp_path, monkeypatch):
    from tests.conftest import write_image_folder

    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data" / "train", 4)
    assert_one_line_error(invoke(["--data-folder", tmp_path / "data" / "train", *GRID_ARGS]),
                          "the grid reports test metrics")
    assert not (tmp_path / "runs").exists()


def test_a_diverging_learning_rate_is_recorded_and_the_grid_goes_on(image_root, tmp_path):
    grid_dir = tmp_path / "grid"
    result = invoke(["--data-folder", image_root / "train", "--run-dir", grid_dir, *TINY_ARGS, "--epochs", "1",
                     "--batch-size", "12", "--optimizer", "sgd", "--learning-rate", "1e12,0.01"])
    assert result.exit_code == 0, result.output
    rows = read_csv(grid_dir / "grid_results.csv")
    assert [(r["learning_rate"], r["status"]) for r in rows] == [("1000000000000.0", "diverged"), ("0.01", "done")]
    assert rows[0]["test_accuracy"] == "" and float(rows[1]["test_accuracy"]) >= 0
    assert "| sgd | 1e+12 | 0.9 | n/a | 12 | n/a | n/a | n/a | n/a | 1 (1 diverged) |" in (
        grid_dir / "grid_summary.md").read_text()
