"""A grid of baselines in one command: optimizer x learning rate (x momentum) x seed.

Layout of a grid directory::

    GRID/grid.yaml                 the grid's options (lists) and its cells
    GRID/<cell>_seed<S>/           one ordinary baseline run per cell and seed (+ grid_result.json when done)
    GRID/grid_results.csv          one row per finished run: test loss/accuracy/AUC/F1, best epoch, ...
    GRID/grid_summary.csv / .md    one row per cell: mean and spread (sample std) over the seeds

Each run is evaluated once, after training, with its best-by-validation weights on the test folder.
Re-running with ``--resume`` skips finished runs (those with ``grid_result.json``), resumes an
interrupted one from its ``last.pth`` and starts the rest.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from supcon.baseline.config import RUNTIME_KEYS, BaselineConfig, expand_grid
from supcon.baseline.data import prepare_data
from supcon.baseline.epoch import NonFiniteLoss
from supcon.baseline.evaluate import predict_run
from supcon.baseline.models import model_family
from supcon.baseline.train import train
from supcon.checkpoint import atomic_write_text
from supcon.config import config_differences, load_yaml, to_yaml_dict
from supcon.data import scan_image_folder
from supcon.distributed import is_main_process
from supcon.engine import RunEngine
from supcon.errors import UserError
from supcon.interrupt import EXIT_SIGINT, EXIT_SIGTERM
from supcon.launch import launched_world_size
from supcon.metrics import classification_metrics
from supcon.processes import default_precision
from supcon.rundir import BEST, LAST, default_run_dir, find_split_folder, has_run_content, load_baseline_checkpoint

logger = logging.getLogger(__name__)

GRID_FILE = "grid.yaml"
CELL_RESULT = "grid_result.json"
RESULTS_CSV = "grid_results.csv"
SUMMARY_CSV = "grid_summary.csv"
SUMMARY_MD = "grid_summary.md"
RESULT_FIELDS = ["run", "status", "optimizer", "learning_rate", "momentum", "betas", "seed", "batch_size", "epochs_run",
                 "best_epoch", "val_accuracy", "test_loss", "test_accuracy", "test_auc", "test_f1"]
SUMMARY_METRICS = ["epochs_run", "best_epoch", "test_loss", "test_accuracy", "test_auc", "test_f1"]


def cell_name(cell: BaselineConfig) -> str:
    """Folder name of one run, e.g. ``sgd_lr0.0001_m0.9_seed0`` or ``adam_lr1e-05_seed2``."""
    momentum = f"_m{cell.momentum:g}" if cell.optimizer == "sgd" else ""
    return f"{cell.optimizer}_lr{cell.learning_rate:g}{momentum}_seed{cell.seed}"


def _cell_key(row: dict[str, Any]) -> tuple:
    return row["optimizer"], row["learning_rate"], row["momentum"], row["betas"]


@dataclass
class GridResult:
    grid_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    cells_total: int = 0
    interrupted_by: int | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is None:
            return 0
        return EXIT_SIGINT if self.interrupted_by == signal.SIGINT else EXIT_SIGTERM


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are left out."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, learning rate, momentum or betas) cell: ``<metric>_mean`` / ``_std`` over seeds."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(_cell_key(row), []).append(row)
    summary = []
    for (optimizer, rate, momentum, betas), members in cells.items():
        entry: dict[str, Any] = {"optimizer": optimizer, "learning_rate": rate, "momentum": momentum, "betas": betas,
                                 "batch_size": members[0]["batch_size"], "seeds": len(members),
                                 "diverged": sum(m.get("status") == "diverged" for m in members)}
        for metric in SUMMARY_METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _spread([m[metric] for m in members])
        summary.append(entry)
    return summary


def _pm(mean: float, std: float, seeds: int, digits: int = 4) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if seeds < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """The experiment notes' table: Optimizer | LR | Momentum | Epochs (best) | Batch | Test loss/acc | AUC | F1."""
    lines = ["| Optimizer | LR | Momentum | Epochs (best) | Batch | Test loss | Test acc | AUC | F1 | Seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        momentum = f"{s['momentum']:g}" if s["momentum"] is not None else f"betas {s['betas']}"
        epochs = "n/a" if math.isnan(s["best_epoch_mean"]) else (
            f"{s['epochs_run_mean']:g} ({_pm(s['best_epoch_mean'], s['best_epoch_std'], s['seeds'], 1)})")
        cells = [s["optimizer"], f"{s['learning_rate']:g}", momentum, epochs, str(s["batch_size"])]
        cells += [_pm(s[f"{m}_mean"], s[f"{m}_std"], s["seeds"]) for m in ("test_loss", "test_accuracy", "test_auc",
                                                                           "test_f1")]
        cells.append(f"{s['seeds']} ({s['diverged']} diverged)" if s["diverged"] else str(s["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and math.isnan(row[k]))
                             else row[k]) for k in fields})
    return buffer.getvalue()


def write_tables(grid_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the per-run CSV and the per-cell summary (CSV + markdown); returns the summary."""
    summary = summarize(rows)
    atomic_write_text(_csv_text(rows, RESULT_FIELDS), grid_dir / RESULTS_CSV)
    summary_fields = ["optimizer", "learning_rate", "momentum", "betas", "batch_size", "seeds", "diverged"] + [
        f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
    atomic_write_text(_csv_text(summary, summary_fields), grid_dir / SUMMARY_CSV)
    atomic_write_text(summary_markdown(summary), grid_dir / SUMMARY_MD)
    return summary


def _check_grid_dir(grid_dir: Path, config: BaselineConfig, grid_options: dict[str, Any]) -> None:
    if not config.resume:
        if has_run_content(grid_dir):
            raise UserError(f"grid dir {grid_dir} already exists and is not empty; pass --resume to continue it, "
                            "or choose another --run-dir")
        return
    if (grid_dir / GRID_FILE).is_file():
        stored = load_yaml(grid_dir / GRID_FILE).get("options", {})
        diffs = config_differences(stored, grid_options, ignore=RUNTIME_KEYS - {"seeds"})
        if diffs:
            details = ", ".join(f"{k}: grid has {stored.get(k)!r}, now {grid_options.get(k)!r}" for k in diffs[:4])
            raise UserError(f"grid dir {grid_dir} was started with a different configuration ({details})")


def _test_cell(cell: BaselineConfig, run_dir: Path, status: str, test_folder: str | None) -> dict[str, Any]:
    """The grid row of a trained run: its best-by-validation network on the test folder.

    A diverged run is tested with the best checkpoint it wrote before diverging, if any.
    """
    row = {"run": run_dir.name, "status": status, "optimizer": cell.optimizer,
           "learning_rate": float(cell.learning_rate),
           "momentum": float(cell.momentum) if cell.optimizer == "sgd" else None,
           "betas": ",".join(f"{b:g}" for b in cell.betas) if cell.optimizer != "sgd" else None,
           "seed": cell.seed, "batch_size": cell.batch_size, "epochs_run": None, "best_epoch": None,
           "val_accuracy": None, "test_loss": math.nan, "test_accuracy": math.nan, "test_auc": math.nan,
           "test_f1": math.nan}
    if (run_dir / LAST).is_file():
        row["epochs_run"] = int(load_baseline_checkpoint(run_dir / LAST)["epoch"])
    if not (run_dir / BEST).is_file():
        return row
    prediction = predict_run(run_dir, test_folder=test_folder, num_workers=cell.num_workers)
    metrics = classification_metrics(prediction["labels"], prediction["probabilities"]).summary()
    row.update(best_epoch=prediction["selected_epoch"], val_accuracy=prediction["val_accuracy"],
               test_loss=metrics["loss"], test_accuracy=metrics["accuracy"], test_auc=metrics["auc"],
               test_f1=metrics["f1"])
    return row


def run_grid(config: BaselineConfig, progress: bool = True) -> GridResult:
    """Train and test every cell of the grid (resumable); returns the rows and the summary.

    Raises:
        UserError: bad options or input (before anything is written), no test folder, a grid
            directory that holds a different grid.
    """
    cells = expand_grid(config)
    for cell in cells:
        cell.validate()  # option errors (any cell) before anything else
    first = cells[0]
    model_family(first.model)
    index = scan_image_folder(first.data_folder, "data folder", allow_split_names=first.allow_split_class_names)
    if find_split_folder("test", config.test_folder, index.root) is None:
        sibling_test = Path(index.root).resolve().parent / "test"
        raise UserError(f"the grid reports test metrics: give --test-folder, or put a 'test' folder beside the "
                        f"data folder ({sibling_test} does not exist)")
    if config.resume and not config.run_dir:
        raise UserError("--resume needs --run-dir (the grid to continue)")
    if launched_world_size() > 1 and not config.run_dir:
        raise UserError("a grid under several processes needs --run-dir (so that every process uses the same one)")
    main_process = is_main_process()
    grid_dir = Path(config.run_dir) if config.run_dir else default_run_dir(f"{first.model}_baseline_grid",
                                                                            first.batch_size)
    grid_options = {**to_yaml_dict(first), "run_dir": str(grid_dir)}
    for name in ("optimizer", "learning_rate", "momentum", "seed"):  # the axes, as parsed values
        grid_options[name] = list(dict.fromkeys(getattr(c, name) for c in cells))
    grid_options["seeds"] = grid_options.pop("seed")
    _check_grid_dir(grid_dir, config, grid_options)
    # Check the images (and compute mean/std) once for all runs: they share the folders and the split.
    data = prepare_data(first, RunEngine(first.precision or default_precision(), progress), grid_dir)

    result = GridResult(grid_dir=grid_dir, cells_total=len(cells))
    logger.info("grid of %d runs in %s", len(cells), grid_dir)
    for number, cell in enumerate(cells, start=1):
        run_dir = grid_dir / cell_name(cell)
        done_file = run_dir / CELL_RESULT
        if done_file.is_file():
            result.rows.append(json.loads(done_file.read_text()))
            logger.info("[%d/%d] %s: finished earlier, skipped", number, len(cells), run_dir.name)
            continue
        logger.info("[%d/%d] %s", number, len(cells), run_dir.name)
        try:
            run = train(replace(cell, run_dir=str(run_dir), resume=True), progress=progress, data=data)
            status = "early-stopped" if run.stopped_early else "done"
        except NonFiniteLoss as exc:  # one diverging learning rate must not end the grid
            logger.warning("[%d/%d] %s: %s", number, len(cells), run_dir.name, exc)
            run, status = None, "diverged"
        if main_process and not (grid_dir / GRID_FILE).is_file():
            atomic_write_text(yaml.safe_dump({"options": grid_options,
                                              "runs": [cell_name(c) for c in cells]}, sort_keys=False),
                              grid_dir / GRID_FILE)
        if run is not None and run.interrupted_by is not None:
            result.interrupted_by = run.interrupted_by
            break
        row = _test_cell(cell, run_dir, status, config.test_folder)
        result.rows.append(row)
        logger.info("[%d/%d] %s: %s, best epoch %s, test accuracy %.4f", number, len(cells), run_dir.name, status,
                    row["best_epoch"], row["test_accuracy"])
        if main_process:
            atomic_write_text(json.dumps(row, indent=2), done_file)
            write_tables(grid_dir, result.rows)
    result.summary = summarize(result.rows)
    if main_process and result.rows:
        write_tables(grid_dir, result.rows)
    if result.interrupted_by is not None:
        logger.warning("grid interrupted after %d of %d runs; continue with --resume --run-dir %s",
                       len(result.rows), len(cells), grid_dir)
    return result
