"""The run directory: the contract between supcon-train, baseline-train, probe-all and check-accuracies.

Every writer and reader of a run directory takes its file names, run kinds, ``run_info`` keys
and checkpoint schemas from here.

Layout::

    RUN/config.yaml            every resolved option, then ``run_info`` (facts: see below)
    RUN/ckpt_epoch_<N>.pth     SupCon: after epoch N, every --save-freq epochs and at the final epoch
    RUN/last.pth               the newest state (every epoch; SupCon also on SIGTERM/Ctrl-C mid-epoch)
    RUN/best.pth               baseline: the best-by-validation weights
    RUN/metrics.csv            one row per finished epoch (``epoch`` = N for the N-th epoch, 1-based)
    RUN/train_images.txt       the training images (class/file, sorted) the run samples from, by index
    RUN/.lock                  held by the training (or probe-all, in probe/) process while it runs
    RUN/*.corrupt-<time>       a checkpoint that did not load, set aside by --resume (never deleted)
    RUN/tensorboard/           TensorBoard events, one point per finished epoch at step N
    RUN/probe/                 written by probe-all (head files in probe/heads/, features cache in probe/cache/)
    RUN/test_metrics.json      written by check-accuracies; its ``selection.checkpoint`` (with
                               ``checkpoint_sha256``) is the checkpoint chosen on val, which
                               ``baseline-train --features run:RUN`` takes its features from

Epochs: the N-th epoch (1-based) is "epoch N" in messages, in the CSV, in ``ckpt_epoch_N.pth`` and
as the TensorBoard step; a checkpoint's ``epoch`` entry counts the epochs it has finished, so
``ckpt_epoch_N.pth`` holds ``epoch: N``, and a mid-epoch ``last.pth`` holding ``epoch: N`` and
``epoch_state.steps_done: S`` is in epoch N + 1 after step S.

``run_info`` keys every run records (:func:`make_run_info`): ``kind`` (a :class:`RunKind` value, read
back with :func:`kind_from_run_info`), ``class_names``, ``num_classes``, ``data_folder``, ``val_folder``
(or None), ``model_config``, ``num_processes``, ``global_batch``, ``steps_per_epoch``,
``bad_images_skipped``, ``device``, ``versions``, ``data_fingerprint`` (sha256 of ``train_images.txt``;
with ``data_changes``, one entry per accepted ``--allow-data-change``); a kind adds its own (SupCon:
``learning_rate_rule``, ``collapsed_loss``...; baseline: ``test_folder``, ``mean``, ``std``...).
Runs written before ``kind`` was recorded are SupCon runs.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import io
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from supcon.checkpoint import atomic_write_text, safe_load
from supcon.errors import UserError
from supcon.runlock import LOCK_FILE

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
#: Every unreadable image found by the image check (``path<TAB>reason``); not run content by itself.
BAD_IMAGES_FILE = "bad_images.txt"
LAST = "last.pth"
BEST = "best.pth"
TENSORBOARD_DIR = "tensorboard"
PROBE_DIR = "probe"
#: probe-all's head files, one per (checkpoint, probe settings), in ``RUN/probe/``.
HEADS_DIR = "heads"
CACHE_DIR = "cache"
#: ``RUN/probe/selection.json``: the checkpoint the default selection rule takes, written by probe-all and
#: read by later stages that start from "the selected checkpoint" (``baseline-train --init-from RUN``).
SELECTION_FILE = "selection.json"
TEST_METRICS_FILE = "test_metrics.json"
#: The sorted relative paths of the training images (the sampler draws images by their index in it).
DATA_LISTING = "train_images.txt"
RUN_INFO_KEY = "run_info"
DEFAULT_RUNS_ROOT = "runs"

#: The ``format`` entry of each kind's checkpoints (bumped ``version`` on incompatible changes).
CHECKPOINT_FORMAT = "supcon-checkpoint"
CHECKPOINT_VERSION = 1
BASELINE_FORMAT = "supcon-baseline-checkpoint"
BASELINE_VERSION = 1

_CKPT_RE = re.compile(r"^ckpt_epoch_(\d+)\.pth$")


class RunKind(str, enum.Enum):
    """Which trainer wrote a run: ``run_info.kind`` in its ``config.yaml``.

    A ``str`` enum: each member equals the plain string ``config.yaml`` records (writers store ``.value``,
    which YAML and ``torch.load(weights_only=True)`` read back as a plain string), so runs written before
    this type read back unchanged. Read a run's kind with :func:`kind_from_run_info`, never from the dict.
    """

    SUPCON = "supcon"  # supcon-train
    BASELINE = "baseline"  # baseline-train (fine-tunes, custom nets and the classical models)

    def __str__(self) -> str:  # the recorded string in messages and f-strings, on every Python version
        return self.value


def kind_from_run_info(run_info: Mapping[str, Any], run_dir: str | os.PathLike | None = None) -> RunKind:
    """The kind a run's ``run_info`` records; :attr:`RunKind.SUPCON` for runs written before ``kind`` was.

    Args:
        run_info: the ``run_info`` mapping of a run's ``config.yaml``.
        run_dir: the run, named in the error message.

    Raises:
        UserError: a kind this version does not know.
    """
    recorded = run_info.get("kind", RunKind.SUPCON.value)
    try:
        return RunKind(recorded)
    except ValueError:
        where = f"{Path(run_dir) / CONFIG_FILE} records" if run_dir is not None else "the run records"
        known = " or ".join(kind.value for kind in RunKind)
        raise UserError(f"{where} kind {recorded!r}, which this version does not know ({known})") from None


def epoch_checkpoint_name(epoch: int) -> str:
    """The file name of the checkpoint written after the ``epoch``-th epoch (1-based)."""
    return f"ckpt_epoch_{epoch}.pth"


def default_run_dir(model: str, batch_size: int, root: str = DEFAULT_RUNS_ROOT) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{model}_bs{batch_size}_{stamp}"


def epoch_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{backbone_epoch: path}`` of the ``ckpt_epoch_<N>.pth`` files of a run, sorted by epoch."""
    found = {}
    for path in Path(run_dir).glob("ckpt_epoch_*.pth"):
        match = _CKPT_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def has_run_content(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds anything but a refused start's list of unreadable images, or a lock file."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(p.name not in (BAD_IMAGES_FILE, LOCK_FILE) for p in run_dir.iterdir())


def package_versions() -> dict[str, str]:
    """Versions recorded in every run's ``run_info``."""
    import accelerate
    import timm
    import torch
    import torchvision

    from supcon import __version__

    return {"supcon": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "timm": str(timm.__version__), "accelerate": str(accelerate.__version__)}


def make_run_info(kind: RunKind, *, class_names: list[str], data_folder: str, val_folder: str | None,
                  model_config: dict[str, Any], num_processes: int, global_batch: int, steps_per_epoch: int,
                  bad_images_skipped: int, device: str, **facts: Any) -> dict[str, Any]:
    """The ``run_info`` of a run: the keys every kind records, then the kind's own ``facts``."""
    return {"kind": RunKind(kind).value, "class_names": list(class_names), "num_classes": len(class_names),
            "data_folder": data_folder, "val_folder": val_folder, **facts, "model_config": model_config,
            "num_processes": num_processes, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
            "bad_images_skipped": bad_images_skipped, "device": device, "versions": package_versions()}


def supcon_checkpoint(*, model_config: dict[str, Any], encoder: dict, head: dict, epoch: int, global_step: int,
                      config: dict[str, Any], class_names: list[str], mean: list[float], std: list[float],
                      data_folder: str, resume_state: dict[str, Any],
                      live_probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """A supcon-train checkpoint: the encoder and head with everything to rebuild and probe them.

    ``resume_state`` holds what only ``--resume`` needs (optimizer, scaler, rng, epoch_state,
    collapse). ``epoch`` counts finished epochs; ``global_step`` the optimizer steps. ``live_probe``:
    the live probe measured on these weights (:class:`supcon.live_probe.LiveProbe`), if one was.
    """
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_config": model_config,
            "encoder": encoder, "head": head, **resume_state, "epoch": epoch, "global_step": global_step,
            "config": config, "class_names": list(class_names), "mean": list(mean), "std": list(std),
            "data_folder": data_folder, "live_probe": live_probe}


def baseline_checkpoint(*, model_config: dict[str, Any], description: str, encoder: dict, head: dict, epoch: int,
                        config: dict[str, Any], class_names: list[str], mean: list[float], std: list[float],
                        size: int, best: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A baseline-train checkpoint (``best.pth``, or ``last.pth`` with the resume state in ``extra``).

    ``best`` holds ``best_epoch``, ``best_val_accuracy``, ``best_val_loss`` and ``monitor``.
    """
    return {"format": BASELINE_FORMAT, "version": BASELINE_VERSION, "kind": RunKind.BASELINE.value,
            "model_config": model_config, "description": description, "encoder": encoder, "head": head,
            "class_names": list(class_names), "mean": list(mean), "std": list(std), "size": size, "epoch": epoch,
            **best, "config": config, **extra}


def _load_checked(path: str | os.PathLike, checkpoint_format: str, writer: str) -> dict[str, Any]:
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != checkpoint_format:
        raise UserError(f"{path} is not a {writer} checkpoint (no 'format: {checkpoint_format}' entry)")
    return state


def load_supcon_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load (``weights_only``) and sanity-check a supcon-train checkpoint.

    Raises:
        UserError: missing, unsafe or corrupt file, or not written by supcon-train.
    """
    return _load_checked(path, CHECKPOINT_FORMAT, "supcon-train")


def load_baseline_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load (``weights_only``) and sanity-check a baseline-train checkpoint.

    Raises:
        UserError: missing, unsafe or corrupt file, or not written by baseline-train.
    """
    return _load_checked(path, BASELINE_FORMAT, "baseline-train")


def checkpoint_problem(state: Any, run_info: dict[str, Any] | None, epoch: int | None = None) -> str | None:
    """Why a loaded checkpoint cannot be a state of this run (None when it can).

    Checks what a truncated-but-loadable or foreign file would get wrong: the entries a resume
    needs, finite weights, the recorded ``model_config`` and class names, and (for
    ``ckpt_epoch_N.pth``) that it holds the end of epoch N.
    """
    missing = [key for key in ("encoder", "head", "optimizer", "rng", "epoch", "model_config")
               if not isinstance(state, dict) or key not in state]
    if missing:
        return f"no {', '.join(missing)} entry"
    if run_info:
        if run_info.get("model_config") is not None and state["model_config"] != run_info["model_config"]:
            return "its model_config differs from the run's config.yaml"
        if run_info.get("class_names") is not None and list(state.get("class_names") or []) != run_info["class_names"]:
            return "its class names differ from the run's config.yaml"
    if epoch is not None and (state["epoch"] != epoch or (state.get("epoch_state") or {}).get("steps_done")):
        return f"it holds epoch {state['epoch']}, not the end of epoch {epoch}"
    return non_finite_weights(state)


def non_finite_weights(state: dict[str, Any]) -> str | None:
    """``"its encoder weights are not finite"`` (or head) when a checkpoint's weights hold NaN or inf."""
    import torch

    for part in ("encoder", "head"):
        tensors = (t for t in (state.get(part) or {}).values() if torch.is_tensor(t) and t.is_floating_point())
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return f"its {part} weights are not finite"
    return None


def image_listing(samples: list[tuple[str, int]], root: str | os.PathLike) -> list[str]:
    """The sorted ``class/file`` paths of ``samples`` relative to ``root`` (what :data:`DATA_LISTING` holds)."""
    root = Path(root).resolve()
    return sorted(Path(path).resolve().relative_to(root).as_posix() for path, _ in samples)


def listing_fingerprint(listing: list[str]) -> str:
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def listing_difference(recorded: list[str], current: list[str]) -> str | None:
    """A summary like ``3 added, 1 removed in class dog; 2 added in class cat`` (None when equal).

    A renamed image counts as one removed and one added.
    """
    old, new = set(recorded), set(current)
    if old == new:
        return None
    per_class: dict[str, list[int]] = {}
    for paths, slot in ((new - old, 0), (old - new, 1)):
        for path in paths:
            per_class.setdefault(path.split("/", 1)[0], [0, 0])[slot] += 1
    parts = []
    for name, (added, removed) in sorted(per_class.items()):
        counts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed")) if n]
        parts.append(f"{', '.join(counts)} in class {name}")
    return "; ".join(parts)


def read_listing(run_dir: str | os.PathLike) -> list[str] | None:
    """The run's recorded :data:`DATA_LISTING` (None for a run that recorded none)."""
    path = Path(run_dir) / DATA_LISTING
    return path.read_text().splitlines() if path.is_file() else None


def find_split_folder(split: str, explicit: str | os.PathLike | None, train_folder: str | os.PathLike | None,
                      recorded: str | os.PathLike | None = None) -> str | None:
    """Where a run's ``val`` or ``test`` images are, in one order for every command (absolute path or None).

    The order: ``explicit`` (the command line), else ``recorded`` (what the run wrote down when it
    trained) if it still exists, else a sibling ``split`` of the training folder if it exists.
    """
    if explicit:
        return str(Path(explicit).expanduser().resolve())
    if recorded and Path(recorded).is_dir():
        return str(Path(recorded).resolve())
    if train_folder:
        sibling = Path(train_folder).expanduser().resolve().parent / split
        if sibling.is_dir():
            return str(sibling)
    return None


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


def split_config(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``config.yaml`` mapping as ``(options, run_info)``."""
    run_info = data.get(RUN_INFO_KEY) or {}
    return {k: v for k, v in data.items() if k != RUN_INFO_KEY}, run_info


def run_kind(run_dir: str | os.PathLike) -> RunKind | None:
    """The run's kind (:func:`kind_from_run_info`), or None when its ``config.yaml`` cannot be read or records
    a kind this version does not know (for scans over many runs, which skip such a run)."""
    try:
        _, run_info = split_config(read_config(run_dir))
        return kind_from_run_info(run_info, run_dir) if isinstance(run_info, dict) else None
    except UserError:
        return None


def read_selection(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``probe/selection.json`` (None when probe-all has not written one).

    Raises:
        UserError: the file exists but cannot be read as a JSON mapping.
    """
    path = Path(run_dir) / PROBE_DIR / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON; run probe-all --run {run_dir} again")
    if not isinstance(data, dict) or "checkpoint" not in data:
        raise UserError(f"{path} names no checkpoint; run probe-all --run {run_dir} again")
    return data


def selected_checkpoint(run_dir: str | os.PathLike, option: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint probe-all selected on val (``probe/selection.json``), checked to be unchanged since.

    Args:
        run_dir: a probed supcon-train run.
        option: how the caller names the run in messages (e.g. ``--init-from RUN``).

    Raises:
        UserError: never probed, or the selected checkpoint is gone or has changed since (names what to run).
    """
    from supcon.checkpoint import file_sha256

    run_dir = Path(run_dir)
    selection = read_selection(run_dir)
    if selection is None:
        raise UserError(f"{option}: no {PROBE_DIR}/{SELECTION_FILE} (the run was never probed); run probe-all --run "
                        f"{run_dir} first, or name a checkpoint: {run_dir}/ckpt_epoch_N.pth")
    path = run_dir / selection["checkpoint"]
    if not path.is_file() or file_sha256(path) != selection.get("checkpoint_sha256"):
        raise UserError(f"{option}: {path.name}, the checkpoint probe-all selected, is missing or has changed since; "
                        f"run probe-all --run {run_dir} again, or name a checkpoint")
    return path, selection


def find_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> list[Path]:
    """Run directories (holding a config.yaml) directly under ``root``, oldest first by modification time."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / CONFIG_FILE).is_file()]
    return sorted(runs, key=lambda p: ((p / CONFIG_FILE).stat().st_mtime, p.name))


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


class MetricSinks:
    """``config.yaml``, the per-epoch CSV and the TensorBoard writer of a run (written by the main process only).

    Opening writes ``config.yaml``; on resume (``start_epoch > 0``) rows and events after
    ``start_epoch`` are dropped, so a crashed epoch is not logged twice.

    Args:
        tags: ``{csv column: TensorBoard tag}`` of the columns to plot.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], run_info: dict[str, Any], fields: list[str],
                 tags: dict[str, str], start_epoch: int, is_main: bool):
        self.csv = MetricsCSV(Path(run_dir) / METRICS_FILE, fields)
        self.tags = tags
        self.writer = None
        if not is_main:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config, run_info)
        self.csv.truncate_after(start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=start_epoch + 1 if start_epoch else None)

    def log(self, row: dict[str, Any]) -> None:
        """Append the row of a finished epoch (``row["epoch"]``, 1-based) to the CSV and TensorBoard."""
        if self.writer is None:
            return
        self.csv.append(row)
        for key, tag in self.tags.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
