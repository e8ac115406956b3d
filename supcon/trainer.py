"""SupCon's part of a run: :class:`SupConTrainer` (model, two-view epochs, kNN and collapse monitors, live
probe, ``--until plateau``, checkpoint contents) and the learning-rate schedule it trains with.

The run's lifecycle (run directory, resume, metric sinks, epoch loop, stop handling, saving) is
:class:`supcon.engine.RunEngine`'s; the epoch of steps is :func:`supcon.epoch.train_one_epoch`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import set_seed

from supcon.checkpoint import rng_state, set_rng_state
from supcon.config import TrainConfig, to_yaml_dict
from supcon.data import (
    EvalDataset,
    ImageFolderIndex,
    MultiViewDataset,
    eval_transform,
    make_loader,
    two_view_augmentation,
)
from supcon.engine import EpochEnd, RunEngine
from supcon.epoch import EpochState, train_one_epoch
from supcon.health import COLLAPSE_ADVICE, CollapseDetector, collapsed_loss, extract_features, knn_accuracy
from supcon.live_probe import PROBE_FIELDS, LiveProbe, live_probe
from supcon.losses import SupConLoss
from supcon.memory import ProjectionMemory
from supcon.models import build_model, model_config_from
from supcon.optim import build_optimizer, implementation_of, keep_implementation
from supcon.rundir import LAST, RunKind, epoch_checkpoint_name, make_run_info, supcon_checkpoint
from supcon.sampling import make_batch_sampler
from supcon.schedule import LRSchedule
from supcon.stopping import PlateauRule, StopDecision

logger = logging.getLogger(__name__)

N_VIEWS = 2
METRIC_FIELDS = ["epoch", "loss", "collapsed_loss", "spread", "knn_accuracy", "lr", "images_per_s", "epoch_seconds",
                 *PROBE_FIELDS, "stop_decision"]
TENSORBOARD_TAGS = {"loss": "train/loss", "collapsed_loss": "train/collapsed_loss", "spread": "train/spread",
                    "lr": "train/lr", "images_per_s": "train/images_per_s", "knn_accuracy": "monitor/knn_accuracy",
                    "probe_accuracy": "monitor/probe_accuracy", "probe_loss": "monitor/probe_loss"}


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
        self.plateau = (PlateauRule(config.plateau_patience, config.cooldown_fraction, ceiling=config.epochs,
                                    tolerance=config.plateau_tolerance)
                        if config.until == "plateau" else None)
        self.stopped_on_collapse = False
        self.probe: LiveProbe | None = None  # the live probe of the epoch being saved
        #: every live probe of the run (epoch, accuracy, num_val, correct), kept in the checkpoints so that the
        #: --until plateau rule can be replayed on any run exactly (scripts/replay_until_plateau.py)
        self.probe_history: list[dict[str, Any]] = []
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
        self.probe_history = [dict(p) for p in state.get("probe_history") or []]
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
            if self.plateau.decision is not None:
                self._cool_down(self.plateau.decision)
        return int(state["epoch"])

    def _cool_down(self, decision: StopDecision) -> None:
        self.schedule = self.schedule.with_cooldown(decision.epoch, decision.cooldown_epochs)

    def run_info(self, bad_images: int) -> dict[str, Any]:
        return make_run_info(
            RunKind.SUPCON, class_names=self.index.classes, data_folder=self.config.data_folder,
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
        self.sampler = make_batch_sampler(config.sampler, self.index.targets, config.batch_size, config.seed,
                                          accelerator.process_index, self.engine.world)
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
        end_reason = self._plateau_step(epoch_done, row)
        self.epoch_state = EpochState()
        checkpoint = self.checkpoint(epoch_done, self.epoch_state)
        files = {LAST: checkpoint}
        if epoch_done % config.save_freq == 0 or epoch_done == config.epochs or epoch_done == self.last_epoch:
            files = {epoch_checkpoint_name(epoch_done): checkpoint, LAST: checkpoint}
        if fired:
            logger.warning("epoch %d: the loss has sat at the collapsed value %.4f for %d epochs: %s", epoch_done,
                           self.collapsed_value, self.detector.epochs_collapsed, COLLAPSE_ADVICE)
            if (config.stop_on_collapse or config.until == "plateau") and end_reason is None:
                self.stopped_on_collapse = True
                option = "--stop-on-collapse" if config.stop_on_collapse else "--until plateau"
                end_reason = (f"stopping ({option}): the loss sat at the collapsed level for "
                              f"{self.detector.epochs_collapsed} epochs; checkpoints are kept in {self.engine.run_dir}")
        return EpochEnd(row, summary, files, end_reason)

    @property
    def last_epoch(self) -> int:
        """The epoch the run ends with: ``--epochs``, or the end of the cool-down once ``--until plateau`` decided."""
        decision = self.plateau.decision if self.plateau is not None else None
        return decision.last_epoch if decision is not None else self.config.epochs

    def _plateau_step(self, epoch_done: int, row: dict[str, Any]) -> str | None:
        """``--until plateau``: record the epoch, decide on a cool-down; the end message at its last epoch."""
        if self.probe is not None:
            self.probe_history = [p for p in self.probe_history if p["epoch"] < epoch_done] + [
                {"epoch": epoch_done, "accuracy": self.probe.val_accuracy, "num_val": self.probe.num_val,
                 "correct": self.probe.val_correct}]
        if self.plateau is None:
            return None
        if self.probe is not None:
            self.plateau.record_probe(epoch_done, self.probe.val_accuracy, self.probe.num_val,
                                     self.probe.val_correct)
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
                          "plateau": self.plateau.state_dict() if self.plateau is not None else None,
                          "probe_history": [dict(p) for p in self.probe_history]},
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
