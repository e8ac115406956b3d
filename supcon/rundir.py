"""The run directory: the contract between supcon-train, probe-all and check-accuracies.

Layout of a SupCon run::

    RUN/config.yaml            every resolved option + run_info (classes, mean/std, versions, ...)
    RUN/ckpt_epoch_<N>.pth     every --save-freq epochs and at the final epoch
    RUN/last.pth               the newest state (every epoch, and on SIGTERM/Ctrl-C mid-epoch)
    RUN/metrics.csv            one row per epoch (loss, collapsed level, spread, kNN accuracy, lr, ...)
    RUN/tensorboard/           TensorBoard events
    RUN/probe/                 written by probe-all
    RUN/test_metrics.json      written by check-accuracies
"""

from __future__ import annotations

import csv
import io
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from supcon.checkpoint import atomic_write_text
from supcon.errors import UserError
from supcon.runlock import LOCK_FILE

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
#: Every unreadable image found by the image check (``path<TAB>reason``); not run content by itself.
BAD_IMAGES_FILE = "bad_images.txt"
RUN_INFO_KEY = "run_info"
DEFAULT_RUNS_ROOT = "runs"
_CKPT_RE = re.compile(r"^ckpt_epoch_(\d+)\.pth$")


def default_run_dir(model: str, batch_size: int, root: str = DEFAULT_RUNS_ROOT) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{model}_bs{batch_size}_{stamp}"


def epoch_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{backbone_epoch: path}`` of the ``ckpt_epoch_<N>.pth`` files of a run, sorted by epoch."""
    run_dir = Path(run_dir)
    found = {}
    for path in run_dir.glob("ckpt_epoch_*.pth"):
        match = _CKPT_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def has_run_content(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds anything but a refused start's list of unreadable images, or a lock file."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(p.name not in (BAD_IMAGES_FILE, LOCK_FILE) for p in run_dir.iterdir())


def write_config(run_dir: str | os.PathLike, config: dict[str, Any], run_info: dict[str, Any]) -> None:
    """Write ``config.yaml`` (atomically): the resolved options, then ``run_info``."""
    text = yaml.safe_dump({**config, RUN_INFO_KEY: run_info}, sort_keys=False)
    atomic_write_text(text, Path(run_dir) / CONFIG_FILE)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run's ``config.yaml``.

    Raises:
        UserError: no config.yaml (not a run directory) or unreadable.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML")
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a mapping")
    return data


def find_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> list[Path]:
    """Run directories (holding a config.yaml) directly under ``root``, oldest first by modification time."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / CONFIG_FILE).is_file()]
    return sorted(runs, key=lambda p: ((p / CONFIG_FILE).stat().st_mtime, p.name))


def latest_run(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> Path:
    """The most recent run under ``root``.

    Raises:
        UserError: no run found.
    """
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no run found under {Path(root).resolve()} (train one with supcon-train, or pass --run DIR)")
    return runs[-1]


class MetricsCSV:
    """A per-epoch CSV beside the TensorBoard events; rows after a resumed epoch are dropped."""

    def __init__(self, path: str | os.PathLike, fields: list[str]):
        self.path = Path(path)
        self.fields = fields

    def truncate_after(self, epoch: int) -> None:
        """Keep only rows with ``epoch <= epoch`` (a resumed run rewrites what came after)."""
        rows = self.read()
        kept = [r for r in rows if int(float(r["epoch"])) <= epoch]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(buffer.getvalue(), self.path)

    def read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.fields})
            f.flush()


def open_run_outputs(run_dir: Path, config: dict[str, Any], run_info: dict[str, Any], metric_fields: list[str],
                     start_epoch: int, is_main: bool):
    """Create the run dir, write ``config.yaml``, and open the per-epoch CSV and TensorBoard writer.

    On resume (``start_epoch > 0``) rows and events after ``start_epoch`` are dropped, so a crashed
    epoch is not logged twice. Only the main process writes; the others get ``(csv, None)``.

    Returns:
        ``(MetricsCSV, SummaryWriter | None)``.
    """
    metrics_csv = MetricsCSV(Path(run_dir) / METRICS_FILE, metric_fields)
    if not is_main:
        return metrics_csv, None
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config, run_info)
    metrics_csv.truncate_after(start_epoch)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)
    return metrics_csv, writer
