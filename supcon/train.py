"""SupCon pretraining: ``train_one_epoch`` (the two-view step), SupCon's part of a run, and ``train``.

The run's lifecycle (run directory, resume, metric sinks, epoch loop, stop handling, saving) is
:class:`supcon.engine.RunEngine`'s; :class:`SupConTrainer` supplies the two-view step, the kNN and
collapse monitors and the checkpoint contents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from supcon.checkpoint import rng_state, set_rng_state
from supcon.config import (
    LR_RULE_GIVEN,
    PLATEAU_KEYS,
    RUNTIME_KEYS,
    TrainConfig,
    resolve_train_config,
    to_yaml_dict,
)
from supcon.data import (
    EpochBatchSampler,
    EvalDataset,
    ImageFolderIndex,
    MultiViewDataset,
    check_images,
    eval_transform,
    make_loader,
    report_bad_images,
    scan_image_folder,
    two_view_augmentation,
)
from supcon.engine import (
    EXIT_COLLAPSE,
    EpochEnd,
    RecordedRun,
    RunEngine,
    default_precision,
    exit_code,
)
from supcon.errors import UserError
from supcon.gradcache import contrastive_step
from supcon.health import (
    COLLAPSE_ADVICE,
    CollapseDetector,
    collapsed_loss,
    embedding_spread,
    extract_features,
    knn_accuracy,
)
from supcon.live_probe import PROBE_FIELDS, LiveProbe, live_probe
from supcon.losses import SupConLoss
from supcon.memory import ProjectionMemory
from supcon.models import build_model, check_model_name, model_config_from
from supcon.optim import build_optimizer, implementation_of, keep_implementation
from supcon.rundir import (
    BAD_IMAGES_FILE,
    LAST,
    SUPCON_KIND,
    epoch_checkpoint_name,
    epoch_checkpoints,
    image_listing,
    load_supcon_checkpoint,
    make_run_info,
    supcon_checkpoint,
)
from supcon.schedule import AUTO_WARM_ABOVE_BATCH, LRSchedule
from supcon.stopping import PlateauRule, StopDecision

logger = logging.getLogger(__name__)

N_VIEWS = 2
METRIC_FIELDS = ["epoch", "loss", "collapsed_loss", "spread", "knn_accuracy", "lr", "images_per_s", "epoch_seconds",
                 *PROBE_FIELDS, "stop_decision"]
TENSORBOARD_TAGS = {"loss": "train/loss", "collapsed_loss": "train/collapsed_loss", "spread": "train/spread",
                    "lr": "train/lr", "images_per_s": "train/images_per_s", "knn_accuracy": "monitor/knn_accuracy",
                    "probe_accuracy": "monitor/probe_accuracy", "probe_loss": "monitor/probe_loss"}


@dataclass
class EpochState:
    """Progress through one epoch, saved in a mid-epoch checkpoint so it resumes exactly."""

    steps_done: int = 0
    loss_sum: float = 0.0
    spread_sum: float = 0.0
    seconds: float = 0.0


class _StepWindow:
    """Per-step loss and spread in a small device buffer; one host transfer every ``size`` steps.

    Each step writes one row (two device copies, no host sync); :meth:`flush` brings back the sums and
    the first non-finite loss in one ``tolist``. A per-step check would stall the GPU's queue every step.
    """

    def __init__(self, size: int, device: torch.device, loss_sum: float, spread_sum: float):
        self.rows = torch.zeros(max(size, 1), 2, device=device)
        self.pending = 0
        self.loss_sum, self.spread_sum = loss_sum, spread_sum

    @property
    def full(self) -> bool:
        return self.pending == self.rows.shape[0]

    def add(self, loss: torch.Tensor, spread: torch.Tensor) -> None:
        self.rows[self.pending, 0] = loss
        self.rows[self.pending, 1] = spread
        self.pending += 1

    def flush(self, last_step_in_epoch: int, epoch: int, steps_per_epoch: int) -> None:
        """Add the pending rows to the sums.

        Raises:
            UserError: one of their losses is not finite (names the epoch and step).
        """
        rows = self.rows[:self.pending]
        bad = ~torch.isfinite(rows[:, 0])
        first_bad = torch.where(bad.any(), bad.int().argmax(), -1)
        loss_total, spread_total, first = torch.cat([rows.sum(0), first_bad.view(1).float()]).tolist()
        if first >= 0:
            bad_step = last_step_in_epoch - self.pending + 1 + int(first)
            raise UserError(
                f"loss became non-finite at epoch {epoch + 1}, step {bad_step + 1} of {steps_per_epoch} "
                f"(global step {epoch * steps_per_epoch + bad_step}); the last good checkpoint is kept. "
                "Try a lower --learning-rate or --precision fp32"
            )
        self.loss_sum += loss_total
        self.spread_sum += spread_total
        self.pending = 0


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: SupConLoss,
    loader,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    accelerator: Accelerator,
    epoch: int,
    *,
    supervised: bool = True,
    state: EpochState | None = None,
    augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    channels_last: bool = False,
    should_stop: Callable[[int], bool] = lambda step: False,
    log_every: int = 10,
    progress=None,
    chunk_size: int | None = None,
    memory: ProjectionMemory | None = None,
    memory_warmup: int = 0,
) -> EpochState:
    """Train for one epoch (0-based ``epoch``) from ``state.steps_done``; returns the updated state.

    Args:
        augment: for the GPU data path, turns a device batch of images into ``[B, n_views, C, H, W]``
            views; ``None`` when the loader already yields views.
        should_stop: called after each step with the step index within the epoch; True stops early
            (``state.steps_done`` then tells where to resume).
        progress: an optional tqdm bar, advanced per step.
        chunk_size: images per forward pass (gradient caching, :mod:`supcon.gradcache`); None: the whole batch.
        memory: a cross-batch memory of earlier projections; it is contrasted against from epoch
            ``memory_warmup`` (0-based) on, and filled from the start.

    Raises:
        UserError: the loss became NaN or infinite (names the epoch and step).
    """
    state = state or EpochState()
    model.train()
    device = accelerator.device
    steps_per_epoch = schedule.steps_per_epoch
    window = _StepWindow(log_every, device, state.loss_sum, state.spread_sum)
    start_time = time.perf_counter()
    steps = 0
    step_in_epoch = state.steps_done - 1
    for step_in_epoch, (images, labels) in enumerate(loader, start=state.steps_done):
        global_step = epoch * steps_per_epoch + step_in_epoch
        lr = schedule.lr_at(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        views = augment(images, global_step) if augment is not None else images
        loss, first_view = contrastive_step(model, loss_fn, optimizer, accelerator, views, labels,
                                            channels_last=channels_last, supervised=supervised,
                                            chunk_size=chunk_size, memory=memory, use_memory=epoch >= memory_warmup)
        window.add(loss, embedding_spread(first_view))
        steps += 1
        last_of_epoch = step_in_epoch + 1 == steps_per_epoch
        stopping = should_stop(step_in_epoch) and not last_of_epoch
        # Also check before stopping early: the caller saves the state we stop in.
        if window.full or last_of_epoch or stopping:
            window.flush(step_in_epoch, epoch, steps_per_epoch)
            if progress is not None:
                done = state.steps_done + steps
                elapsed = state.seconds + time.perf_counter() - start_time
                progress.set_postfix(
                    loss=f"{window.loss_sum / done:.4f}", lr=f"{lr:.3g}",
                    img_s=f"{done * views.shape[0] * accelerator.num_processes / max(elapsed, 1e-9):.0f}")
        if progress is not None:
            progress.update(1)
        if stopping:
            break
    if window.pending:  # the loader ended before the epoch's last step (e.g. a benchmark's few batches)
        window.flush(step_in_epoch, epoch, steps_per_epoch)
    return EpochState(steps_done=state.steps_done + steps, loss_sum=window.loss_sum, spread_sum=window.spread_sum,
                      seconds=state.seconds + time.perf_counter() - start_time)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    """The run's learning-rate schedule: ``--schedule`` (cosine, step or wsd), warm-up and, for a fixed-length
    WSD run, its cool-down over the last ``--cooldown-fraction`` of ``--epochs`` (``--until plateau``: none yet)."""
    kind = config.schedule_kind
    schedule = LRSchedule(config.learning_rate, config.epochs, steps_per_epoch, cosine=config.cosine,
                          decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate, warm=config.warm,
                          warm_epochs=config.warm_epochs, warmup_from=config.warmup_from, kind=kind)
    if kind == "wsd" and config.until == "epochs":
        length = LRSchedule.cooldown_length(config.epochs, config.cooldown_fraction)
        schedule = schedule.with_cooldown(config.epochs - length, length)
    return schedule


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


class SupConTrainer:
    """SupCon's part of a run: model, two-view step, kNN and collapse monitors, checkpoint contents.

    Args:
        engine: the run's engine (accelerator, run directory).
        config: the resolved config (:func:`supcon.config.resolve_train_config`, with mean/std).
        index, val_index: the checked training and val images.
        facts: ``resolve_train_config``'s facts (global batch, learning-rate rule).
    """

    def __init__(self, engine: RunEngine, config: TrainConfig, index: ImageFolderIndex,
                 val_index: ImageFolderIndex | None, facts: dict[str, Any]):
        self.engine, self.config, self.index, self.val_index = engine, config, index, val_index
        self.accelerator = engine.accelerator
        self.facts = facts
        self.global_batch = facts["global_batch"]
        self.steps_per_epoch = len(index.samples) // self.global_batch
        self.options = {**to_yaml_dict(config), "run_dir": str(engine.run_dir)}
        self.model_config = model_config_from(config)
        set_seed(config.seed)
        self.model, self.optimizer = self._build_model()
        self.schedule = make_schedule(config, self.steps_per_epoch)
        self.plateau = (PlateauRule(config.plateau_patience, config.cooldown_fraction, ceiling=config.epochs)
                        if config.until == "plateau" else None)
        self.stopped_on_collapse = False
        self.probe: LiveProbe | None = None  # the live probe of the epoch being saved
        self.loss_fn = SupConLoss(config.temp, config.base_temp)
        self.detector = CollapseDetector(patience=config.collapse_patience)
        self.collapsed_value = collapsed_loss(self.global_batch, N_VIEWS, config.temp, config.base_temp)
        self.epoch_state = EpochState()
        self.memory = (ProjectionMemory(config.memory_size, config.feat_dim, self.accelerator.device)
                       if config.memory_size else None)
        self.loader = self.sampler = self.augment = self.knn_loaders = None

    def _build_model(self):
        config = self.config
        model = build_model(**self.model_config, pretrained=config.pretrained,
                            sync_bn=config.sync_bn and self.engine.world > 1)
        if config.grad_checkpointing:
            from supcon.grad_checkpointing import enable_grad_checkpointing

            enable_grad_checkpointing(model)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                    weight_decay=config.weight_decay, device=self.accelerator.device)
        if config.compile:
            model = torch.compile(model)
        return self.accelerator.prepare(model, optimizer)

    def load(self, state: dict[str, Any]) -> int:
        """Restore a ``last.pth``; returns the number of finished epochs."""
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        unwrapped.encoder.load_state_dict(state["encoder"])
        unwrapped.head.load_state_dict(state["head"])
        implementation = implementation_of(self.optimizer)
        self.optimizer.load_state_dict(state["optimizer"])
        keep_implementation(self.optimizer, implementation)  # a checkpoint from an unfused run resumes fused
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.detector.load_state_dict(state.get("collapse", {}))
        self.epoch_state = EpochState(**state.get("epoch_state", {}))
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
            if self.plateau.decision is not None:
                self._cool_down(self.plateau.decision)
        return int(state["epoch"])

    def _cool_down(self, decision: StopDecision) -> None:
        self.schedule = self.schedule.with_cooldown(decision.epoch, decision.cooldown_epochs)

    def run_info(self, bad_images: int) -> dict[str, Any]:
        return make_run_info(
            SUPCON_KIND, class_names=self.index.classes, data_folder=self.config.data_folder,
            val_folder=self.config.val_folder, model_config=self.model_config, num_processes=self.engine.world,
            global_batch=self.global_batch, steps_per_epoch=self.steps_per_epoch, bad_images_skipped=bad_images,
            device=self.engine.device_name, num_images=len(self.index.samples),
            learning_rate_rule=self.facts["learning_rate_rule"], collapsed_loss=self.collapsed_value)

    def make_loaders(self) -> None:
        """The training loader (plain or fast path) and the kNN monitor's loaders."""
        config, accelerator, pin = self.config, self.accelerator, self.engine.on_gpu
        if config.gpu_augment:
            from supcon.gpu_augment import build_gpu_pipeline

            dataset, self.augment = build_gpu_pipeline(self.index.samples, config, accelerator.device, N_VIEWS)
        else:
            dataset = MultiViewDataset(self.index.samples, two_view_augmentation(
                config.size, config.mean, config.std, crop_min=config.crop_min, flip=config.flip), N_VIEWS,
                seed=config.seed)
        self.sampler = EpochBatchSampler(len(dataset), config.batch_size, config.seed, accelerator.process_index,
                                         self.engine.world)
        self.loader = make_loader(dataset, config.num_workers, pin, batch_sampler=self.sampler)
        if config.knn_every == 0 and not config.probe_every:
            return
        transform = eval_transform(config.size, config.mean, config.std)
        loaders = [make_loader(EvalDataset(samples, transform), config.num_workers, pin, persistent=False,
                               batch_size=max(config.batch_size * 2, 64))
                   for samples in (self.index.samples, self.val_index.samples if self.val_index else None)
                   if samples is not None]
        prepared = accelerator.prepare(*loaders)
        self.knn_loaders = (prepared, None) if len(loaders) == 1 else tuple(prepared)
        if self.val_index is None:
            logger.info("no val folder: the kNN monitor uses leave-one-out on the training folder")

    def train_epoch(self, epoch: int, should_stop: Callable[[int], bool], progress) -> EpochState | None:
        self.sampler.set_epoch(epoch, self.epoch_state.steps_done)
        config = self.config
        self.epoch_state = train_one_epoch(
            self.model, self.loss_fn, self.loader, self.optimizer, self.schedule, self.accelerator, epoch,
            supervised=config.method == "supcon", state=self.epoch_state, augment=self.augment,
            channels_last=config.channels_last, should_stop=should_stop, log_every=config.log_every,
            progress=progress, chunk_size=config.chunk_size, memory=self.memory, memory_warmup=config.memory_warmup)
        return self.epoch_state if self.epoch_state.steps_done == self.steps_per_epoch else None

    def stopped_mid_epoch(self, epoch: int) -> tuple[dict[str, dict[str, Any]], str]:
        run_dir = self.engine.run_dir
        message = (f"interrupted in epoch {epoch + 1} at step {self.epoch_state.steps_done}/{self.steps_per_epoch}; "
                   f"state saved to {run_dir / LAST}; continue with --resume --run-dir {run_dir}")
        return {LAST: self.checkpoint(epoch, self.epoch_state)}, message

    def end_epoch(self, epoch_done: int, state: EpochState) -> EpochEnd:
        config = self.config
        loss = self.engine.mean_over_processes(state.loss_sum / self.steps_per_epoch)
        spread = self.engine.mean_over_processes(state.spread_sum / self.steps_per_epoch)
        images_per_s = self.global_batch * self.steps_per_epoch / max(state.seconds, 1e-9)
        row = {"epoch": epoch_done, "loss": round(loss, 6), "collapsed_loss": round(self.collapsed_value, 6),
               "spread": round(spread, 6), "knn_accuracy": None,
               "lr": self.schedule.lr_at((epoch_done - 1) * self.steps_per_epoch),
               "images_per_s": round(images_per_s, 2), "epoch_seconds": round(state.seconds, 3)}
        last_epoch = self.last_epoch
        knn_due = config.knn_every > 0 and (epoch_done % config.knn_every == 0 or epoch_done == last_epoch)
        probe_due = bool(config.probe_every) and (epoch_done % config.probe_every == 0 or epoch_done == last_epoch)
        self.probe = None
        if self.knn_loaders is not None and (knn_due or probe_due):
            started = time.perf_counter()
            features = self._monitor_features()
            encoding = time.perf_counter() - started
            if knn_due:
                row["knn_accuracy"] = round(self._knn_monitor(*features), 6)
            if probe_due and features[2] is not None:
                self.probe = live_probe(epoch_done, *features, len(self.index.classes), config.probe_max_images,
                                        config.seed)
                if not knn_due:  # the encoder pass was for the probe alone: its cost too
                    self.probe.seconds += encoding
                row.update(self.probe.row())
        knn_text = f" kNN {row['knn_accuracy']:.4f}" if row["knn_accuracy"] is not None else ""
        probe_text = f" {self.probe.summary()}" if self.probe is not None else ""
        summary = (f"loss {loss:.4f} (collapsed {self.collapsed_value:.4f}) spread {spread:.4f}{knn_text}{probe_text} "
                   f"lr {row['lr']:.4g} {images_per_s:.0f} img/s {state.seconds:.1f}s")
        fired = self.detector.update(loss, self.collapsed_value, spread, config.feat_dim)
        end_reason = self._plateau_step(epoch_done, loss, row)
        self.epoch_state = EpochState()
        checkpoint = self.checkpoint(epoch_done, self.epoch_state)
        files = {LAST: checkpoint}
        if epoch_done % config.save_freq == 0 or epoch_done == config.epochs or epoch_done == self.last_epoch:
            files = {epoch_checkpoint_name(epoch_done): checkpoint, LAST: checkpoint}
        if fired:
            logger.warning("epoch %d: the loss has sat at the collapsed value %.4f for %d epochs: %s", epoch_done,
                           self.collapsed_value, self.detector.epochs_collapsed, COLLAPSE_ADVICE)
            if config.stop_on_collapse and end_reason is None:
                self.stopped_on_collapse = True
                end_reason = f"stopping (--stop-on-collapse); checkpoints are kept in {self.engine.run_dir}"
        return EpochEnd(row, summary, files, end_reason)

    @property
    def last_epoch(self) -> int:
        """The epoch the run ends with: ``--epochs``, or the end of the cool-down once ``--until plateau`` decided."""
        decision = self.plateau.decision if self.plateau is not None else None
        return decision.last_epoch if decision is not None else self.config.epochs

    def _plateau_step(self, epoch_done: int, loss: float, row: dict[str, Any]) -> str | None:
        """``--until plateau``: record the epoch, decide on a cool-down; the end message at its last epoch."""
        if self.plateau is None:
            return None
        self.plateau.record_loss(epoch_done, loss)
        if self.probe is not None:
            self.plateau.record_probe(epoch_done, self.probe.val_accuracy, self.probe.num_val)
        decision = self.plateau.check(epoch_done, probed=self.probe is not None)
        if decision is not None:
            self._cool_down(decision)
            row["stop_decision"] = decision.reason
            logger.info("epoch %d: %s: cooling down over %s", epoch_done, decision.reason, decision.cooldown_text)
        if self.plateau.decision is not None and epoch_done >= self.plateau.decision.last_epoch:
            return self.plateau.decision.message()
        return None

    def checkpoint(self, epochs_done: int, state: EpochState) -> dict[str, Any]:
        """The checkpoint after ``epochs_done`` epochs and ``state.steps_done`` steps of the next."""
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        scaler = self.accelerator.scaler
        return supcon_checkpoint(
            model_config=self.model_config, encoder=unwrapped.encoder.state_dict(), head=unwrapped.head.state_dict(),
            epoch=epochs_done, global_step=epochs_done * self.steps_per_epoch + state.steps_done, config=self.options,
            class_names=self.index.classes, mean=self.config.mean, std=self.config.std,
            data_folder=self.config.data_folder,
            resume_state={"optimizer": self.optimizer.state_dict(),
                          "scaler": scaler.state_dict() if scaler is not None else None,
                          "epoch_state": vars(state).copy(), "collapse": self.detector.state_dict(),
                          "rng": rng_state(),
                          "memory": self.memory.state_dict() if self.memory is not None else None,
                          "plateau": self.plateau.state_dict() if self.plateau is not None else None},
            live_probe=self.probe.to_dict() if self.probe is not None and state.steps_done == 0 else None)

    def _monitor_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The encoder's features of the training images and of the val images (None without a val folder)."""
        accelerator = self.accelerator
        encoder = accelerator.unwrap_model(self.model).encoder
        bank_loader, query_loader = self.knn_loaders
        bank_features, bank_labels = extract_features(encoder, bank_loader, accelerator)
        if query_loader is None:
            return bank_features, bank_labels, None, None
        return (bank_features, bank_labels, *extract_features(encoder, query_loader, accelerator))

    def _knn_monitor(self, bank_features, bank_labels, query_features, query_labels) -> float:
        """Weighted kNN accuracy of the encoder's features: val queries against the training bank."""
        config = self.config
        num_classes = len(self.index.classes)
        if query_features is None:
            return knn_accuracy(bank_features, bank_labels, bank_features, bank_labels, num_classes, config.knn_k,
                                config.knn_temperature, exclude_self=True)
        return knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes, config.knn_k,
                            config.knn_temperature)


def _refuse_changes(engine: RunEngine, recorded: RecordedRun | None, config: TrainConfig, global_batch: int) -> None:
    """Refuse to resume with other options; a larger ``--epochs`` is allowed where the schedule does not depend on it.

    Raises:
        UserError: naming the differences (for ``--epochs``, why the cosine schedule cannot be extended).
    """
    ignore = RUNTIME_KEYS - PLATEAU_KEYS if config.until == "plateau" else RUNTIME_KEYS
    if recorded is not None and recorded.options.get("epochs") not in (None, config.epochs):
        run_epochs = int(recorded.options["epochs"])
        if config.schedule_kind != "step" or config.epochs < run_epochs:
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
           f"start a new run with the --epochs you want (the {config.schedule_kind} schedule is set by --epochs, "
           "so extending "
           "this run would not give the run a longer --epochs gives)")
    return (f"run {run_dir} is finished: {done} of {config.epochs} epochs done, nothing to train. Probe it with "
            f"probe-all --run {run_dir}; to train longer, {how}")


def _check_folders(config: TrainConfig, engine: RunEngine,
                   progress: bool) -> tuple[ImageFolderIndex, ImageFolderIndex | None, int, Any]:
    """Scan the data and val folders and decode every training image once (main process).

    Returns:
        ``(index without bad images, val index, number of bad images, FolderCheck)``.
    """
    allow = config.allow_split_class_names
    index = scan_image_folder(config.data_folder, "data folder", allow_split_names=allow)
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
    return index.without([p for p, _ in check.bad]), val_index, len(check.bad), check


def _log_resolution(config: TrainConfig, facts: dict[str, Any]) -> None:
    if facts["learning_rate_rule"] == LR_RULE_GIVEN:
        logger.info("learning rate %.6g (from --learning-rate)", config.learning_rate)
    else:
        logger.info("learning rate %.6g = 0.5 x %d (global batch) / 1024 (linear scaling rule)",
                    config.learning_rate, facts["global_batch"])
    if facts["auto_warm"]:
        logger.info("global batch %d > %d: %d-epoch linear warm-up switched on (--warm)", facts["global_batch"],
                    AUTO_WARM_ABOVE_BATCH, config.warm_epochs)


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
    finished = _finished_message(run_dir, resume_state, config) if resume_state is not None else None
    if finished:
        logger.info("%s", finished)
        return TrainResult(run_dir=run_dir, epochs_done=int(resume_state["epoch"]))

    index, val_index, bad_images, check = _check_folders(config, engine, progress)
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
    return TrainResult(run_dir=run_dir, epochs_done=outcome.epochs_done, interrupted_by=outcome.interrupted_by,
                       stopped_on_collapse=trainer.stopped_on_collapse, history=outcome.history,
                       stop_decision=trainer.plateau.decision if trainer.plateau is not None else None)

