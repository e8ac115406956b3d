"""``probe-all``: a linear head on every checkpoint of a run (in a backbone-epoch range), one table.

Outputs under ``RUN/probe/``::

    probe_results.csv / .md   checkpoint, backbone epoch, best val accuracy, head epoch (+ details in the CSV)
    probe_plot.png            best val accuracy per checkpoint over the training loss
    selection.json            the checkpoint the default selection rule takes (``baseline-train --init-from RUN``)
    heads/<ckpt>__<key>.pth   each head's weights and record (weights_only-loadable)
    cache/features_<key>.pt   encoded features, keyed by checkpoint content + folder + transform

A checkpoint already probed with the same settings on the same data (same ``<key>``) is skipped
unless ``force``. Everything that can fail on bad input (run, range, folders, class names, every
checkpoint to probe) is checked before anything is written; a checkpoint that cannot be read
(truncated, damaged) is listed, left as it is, and the others are probed. One probe-all at a time
per run (``RUN/probe/.lock``); a second is refused, naming the first.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from linear_probe.checkpoints import CheckpointRef, check_checkpoint, find_checkpoints, format_backbone_epoch
from linear_probe.config import AUTO, ProbeConfig
from linear_probe.features import (
    FeatureCache,
    FrozenCheckpoint,
    FrozenFeatures,
    augmented_batches,
    cached_batches,
    folder_fingerprint,
)
from linear_probe.heads import (
    HEADS_DIR,
    HeadRecord,
    head_file_name,
    load_head_record,
    load_head_records,
    save_head,
)
from linear_probe.lbfgs import train_lbfgs_head
from linear_probe.probe import HeadSettings, settings_key, train_linear_head
from linear_probe.probe_start import AutoFrom, choose_from_run, read_curves
from linear_probe.runs import RunInfo, latest_supcon_run, resolve_folder, scan_checked
from linear_probe.select import Selection, select
from linear_probe.tables_and_plots import PROBE_CSV_FIELDS, plot_probe, probe_table, write_csv
from supcon.checkpoint import CorruptCheckpoint, FileStamp, MissingCheckpoint, atomic_write_text
from supcon.data import ImageFolderIndex
from supcon.errors import UserError
from supcon.frozen import resolve_device
from supcon.rundir import SELECTION_FILE, load_supcon_checkpoint
from supcon.runlock import RunLock

logger = logging.getLogger(__name__)

RESULTS_CSV = "probe_results.csv"
RESULTS_MD = "probe_results.md"
PLOT_PNG = "probe_plot.png"


@dataclass
class ProbeAllResult:
    """What ``probe-all`` did: the table's records, which checkpoints were probed or skipped, the files."""

    run_dir: Path
    probe_dir: Path
    records: list[HeadRecord]
    probed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    auto: AutoFrom | None = None
    table_markdown: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)  # checkpoints that could not be read, left as they are
    gone: list[str] = field(default_factory=list)  # listed, then deleted before they were read (--keep-last)


def _note_gone(ref: CheckpointRef, gone: list[str]) -> None:
    """A checkpoint deleted after it was listed (a running training's ``--keep-last``): skipped, not an error."""
    logger.warning("skipping %s: it was deleted after probe-all listed it (a running training's --keep-last deletes "
                   "older checkpoints)", ref.name)
    gone.append(ref.name)


@dataclass
class _ProbeData:
    """The folders and settings shared by every checkpoint of one probe-all call."""

    run: RunInfo
    class_names: list[str]
    train_index: ImageFolderIndex
    val_index: ImageFolderIndex
    train_fingerprint: str
    val_fingerprint: str
    settings: HeadSettings
    settings_key: str
    cache: FeatureCache
    device: torch.device
    config: ProbeConfig


def probe_all(config: ProbeConfig, progress: bool = False) -> ProbeAllResult:
    """Probe the run's checkpoints as configured and write the table, plot and heads.

    Raises:
        UserError: no run, no checkpoint in range, missing/empty folders, differing class names,
            a checkpoint of another architecture, or an unsafe file; nothing is written then.
    """
    config = replace(config)
    config.validate()
    run_dir = Path(config.run) if config.run else latest_supcon_run(config.runs_root)
    run = RunInfo.load(run_dir)
    run.require_supcon("probe-all")

    auto = None
    from_epoch = config.from_epoch
    if from_epoch == AUTO:
        auto = choose_from_run(run_dir, config.auto_tolerance)
        from_epoch = auto.epoch
        logger.info("--from auto chose backbone epoch %d: %s", auto.epoch, auto.reason)
    refs = find_checkpoints(run_dir, from_epoch, config.to_epoch)
    data = _prepare_data(run, config)

    todo: list[tuple[CheckpointRef, FileStamp]] = []
    skipped: list[str] = []
    corrupt: list[str] = []
    gone: list[str] = []
    for ref in refs:
        head_path = run.probe_dir / HEADS_DIR / head_file_name(ref.name, data.settings_key)
        if not config.force and head_path.is_file() and load_head_record(head_path).checkpoint_stamp.matches(ref.path):
            skipped.append(ref.name)
            continue
        # Check every checkpoint before probing any, so a bad one leaves the run untouched.
        try:
            state = load_supcon_checkpoint(ref.path)
            stamp = FileStamp.of(ref.path)
        except CorruptCheckpoint as exc:  # listed and left as it is; the others are still worth probing
            logger.warning("skipping %s: %s", ref.name, exc)
            corrupt.append(ref.name)
            continue
        except (MissingCheckpoint, FileNotFoundError):
            _note_gone(ref, gone)
            continue
        check_checkpoint(state, ref.path, run.model_config, data.class_names)
        FrozenCheckpoint(ref.path, state=state).encoder()  # refuses weights that do not fit the architecture
        todo.append((ref, stamp))
    if skipped:
        logger.info("skipping %d checkpoint(s) already probed with these settings (--force re-probes): %s",
                    len(skipped), ", ".join(skipped))
    if corrupt and not todo and not skipped:
        raise UserError(f"every checkpoint in range is corrupt or truncated ({', '.join(corrupt)}); nothing to probe")
    # One probe-all per run at a time: two would race on the heads, the tables and the feature cache.
    with RunLock(run.probe_dir, f"the probe results of run {run_dir}"):
        probed = _probe_checkpoints(run, data, todo, progress, gone)
        records, markdown, files = _write_results(run, auto)
    return ProbeAllResult(run_dir, run.probe_dir, records, probed, skipped, auto, markdown, files, corrupt, gone)


def _probe_checkpoints(run: RunInfo, data: _ProbeData, todo: list[tuple[CheckpointRef, FileStamp]],
                       progress: bool, gone: list[str]) -> list[str]:
    """Probe each checkpoint of ``todo`` and save its head; returns their names (``gone``: those deleted meanwhile)."""
    from tqdm.auto import tqdm

    probed = []
    for ref, stamp in tqdm(todo, desc="checkpoints", disable=not progress, leave=False):
        try:
            record, state_dict, final_state_dict = probe_checkpoint(ref, stamp, data, progress)
        except MissingCheckpoint:
            _note_gone(ref, gone)
            continue
        save_head(run.probe_dir, record, state_dict, final_state_dict)
        probed.append(ref.name)
        chosen = (f"C {record.regularization_c:g} (L-BFGS)" if record.regularization_c is not None
                  else f"head epoch {record.best_head_epoch}")
        logger.info("%s (backbone epoch %s): best val accuracy %.2f%% at %s (%.1f s)", ref.name,
                    format_backbone_epoch(ref.backbone_epoch, ref.steps_into_epoch), 100 * record.best_val_accuracy,
                    chosen, record.seconds)
    return probed


def _write_results(run: RunInfo, auto: AutoFrom | None) -> tuple[list[HeadRecord], str, dict[str, Path]]:
    """Write the table (CSV, markdown) and the plot from every head record of the run."""
    run_dir = run.run_dir
    records = load_head_records(run.probe_dir, run_dir)
    csv_rows, markdown = probe_table(records)
    files = {"csv": run.probe_dir / RESULTS_CSV, "markdown": run.probe_dir / RESULTS_MD,
             "plot": run.probe_dir / PLOT_PNG, "heads": run.probe_dir / HEADS_DIR}
    write_csv(files["csv"], csv_rows, PROBE_CSV_FIELDS)
    atomic_write_text(f"# Linear probe: {run_dir.name}\n\n{markdown}", files["markdown"])
    plot_probe(files["plot"], records, read_curves(run_dir), auto.epoch if auto else None,
               title=f"{run_dir.name}: linear probe per checkpoint")
    if records:
        files["selection"] = run.probe_dir / SELECTION_FILE
        atomic_write_text(json.dumps(selection_record(select(records)), indent=2) + "\n", files["selection"])
    return records, markdown, files


def selection_record(selection: Selection) -> dict:
    """``probe/selection.json``: the checkpoint the default rule takes, for stages that start from it."""
    record = selection.record
    return {"rule": selection.rule, "checkpoint": record.checkpoint, "backbone_epoch": record.backbone_epoch,
            "steps_into_epoch": record.steps_into_epoch, "checkpoint_sha256": record.checkpoint_stamp.sha256,
            "settings_key": record.settings_key, "head_file": str(record.path) if record.path else None,
            "head": "final" if selection.final_head else "best", "val_accuracy": selection.val_accuracy,
            "num_val": record.num_val, "note": selection.note(), "advice": selection.advice()}


def _prepare_data(run: RunInfo, config: ProbeConfig) -> _ProbeData:
    train_folder = config.train_folder or run.train_folder
    if not train_folder:
        raise UserError(f"run {run.run_dir} records no training folder; pass --train-folder DIR")
    train_folder = str(Path(train_folder).expanduser().resolve())
    val_folder = resolve_folder(config.val_folder, train_folder, "val", "--val-folder", run.run_info.get("val_folder"))
    allow = config.allow_split_class_names or run.allows_split_names
    train_index = scan_checked(train_folder, "train folder", run.class_names, allow)
    val_index = scan_checked(val_folder, "val folder", run.class_names, allow)
    settings = HeadSettings.from_config(config)
    train_fingerprint = folder_fingerprint(train_index)
    val_fingerprint = folder_fingerprint(val_index)
    key = settings_key(settings, train=train_fingerprint, val=val_fingerprint, size=run.size)
    cache = FeatureCache(config.cache_dir or run.cache_dir)
    return _ProbeData(run, run.class_names or train_index.classes, train_index, val_index, train_fingerprint,
                      val_fingerprint, settings, key, cache, resolve_device(config.device), config)


def probe_checkpoint(ref: CheckpointRef, stamp: FileStamp, data: _ProbeData,
                     progress: bool = False) -> tuple[HeadRecord, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train and validate one head on one checkpoint's frozen encoder; returns its record, the best head's
    weights and the final head's."""
    start = time.perf_counter()
    state = load_supcon_checkpoint(ref.path)
    if not ref.path.exists():
        raise MissingCheckpoint(f"checkpoint not found: {ref.path}")
    if not stamp.matches(ref.path):  # e.g. a last.pth that a running training replaced meanwhile
        raise UserError(f"{ref.path} changed while probe-all was running; run it again")
    device, config, settings = data.device, data.config, data.settings
    checkpoint = FrozenCheckpoint(ref.path, device, state, stamp.sha256)  # the encoder is built only when needed
    frozen = FrozenFeatures(data.cache, data.run.size, config.encode_batch_size, config.num_workers, progress)
    val_features, val_labels = frozen.of(checkpoint, data.val_index, "val images", data.val_fingerprint)
    num_train = len(data.train_index.samples)
    if not settings.augment:
        train_features, train_labels = frozen.of(checkpoint, data.train_index, "train images",
                                                 data.train_fingerprint)
    if settings.head_solver == "lbfgs":
        result = train_lbfgs_head(train_features, train_labels, val_features, val_labels, len(data.class_names))
    else:
        if settings.augment:
            batches = augmented_batches(checkpoint.encoder(), data.train_index.samples, data.run.size, state["mean"],
                                        state["std"], settings.batch_size, settings.seed, device, config.num_workers)
        else:
            batches = cached_batches(train_features.to(device), train_labels.to(device), settings.batch_size,
                                     settings.seed)
        result = train_linear_head(batches, math.ceil(num_train / settings.batch_size), val_features.to(device),
                                   val_labels.to(device), len(data.class_names), settings)
    checkpoint.assert_encoder_unchanged()
    record = HeadRecord(
        checkpoint=ref.name, checkpoint_stamp=stamp, backbone_epoch=ref.backbone_epoch,
        steps_into_epoch=ref.steps_into_epoch, best_val_accuracy=result.best_val_accuracy,
        best_head_epoch=result.best_head_epoch, best_val_loss=result.best_val_loss, settings=settings.to_dict(),
        settings_key=data.settings_key, class_names=list(data.class_names), val_folder=data.val_index.root,
        train_folder=data.train_index.root, num_train=num_train, num_val=len(data.val_index.samples),
        feature_dim=int(val_features.shape[1]), val_accuracy_per_epoch=result.val_accuracy_per_epoch,
        val_loss_per_epoch=result.val_loss_per_epoch, train_loss_per_epoch=result.train_loss_per_epoch,
        seconds=time.perf_counter() - start, regularization_c=result.regularization_c,
    )
    return record, result.state_dict, result.final_state_dict
