"""The baseline's part of a run: :class:`BaselineTrainer` (the classifier epochs, validation, early stopping,
``best.pth``), its optimizer and per-epoch LR scheduler.

The run's lifecycle is :class:`supcon.engine.RunEngine`'s; the epoch of steps is
:func:`supcon.baseline.epoch.train_one_epoch`, the validation :func:`supcon.baseline.evaluate.evaluate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed

from supcon.baseline.config import BaselineConfig
from supcon.baseline.data import AugmentedDataset, PreparedData, train_transform
from supcon.baseline.epoch import train_one_epoch
from supcon.baseline.evaluate import evaluate
from supcon.baseline.init_from import InitSource
from supcon.baseline.losses import ClassifierLoss, class_weights_for
from supcon.baseline.models import build_classifier, check_input_size, describe_model, freeze_blocks
from supcon.checkpoint import rng_state, set_rng_state
from supcon.config import to_yaml_dict
from supcon.data import EvalDataset, eval_transform, make_loader
from supcon.engine import EpochEnd, RunEngine
from supcon.errors import UserError
from supcon.rundir import BEST, LAST, RunKind, baseline_checkpoint, make_run_info
from supcon.sampling import make_batch_sampler

logger = logging.getLogger(__name__)

METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr",
                 "best", "images_per_s", "epoch_seconds"]
TENSORBOARD_TAGS = {key: key.replace("_", "/", 1) for key in
                    ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr")}


@dataclass
class EarlyStopping:
    """Tracks the best validation value; ``should_stop`` after ``patience`` epochs without improvement.

    Only a strict improvement counts (so among equal values the earliest epoch stays best); a NaN
    never improves. ``patience=0`` never stops.

    Args:
        patience: epochs without improvement before stopping (0: off).
        mode: ``"min"`` (e.g. val loss) or ``"max"`` (e.g. val accuracy).
    """

    patience: int = 0
    mode: str = "min"
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record ``value`` for 1-based ``epoch``; True when it is the new best."""
        finite = not math.isnan(value)
        if self.best_value is None:
            improved = finite
        else:
            improved = finite and (value < self.best_value if self.mode == "min" else value > self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


def make_optimizer(params, config: BaselineConfig) -> torch.optim.Optimizer:
    """SGD (momentum), Adam or AdamW (betas), each with ``weight_decay``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    optimizer_class = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=config.learning_rate, betas=tuple(config.betas),
                           weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: BaselineConfig):
    """A per-epoch LR scheduler, or None: ``step`` (x lr_gamma every lr_step_epochs), ``cosine`` (to 0
    over ``epochs``), ``plateau`` (x lr_gamma after plateau_patience epochs without improvement of
    the monitored value)."""
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if config.monitor == "val_loss" else "max", factor=config.lr_gamma,
            patience=config.plateau_patience)
    return None


class BaselineTrainer:
    """The baseline's part of a run: the classifier step, validation, early stopping, ``best.pth``.

    Args:
        engine: the run's engine.
        config: the resolved config (precision, mean/std, head filled in).
        data: the checked images.
        model_config: :func:`supcon.baseline.models.make_model_config`'s.
        fresh: a new run (ImageNet or file weights are loaded; a resumed run loads its own).
    """

    def __init__(self, engine: RunEngine, config: BaselineConfig, data: PreparedData, model_config: dict[str, Any],
                 fresh: bool, init: InitSource | None = None, init_record: dict[str, Any] | None = None):
        self.engine, self.config, self.data, self.model_config = engine, config, data, model_config
        self.init_record = init.record() if init is not None else init_record
        self.accelerator = engine.accelerator
        self.global_batch = config.batch_size * engine.world
        self.steps_per_epoch = len(data.train_samples) // self.global_batch
        self.options = {**to_yaml_dict(config), "run_dir": str(engine.run_dir)}
        set_seed(config.seed)
        model = build_classifier(model_config, pretrained=config.pretrained and fresh,
                            pretrained_file=config.pretrained_file if fresh else None)
        if init is not None and fresh:
            try:
                model.backbone.load_state_dict(init.encoder, strict=True)
            except RuntimeError as exc:
                raise UserError(f"--init-from {init.path}: its encoder does not fit --model {config.model} "
                                f"({str(exc).splitlines()[0]})") from None
        check_input_size(model, config.size)
        self.frozen = freeze_blocks(model, config.freeze)
        if self.frozen:
            logger.info("frozen (BatchNorm statistics still update): %d blocks, %s ... %s", len(self.frozen),
                        self.frozen[0], self.frozen[-1])
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        self.scheduler = make_scheduler(optimizer, config)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.class_weights = class_weights_for(config.class_weights, [label for _, label in data.train_samples],
                                               data.classes)
        if self.class_weights is not None:
            logger.info("class weights (--class-weights %s): %s", config.class_weights,
                        ", ".join(f"{name} {w:.4g}" for name, w in zip(data.classes, self.class_weights)))
        self.loss_fn = ClassifierLoss(config.loss, config.aux_weight, self.class_weights)
        self.stopper = EarlyStopping(config.patience, "min" if config.monitor == "val_loss" else "max")
        self.best_metrics: dict[str, float | None] = {}
        started_from = None
        if self.init_record:
            started_from = (f"fine-tuned from SupCon {Path(self.init_record['run']).name} "
                            f"epoch {self.init_record['backbone_epoch']}")
        self.description = describe_model(model_config, config.pretrained or bool(config.pretrained_file),
                                          config.freeze, started_from)
        self.lr = config.learning_rate

    def load(self, state: dict[str, Any]) -> int:
        """Restore a ``last.pth``; returns the number of finished epochs."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.backbone.load_state_dict(state["encoder"])
        unwrapped.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.best_metrics = {"accuracy": state.get("best_val_accuracy"), "loss": state.get("best_val_loss")}
        return int(state["epoch"])

    def run_info(self) -> dict[str, Any]:
        data, config = self.data, self.config
        return make_run_info(
            RunKind.BASELINE, class_names=data.classes, data_folder=data.data_folder, val_folder=data.val_folder,
            model_config=self.model_config, num_processes=self.engine.world, global_batch=self.global_batch,
            steps_per_epoch=self.steps_per_epoch, bad_images_skipped=data.bad_images, device=self.engine.device_name,
            description=self.description, val_split=data.val_split, test_folder=data.test_folder,
            mean=list(config.mean), std=list(config.std), size=config.size, frozen_blocks=self.frozen,
            num_train_images=len(data.train_samples), num_val_images=len(data.val_samples),
            init_from=self.init_record, class_weights=self.class_weights)

    def make_loaders(self) -> None:
        config, pin = self.config, self.engine.on_gpu
        dataset = AugmentedDataset(self.data.train_samples, train_transform(config.augment, config.size, config.mean,
                                                                           config.std), seed=config.seed)
        self.sampler = make_batch_sampler(config.sampler, [label for _, label in self.data.train_samples],
                                          config.batch_size, config.seed, self.accelerator.process_index,
                                          self.engine.world)
        # Own generators: starting worker processes must not draw from the global RNG, which the model's
        # dropout/DropBlock use (a resumed run starts its workers at another epoch than an uninterrupted one).
        self.loader = make_loader(dataset, config.num_workers, pin, batch_sampler=self.sampler,
                                  generator=torch.Generator().manual_seed(config.seed))
        val_dataset = EvalDataset(self.data.val_samples, eval_transform(config.size, config.mean, config.std))
        self.val_loader = self.accelerator.prepare(make_loader(
            val_dataset, config.num_workers, pin, batch_size=max(2 * config.batch_size, 64),
            generator=torch.Generator().manual_seed(config.seed)))

    def train_epoch(self, epoch: int, should_stop: Callable[[int], bool], progress) -> dict[str, float] | None:
        self.sampler.set_epoch(epoch)
        self.lr = self.optimizer.param_groups[0]["lr"]
        return train_one_epoch(self.model, self.loss_fn, self.loader, self.optimizer, self.accelerator, epoch,
                               should_stop=should_stop, progress=progress)

    def stopped_mid_epoch(self, epoch: int) -> tuple[dict[str, dict[str, Any]], str]:
        run_dir = self.engine.run_dir
        return {}, (f"interrupted in epoch {epoch + 1}; {run_dir / LAST} holds the {epoch} finished epochs; continue "
                    f"with --resume --run-dir {run_dir} (epoch {epoch + 1} is redone)")

    def end_epoch(self, epoch_done: int, stats: dict[str, float]) -> EpochEnd:
        config = self.config
        val = evaluate(self.model, self.loss_fn, self.val_loader, self.accelerator)
        monitored = val[config.monitor.removeprefix("val_")]
        improved = self.stopper.update(epoch_done, monitored)
        if improved:
            self.best_metrics = {"accuracy": val["accuracy"], "loss": val["loss"]}
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored)
        elif self.scheduler is not None:
            self.scheduler.step()
        row = {"epoch": epoch_done, "train_loss": round(stats["loss"], 6),
               "train_accuracy": round(stats["accuracy"], 6), "val_loss": round(val["loss"], 6),
               "val_accuracy": round(val["accuracy"], 6), "val_auc": _round_or_none(val["auc"]),
               "val_f1": round(val["f1"], 6), "lr": self.lr, "best": int(improved),
               "images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 2),
               "epoch_seconds": round(stats["seconds"], 3)}
        files = {LAST: self.checkpoint(epoch_done, **self.resume_state_at(epoch_done))}
        if improved:
            files = {BEST: self.checkpoint(epoch_done, val_accuracy=val["accuracy"], val_loss=val["loss"]), **files}
        auc_text = f" auc {val['auc']:.4f}" if not math.isnan(val["auc"]) else ""
        summary = (f"loss {stats['loss']:.4f} acc {stats['accuracy']:.4f} | val loss {val['loss']:.4f} acc "
                   f"{val['accuracy']:.4f}{auc_text} f1 {val['f1']:.4f}{' (best)' if improved else ''} | "
                   f"lr {self.lr:.3g} {stats['seconds']:.1f}s")
        end_reason = None
        if self.stopper.should_stop:
            end_reason = (f"early stopping: no improvement of {config.monitor} for {config.patience} epochs "
                          f"(best epoch {self.stopper.best_epoch})")
        return EpochEnd(row, summary, files, end_reason)

    def resume_state_at(self, epoch_done: int) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                "early_stopping": self.stopper.state_dict(),
                "finished": epoch_done == self.config.epochs or self.stopper.should_stop,
                "stopped_early": self.stopper.should_stop}

    def checkpoint(self, epoch_done: int, **extra) -> dict[str, Any]:
        unwrapped = self.accelerator.unwrap_model(self.model)
        best = {"best_epoch": self.stopper.best_epoch, "best_val_accuracy": self.best_metrics.get("accuracy"),
                "best_val_loss": self.best_metrics.get("loss"), "monitor": self.config.monitor}
        return baseline_checkpoint(
            model_config=self.model_config, description=self.description, encoder=unwrapped.backbone.state_dict(),
            head=unwrapped.head.state_dict(), epoch=epoch_done, config=self.options, class_names=self.data.classes,
            mean=self.config.mean, std=self.config.std, size=self.config.size, best=best, **extra)


def _round_or_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
