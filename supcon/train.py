"""``supcon-train``'s library entry: ``train`` runs (or resumes) SupCon pretraining as configured.

It validates and resolves the config, opens the run directory (refused, or resumed if it may be),
checks the image folders and hands the epochs to :class:`supcon.trainer.SupConTrainer` on
:class:`supcon.engine.RunEngine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from supcon.config import (
    LR_RULE_GIVEN,
    PLATEAU_KEYS,
    PLATEAU_RULE_KEYS,
    RUNTIME_KEYS,
    TrainConfig,
    resolve_train_config,
    to_yaml_dict,
)
from supcon.data import ImageFolderIndex, check_images, report_bad_images, scan_image_folder
from supcon.engine import RunEngine
from supcon.errors import UserError
from supcon.interrupt import EXIT_COLLAPSE, exit_code
from supcon.models import check_model_name
from supcon.processes import default_precision
from supcon.resume import RecordedRun
from supcon.rundir import (
    BAD_IMAGES_FILE,
    epoch_checkpoints,
    image_listing,
    load_supcon_checkpoint,
)
from supcon.sampling import check_balanced_classes
from supcon.schedule import AUTO_WARM_ABOVE_BATCH, LRSchedule
from supcon.stopping import StopDecision, still_rising
from supcon.trainer import METRIC_FIELDS, TENSORBOARD_TAGS, SupConTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted_by: int | None = None  # signal number
    stopped_on_collapse: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_decision: StopDecision | None = None  # --until plateau: when and why the cool-down started

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is None and self.stopped_on_collapse:
            return EXIT_COLLAPSE
        return exit_code(self.interrupted_by)


def _refuse_changes(engine: RunEngine, recorded: RecordedRun | None, config: TrainConfig, global_batch: int) -> None:
    """Refuse to resume with other options; a larger ``--epochs`` is allowed where the schedule does not depend on it.

    Raises:
        UserError: naming the differences (for ``--epochs``, why the cosine schedule cannot be extended).
    """
    # the --until plateau rule's settings do not touch a fixed-length run (older runs recorded other defaults)
    ignore = RUNTIME_KEYS - PLATEAU_KEYS if config.until == "plateau" else RUNTIME_KEYS | PLATEAU_RULE_KEYS
    if recorded is not None and recorded.options.get("epochs") not in (None, config.epochs):
        run_epochs = int(recorded.options["epochs"])
        if _fixed_wsd(config) and recorded.options.get("schedule") == "wsd":
            ignore = ignore | {"epochs"}  # judged once the state is loaded: _refuse_wsd_epochs
        elif config.schedule_kind != "step" or config.epochs < run_epochs:
            raise UserError(
                f"run dir {engine.run_dir} was started with --epochs {run_epochs}, now {config.epochs}: "
                + ("a run cannot be shortened; its numbered checkpoints hold the epochs you want"
                   if config.epochs < run_epochs else
                   f"the {config.schedule_kind} schedule is set by --epochs, so a longer run is a different run from "
                   "its first epoch; start a new run (only --schedule step runs can be extended with --resume "
                   "--epochs N)"))
        ignore = ignore | {"epochs"}  # the step schedule and warm-up do not depend on the total
    engine.refuse_changes(recorded, to_yaml_dict(config), ignore, global_batch, config.batch_size,
                          defaults=to_yaml_dict(TrainConfig()))


def _fixed_wsd(config: TrainConfig) -> bool:
    return config.schedule_kind == "wsd" and config.until == "epochs"


def _refuse_wsd_epochs(run_dir: Path, recorded: RecordedRun | None, config: TrainConfig,
                       state: dict[str, Any] | None) -> None:
    """A WSD run takes a new ``--epochs`` on resume, longer or shorter, while it is still at its stable rate.

    The stable phase does not depend on ``--epochs`` (warm-up, then a constant rate), so a run that has not
    started its cool-down, resumed with a cool-down that starts no earlier than where it is, trains exactly as
    a run started with the new ``--epochs``: train longer when the live probe still rises, or cool down sooner.

    Raises:
        UserError: the run (or the new cool-down) has reached the cool-down; names both epochs.
    """
    if (recorded is None or state is None or recorded.options.get("epochs") in (None, config.epochs)
            or not _fixed_wsd(config)):
        return
    run_epochs = int(recorded.options["epochs"])
    fraction = float(recorded.options.get("cooldown_fraction", config.cooldown_fraction))
    run_start = run_epochs - LRSchedule.cooldown_length(run_epochs, fraction)
    new_start = config.epochs - LRSchedule.cooldown_length(config.epochs, config.cooldown_fraction)
    trained = int(state["epoch"]) + (1 if state.get("epoch_state", {}).get("steps_done") else 0)
    if trained > run_start:
        raise UserError(f"run dir {run_dir} was started with --epochs {run_epochs}, now {config.epochs}: its WSD "
                        f"cool-down began after epoch {run_start} and it has trained {trained}, so it is no longer at "
                        "its stable rate; start a new run with the --epochs you want")
    if trained > new_start:
        raise UserError(f"run dir {run_dir}: with --epochs {config.epochs} the WSD cool-down would begin after epoch "
                        f"{new_start}, but {trained} epochs are trained; choose --epochs of at least "
                        f"{_wsd_epochs_for_start(trained, config.cooldown_fraction)}")


def _wsd_epochs_for_start(start: int, fraction: float) -> int:
    """The smallest ``--epochs`` whose WSD cool-down starts after epoch ``start`` or later."""
    epochs = start + 1
    while epochs - LRSchedule.cooldown_length(epochs, fraction) < start:
        epochs += 1
    return epochs


def _warn_if_still_rising(probes: list[dict[str, Any]], epochs_done: int, config: TrainConfig) -> None:
    """At the end of a run: say so when its live probe (the run's probe history, per-image results included)
    still rose over the last half of it (it had not settled)."""
    trend = still_rising(probes, epochs_done)
    if trend is None:
        return
    how = ("resume it with a larger --epochs" if config.schedule_kind == "step" else
           "train a new run with a larger --epochs (a --schedule wsd run takes a larger --epochs on --resume until "
           "its cool-down begins)")
    span = trend.last_epoch - trend.first_epoch
    logger.warning("the live probe was still rising when the run ended: %+.1f points over epochs %d-%d (%d probes; "
                   "as long again at that pace: %+.1f, one standard error %.1f), so the encoder had probably not "
                   "settled; to train longer, %s", 100 * trend.gain(span), trend.first_epoch, trend.last_epoch,
                   trend.probes, 100 * trend.gain(epochs_done), 100 * trend.standard_error * epochs_done, how)


def _finished_message(run_dir: Path, state: dict[str, Any], config: TrainConfig) -> str | None:
    """What to say when ``--resume`` finds a run that has trained all its epochs (None otherwise)."""
    done = int(state["epoch"])
    if state.get("epoch_state", {}).get("steps_done"):
        return None
    decision = (state.get("plateau") or {}).get("decision")
    if decision and done >= decision["epoch"] + decision["cooldown_epochs"]:
        return (f"run {run_dir} is finished: --until plateau cooled down and stopped after epoch {done} "
                f"({decision['reason']}). Probe it with probe-all --run {run_dir}")
    if done < config.epochs:
        return None
    how = ("resume it with a larger --epochs (the step schedule does not depend on it)"
           if config.schedule_kind == "step" else
           "start a new run (a WSD run takes a larger --epochs on --resume only before its cool-down begins)"
           if _fixed_wsd(config) else
           f"start a new run with the --epochs you want (the {config.schedule_kind} schedule is set by --epochs, "
           "so extending "
           "this run would not give the run a longer --epochs gives)")
    return (f"run {run_dir} is finished: {done} of {config.epochs} epochs done, nothing to train. Probe it with "
            f"probe-all --run {run_dir}; to train longer, {how}")


def _check_folders(config: TrainConfig, engine: RunEngine, progress: bool,
                   global_batch: int) -> tuple[ImageFolderIndex, ImageFolderIndex | None, int, Any]:
    """Scan the data and val folders and decode every training image once (main process); with ``--sampler
    balanced``, check the classes before the decoding and again without the unreadable images.

    Returns:
        ``(index without bad images, val index, number of bad images, FolderCheck)``.
    """
    allow = config.allow_split_class_names
    index = scan_image_folder(config.data_folder, "data folder", allow_split_names=allow)
    if config.sampler == "balanced":
        check_balanced_classes(index.classes, index.targets, global_batch)
    val_index = (scan_image_folder(config.val_folder, "val folder", allow_split_names=allow)
                 if config.val_folder else None)
    if val_index is not None and val_index.classes != index.classes:
        raise UserError(
            f"class names differ between the data folder {index.classes} and val folder {val_index.classes}")
    need_stats = config.mean is None
    check = None
    if engine.is_main:
        desc = "checking images, computing mean/std" if need_stats else "checking images"
        check = check_images([p for p, _ in index.samples], need_stats, config.num_workers, progress, desc)
    check = engine.broadcast(check)
    report_bad_images(check.bad, config.skip_bad_images, engine.run_dir / BAD_IMAGES_FILE, write_list=engine.is_main)
    index = index.without([p for p, _ in check.bad])
    if config.sampler == "balanced":
        repeats = check_balanced_classes(index.classes, index.targets, global_batch)
        if repeats and engine.is_main:
            logger.warning("%s", repeats)
    return index, val_index, len(check.bad), check


def _log_resolution(config: TrainConfig, facts: dict[str, Any]) -> None:
    if facts["learning_rate_rule"] == LR_RULE_GIVEN:
        logger.info("learning rate %.6g (from --learning-rate)", config.learning_rate)
    else:
        logger.info("learning rate %.6g = 0.5 x %d (global batch) / 1024 (linear scaling rule)",
                    config.learning_rate, facts["global_batch"])
    if facts["auto_warm"]:
        logger.info("global batch %d > %d: %d-epoch linear warm-up switched on (--warm)", facts["global_batch"],
                    AUTO_WARM_ABOVE_BATCH, config.warm_epochs)


#: Optimizer steps after which SupCon's live probe had settled on the convergence benchmark's textures set
#: (WSD, batch 64, 6 steps an epoch: 200 epochs matched 400 on val in every seed; 50-100 epochs were 5-10 points
#: lower; docs/benchmarks/convergence.md).
SETTLED_STEPS = 1200


def _note_if_short(epochs: int, steps_per_epoch: int) -> None:
    """Before a fixed-length run: say so when it is far shorter than where SupCon settled on the benchmark."""
    steps = epochs * steps_per_epoch
    if steps < SETTLED_STEPS:
        logger.info("note: %d optimizer steps in all (%d epochs of %d); on the convergence benchmark SupCon's live "
                    "probe settled only after about %d steps, and runs of a quarter to half that ended 5-10 points "
                    "lower on val: consider a larger --epochs, or --until plateau", steps, epochs, steps_per_epoch,
                    SETTLED_STEPS)


def _periodic_saves_to_come(run_dir: Path, config: TrainConfig, start_epoch: int) -> int:
    """The ``ckpt_epoch_<N>.pth`` files the rest of the run adds to the disk (at most --keep-last of them)."""
    existing = epoch_checkpoints(run_dir)
    to_come = [e for e in range(start_epoch + 1, config.epochs + 1)
               if (e % config.save_freq == 0 or e == config.epochs) and e not in existing]
    if config.keep_last:  # a new file beyond the newest N replaces the oldest
        return max(0, min(len(to_come), config.keep_last - len(existing)))
    return len(to_come)


def _resume_message(run_dir: Path, start_epoch: int, steps_done: int, steps_per_epoch: int, epochs: int) -> str:
    """In the convention of the interruption message: the epoch in progress (1-based) and its steps done."""
    if steps_done:
        return f"resuming {run_dir} in epoch {start_epoch + 1} at step {steps_done}/{steps_per_epoch}"
    return f"resuming {run_dir} at epoch {start_epoch + 1} ({start_epoch} of {epochs} epochs done)"


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) SupCon pretraining as configured; returns where and how it ended.

    Raises:
        UserError: bad input (paths, images, options) or a conflicting run directory, before
            anything is written; a non-finite loss during training.
    """
    config = replace(config)
    config.validate()
    check_model_name(config.model)  # before the images are decoded, not after
    if config.grad_checkpointing and config.compile:
        raise UserError("--grad-checkpointing with --compile is not supported; use one of them")
    if (config.mean is None) != (config.std is None):
        raise UserError("give both --mean and --std, or neither (they are then computed from the data folder)")
    engine = RunEngine(config.precision or default_precision(), progress, config.dist_timeout)
    try:
        with engine.failures_as_messages():
            return _train(engine, config, progress)
    finally:
        engine.close()


def _open_run(engine: RunEngine, config: TrainConfig) -> tuple[TrainConfig, RecordedRun | None]:
    """Take the run directory and read what it recorded; whether this session resumes (``--resume``, or a process
    restarted by torchrun) and its per-process batch (the run's global batch split over the processes now).

    Raises:
        UserError: the run directory is refused, or ``--chunk-size`` exceeds the per-process batch now.
    """
    run_dir = engine.choose_run_dir(config.run_dir, config.resume, config.model, config.batch_size)
    resume = engine.resume_wanted(config.resume)
    recorded = engine.open_existing(resume)
    config = replace(config, resume=resume, batch_size=engine.per_process_batch(recorded, config.batch_size))
    if config.chunk_size is not None and config.chunk_size > config.batch_size:
        raise UserError(f"--chunk-size {config.chunk_size} is larger than the {config.batch_size} images per process "
                        f"of this resume on {engine.world} processes; resume {run_dir} on fewer processes")
    return config, recorded


def _train(engine: RunEngine, config: TrainConfig, progress: bool) -> TrainResult:
    if engine.on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    config, recorded = _open_run(engine, config)
    run_dir = engine.run_dir
    config, facts = resolve_train_config(
        config, precision=config.precision or default_precision(), on_gpu=engine.on_gpu, world_size=engine.world,
        recorded=recorded.options if recorded else None, recorded_info=recorded.run_info if recorded else None)
    _refuse_changes(engine, recorded, config, facts["global_batch"])
    resume_state = engine.last_state(load_supcon_checkpoint, recorded)
    _refuse_wsd_epochs(run_dir, recorded, config, resume_state)
    finished = _finished_message(run_dir, resume_state, config) if resume_state is not None else None
    if finished:
        logger.info("%s", finished)
        return TrainResult(run_dir=run_dir, epochs_done=int(resume_state["epoch"]))

    index, val_index, bad_images, check = _check_folders(config, engine, progress, facts["global_batch"])
    if config.mean is None:
        config = replace(config, mean=check.mean, std=check.std)
        logger.info("mean %s, std %s computed from %d images", config.mean, config.std, len(index.samples))
    if len(index.samples) < facts["global_batch"]:
        raise UserError(f"the data folder has {len(index.samples)} usable images, fewer than one global batch of "
                        f"{facts['global_batch']}; lower --batch-size")
    _log_resolution(config, facts)

    start_epoch = int(resume_state["epoch"]) if resume_state is not None else 0
    engine.check_data(image_listing(index.samples, index.root), recorded, config.allow_data_change, start_epoch)

    trainer = SupConTrainer(engine, config, index, val_index, facts)
    if resume_state is None and config.until == "epochs":
        _note_if_short(config.epochs, trainer.steps_per_epoch)
    if resume_state is not None:
        start_epoch = trainer.load(resume_state)
        logger.info("%s", _resume_message(run_dir, start_epoch, trainer.epoch_state.steps_done,
                                          trainer.steps_per_epoch, config.epochs))
    engine.keep_last = config.keep_last
    engine.check_disk_space(trainer.checkpoint(start_epoch, trainer.epoch_state), trainer.optimizer,
                            _periodic_saves_to_come(run_dir, config, start_epoch))
    engine.open_sinks(trainer.options, {**trainer.run_info(bad_images), **engine.session_facts(recorded, start_epoch)},
                      METRIC_FIELDS, TENSORBOARD_TAGS, start_epoch)
    trainer.make_loaders()
    outcome = engine.run_epochs(trainer, start_epoch, config.epochs, sync_every=config.log_every,
                                resume_step=trainer.epoch_state.steps_done, steps_per_epoch=trainer.steps_per_epoch)
    if outcome.end_reason:
        logger.warning("%s", outcome.end_reason)
    elif outcome.interrupted_by is None and engine.is_main:
        _warn_if_still_rising(trainer.probe_history, outcome.epochs_done, config)
    return TrainResult(run_dir=run_dir, epochs_done=outcome.epochs_done, interrupted_by=outcome.interrupted_by,
                       stopped_on_collapse=trainer.stopped_on_collapse, history=outcome.history,
                       stop_decision=trainer.plateau.decision if trainer.plateau is not None else None)
