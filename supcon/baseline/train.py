"""Supervised baseline training: ``train_one_epoch``, ``evaluate``, early stopping, and the run loop.

The run directory follows the contract of :mod:`supcon.rundir`; the lifecycle is
:class:`supcon.engine.RunEngine`'s, and :class:`BaselineTrainer` supplies the classifier step,
validation, early stopping and ``best.pth``::

    RUN/config.yaml     every resolved option + run_info (kind: baseline, classes, folders, mean/std, ...)
    RUN/best.pth        the best-by-validation weights (model_config, class names, mean/std, best epoch)
    RUN/last.pth        the newest state, for --resume (optimizer, scheduler, RNG, early stopping)
    RUN/metrics.csv     one row per epoch: train loss/accuracy, val loss/accuracy/AUC/F1, lr, time
    RUN/tensorboard/    TensorBoard events

``last.pth`` is written after every epoch. SIGTERM/Ctrl-C stops within a step and leaves the
previous ``last.pth``; ``--resume`` redoes the interrupted epoch exactly (data order, crops and
RNG states are functions of the seed and epoch), so a resumed run ends with the weights of an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from supcon.baseline.config import RUNTIME_KEYS, BaselineConfig
from supcon.baseline.data import AugmentedDataset, stratified_split, train_transform
from supcon.baseline.init_from import InitSource, resolve_init_source
from supcon.baseline.losses import ClassifierLoss, logits_to_probabilities
from supcon.baseline.models import build_classifier, check_input_size, describe_model, freeze_blocks, make_model_config
from supcon.checkpoint import rng_state, set_rng_state
from supcon.config import to_yaml_dict
from supcon.data import (
    EpochBatchSampler,
    EvalDataset,
    check_images,
    eval_transform,
    make_loader,
    report_bad_images,
    scan_image_folder,
)
from supcon.engine import EpochEnd, RecordedRun, RunEngine, default_precision, exit_code
from supcon.errors import UserError
from supcon.metrics import classification_metrics
from supcon.rundir import (
    BAD_IMAGES_FILE,
    BASELINE_KIND,
    BEST,
    LAST,
    baseline_checkpoint,
    find_split_folder,
    image_listing,
    load_baseline_checkpoint,
    make_run_info,
)

logger = logging.getLogger(__name__)

METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr",
                 "best", "images_per_s", "epoch_seconds"]
TENSORBOARD_TAGS = {key: key.replace("_", "/", 1) for key in
                    ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr")}


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite (the run's earlier checkpoints are kept)."""


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


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: ClassifierLoss,
    loader,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    epoch: int,
    *,
    should_stop: Callable[[int], bool] = lambda step: False,
    progress=None,
) -> dict[str, float] | None:
    """Train one epoch (0-based ``epoch``); returns ``loss`` (incl. auxiliary terms), ``accuracy``,
    ``images`` and ``seconds`` over all processes, or None when ``should_stop(step)`` cut it short.

    Raises:
        UserError: the loss became NaN or infinite.
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with accelerator.autocast():
            outputs = model(images)
        loss = loss_fn(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        with torch.no_grad():
            predicted = logits_to_probabilities(outputs["logits"]).argmax(1)
            loss_sum += loss.detach().double() * labels.shape[0]
            correct += (predicted == labels).sum()
            seen += labels.shape[0]
        if progress is not None:
            progress.update(1)
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / seen.item():.4f}",
                                     acc=f"{correct.item() / seen.item():.3f}")
        if should_stop(step) and step + 1 < len(loader):  # a finished epoch is kept
            return None
    totals = torch.stack([loss_sum, correct.double(), seen.double()])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    loss_total, correct_total, seen_total = totals.tolist()
    loss_value = loss_total / max(seen_total, 1)
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"the training loss became non-finite in epoch {epoch + 1}; the last good checkpoint is "
                            "kept. Try a lower --learning-rate")
    return {"loss": loss_value, "accuracy": correct_total / max(seen_total, 1), "images": seen_total,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every sample of a prepared ``loader``, gathered from every process, in order."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)["logits"]
        all_logits.append(accelerator.gather_for_metrics(logits.float().contiguous()).cpu())
        all_labels.append(accelerator.gather_for_metrics(labels).cpu())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(model: torch.nn.Module, loss_fn: ClassifierLoss, loader, accelerator: Accelerator) -> dict[str, float]:
    """``loss`` (main output only), ``accuracy``, ``auc`` (NaN if undefined) and macro ``f1`` on ``loader``."""
    logits, labels = predict(model, loader, accelerator)
    metrics = classification_metrics(labels.numpy(), logits_to_probabilities(logits).numpy()).summary()
    metrics["loss"] = float(loss_fn.single(logits, labels).item())
    return metrics


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


@dataclass
class BaselineResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    interrupted_by: int | None = None  # signal number
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code(self.interrupted_by)


@dataclass
class PreparedData:
    """The checked images of a run: class names, train and val samples, where they came from, mean/std."""

    classes: list[str]
    train_samples: list[tuple[str, int]]
    val_samples: list[tuple[str, int]]
    data_folder: str
    val_folder: str | None
    val_split: dict[str, Any] | None
    test_folder: str | None
    bad_images: int
    mean: list[float] | None = None
    std: list[float] | None = None


def _scan_same_classes(folder: str, what: str, classes: list[str], allow_split_names: bool = False):
    index = scan_image_folder(folder, what, allow_split_names=allow_split_names)
    if index.classes != classes:
        raise UserError(f"class names differ between the data folder {classes} and the {what} {index.classes}")
    return index


def prepare_data(config: BaselineConfig, engine: RunEngine, list_dir: Path | None = None) -> PreparedData:
    """Scan and check the folders, split off validation if needed, and compute mean/std if not given.

    Val folder: ``--val-folder``, else a sibling ``val`` of the data folder, else a stratified
    ``--val-split`` of the data folder (seeded by ``--split-seed``). Test folder (recorded for
    check-accuracies): ``--test-folder`` (checked now), else a sibling ``test`` if there is one
    (:func:`supcon.rundir.find_split_folder`). Mean/std, when not given, are computed on the
    training part only. Unreadable images are all listed in ``bad_images.txt`` of ``list_dir``
    [default: the engine's run directory].

    Raises:
        UserError: a missing or empty folder, < 2 classes, an empty class, class names that differ
            between folders, an unreadable image (unless ``--skip-bad-images``).
    """
    allow = config.allow_split_class_names
    index = scan_image_folder(config.data_folder, "data folder", allow_split_names=allow)
    data_folder = str(Path(index.root).resolve())
    val_folder = find_split_folder("val", config.val_folder, data_folder)
    val_split = None
    if val_folder:
        val_index = _scan_same_classes(val_folder, "val folder", index.classes, allow)
        train_samples, val_samples = index.samples, val_index.samples
    else:
        train_samples, val_samples = stratified_split(index.samples, config.val_split, config.split_seed, index.classes)
        val_split = {"fraction": config.val_split, "seed": config.split_seed}
    if config.test_folder:
        _scan_same_classes(config.test_folder, "test folder", index.classes, allow)
    test_folder = find_split_folder("test", config.test_folder, data_folder)

    need_stats = config.mean is None
    checks = None
    if engine.is_main:
        desc = "checking images, computing mean/std" if need_stats else "checking images"
        checks = (check_images([p for p, _ in train_samples], need_stats, config.num_workers, engine.progress, desc),
                  check_images([p for p, _ in val_samples], False, config.num_workers, engine.progress,
                               "checking val images"))
    train_check, val_check = engine.broadcast(checks)
    bad = train_check.bad + val_check.bad
    list_dir = list_dir or engine.run_dir
    report_bad_images(bad, config.skip_bad_images, list_dir / BAD_IMAGES_FILE if list_dir else None,
                      write_list=engine.is_main)
    bad_paths = {p for p, _ in bad}
    train_samples = [s for s in train_samples if s[0] not in bad_paths]
    val_samples = [s for s in val_samples if s[0] not in bad_paths]
    if not val_samples:
        raise UserError("no readable validation images are left")
    if need_stats:
        logger.info("mean %s, std %s computed from %d training images", train_check.mean, train_check.std,
                    len(train_samples))
    if val_split is not None:
        val_split.update(num_train=len(train_samples), num_val=len(val_samples))
        logger.info("no val folder: %d images (%.0f%% of each class, --split-seed %d) held out for validation, "
                    "%d for training", len(val_samples), 100 * config.val_split, config.split_seed, len(train_samples))
    return PreparedData(index.classes, train_samples, val_samples, data_folder, val_folder, val_split, test_folder,
                        len(bad), train_check.mean, train_check.std)


def _result_from_state(run_dir: Path, state: dict[str, Any]) -> BaselineResult:
    return BaselineResult(run_dir=run_dir, epochs_done=int(state["epoch"]), best_epoch=int(state["best_epoch"]),
                          best_val_accuracy=state.get("best_val_accuracy"), best_val_loss=state.get("best_val_loss"),
                          stopped_early=bool(state.get("stopped_early")))


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
        self.loss_fn = ClassifierLoss(config.loss, config.aux_weight)
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
            BASELINE_KIND, class_names=data.classes, data_folder=data.data_folder, val_folder=data.val_folder,
            model_config=self.model_config, num_processes=self.engine.world, global_batch=self.global_batch,
            steps_per_epoch=self.steps_per_epoch, bad_images_skipped=data.bad_images, device=self.engine.device_name,
            description=self.description, val_split=data.val_split, test_folder=data.test_folder,
            mean=list(config.mean), std=list(config.std), size=config.size, frozen_blocks=self.frozen,
            num_train_images=len(data.train_samples), num_val_images=len(data.val_samples),
            init_from=self.init_record)

    def make_loaders(self) -> None:
        config, pin = self.config, self.engine.on_gpu
        dataset = AugmentedDataset(self.data.train_samples, train_transform(config.augment, config.size, config.mean,
                                                                           config.std), seed=config.seed)
        self.sampler = EpochBatchSampler(len(dataset), config.batch_size, config.seed,
                                         self.accelerator.process_index, self.engine.world)
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
        files = {LAST: self.checkpoint(epoch_done, **self._resume_state(epoch_done))}
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

    def _resume_state(self, epoch_done: int) -> dict[str, Any]:
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


def _start(config: BaselineConfig, progress: bool) -> tuple[BaselineConfig, RunEngine, RecordedRun | None]:
    """Validate, open the run directory and refuse or resume; returns the config with its precision."""
    config = replace(config)
    config.validate()
    config = replace(config, precision=config.precision or default_precision())
    engine = RunEngine(config.precision, progress)
    try:
        engine.choose_run_dir(config.run_dir, config.resume, f"{config.model}_baseline", config.batch_size)
        resume = engine.resume_wanted(config.resume)
        recorded = engine.open_existing(resume)
        config = replace(config, resume=resume, batch_size=engine.per_process_batch(recorded, config.batch_size))
        global_batch = config.batch_size * engine.world
        engine.refuse_changes(recorded, to_yaml_dict(config), RUNTIME_KEYS, global_batch, config.batch_size,
                              defaults=to_yaml_dict(BaselineConfig()))
    except BaseException:
        engine.close()
        raise
    if recorded is not None and config.mean is None:
        config = replace(config, mean=recorded.options.get("mean"), std=recorded.options.get("std"))
    return config, engine, recorded


def train(config: BaselineConfig, progress: bool = True, data: PreparedData | None = None) -> BaselineResult:
    """Train (or resume) one supervised baseline as configured; returns where and how it ended.

    ``data``: the folders already checked by :func:`prepare_data` for this config's folders (the grid
    checks them once for all its runs).

    Raises:
        UserError: bad input (paths, images, options, model) or a conflicting run directory, before
            anything is written; a non-finite loss during training.
    """
    config, engine, recorded = _start(config, progress)
    try:
        with engine.failures_as_messages():
            return _train(engine, config, recorded, progress, data)
    finally:
        engine.close()


def _train(engine: RunEngine, config: BaselineConfig, recorded: RecordedRun | None, progress: bool,
           data: PreparedData | None) -> BaselineResult:
    resume_state = engine.last_state(load_baseline_checkpoint, recorded)
    run_dir = engine.run_dir
    if resume_state is not None and resume_state.get("finished"):
        logger.info("run %s is finished (%d epochs, best epoch %d): nothing to train; check-accuracies tests its "
                    "%s. To train longer, start a new run", run_dir, resume_state["epoch"],
                    resume_state["best_epoch"], BEST)
        return _result_from_state(run_dir, resume_state)
    make_model_config(config.model, 2, "ce", config.head, config.head_hidden, config.small_input)  # name, head
    if config.pretrained_file and resume_state is None and not Path(config.pretrained_file).is_file():
        raise UserError(f"--pretrained-file not found: {config.pretrained_file}")
    init = None
    if config.init_from and resume_state is None:
        init = resolve_init_source(config.init_from, config.model, config.small_input, config.size)
        if config.mean is None and init.mean is not None:  # the inputs the encoder was trained on
            config = replace(config, mean=list(init.mean), std=list(init.std))
    data = data or prepare_data(config, engine)
    if config.mean is None:
        config = replace(config, mean=data.mean, std=data.std)
    if config.loss == "bce" and len(data.classes) != 2:
        raise UserError(f"--loss bce (one logit) needs exactly 2 classes, the data folder has {len(data.classes)}; "
                        "use ce")
    if len(data.train_samples) < config.batch_size * engine.world:
        raise UserError(f"the training part has {len(data.train_samples)} images, fewer than one batch of "
                        f"{config.batch_size * engine.world}; lower --batch-size")
    model_config = make_model_config(config.model, len(data.classes), config.loss, config.head, config.head_hidden,
                                     config.small_input)
    config = replace(config, head=model_config["head"], head_hidden=model_config["head_hidden"])
    engine.check_data(image_listing(data.train_samples, data.data_folder), recorded, config.allow_data_change,
                      int(resume_state["epoch"]) if resume_state is not None else 0)
    trainer = BaselineTrainer(engine, config, data, model_config, fresh=resume_state is None, init=init,
                              init_record=recorded.run_info.get("init_from") if recorded is not None else None)
    start_epoch = trainer.load(resume_state) if resume_state is not None else 0
    if start_epoch:
        logger.info("resuming %s at epoch %d (%d of %d epochs done)", run_dir, start_epoch + 1, start_epoch,
                    config.epochs)
    # last.pth and best.pth are overwritten in place: at most one more of each while it is written
    engine.check_disk_space(trainer.checkpoint(start_epoch, **trainer._resume_state(start_epoch)), trainer.optimizer,
                            1)
    engine.open_sinks(trainer.options, {**trainer.run_info(), **engine.session_facts(recorded, start_epoch)},
                      METRIC_FIELDS, TENSORBOARD_TAGS, start_epoch)
    trainer.make_loaders()
    outcome = engine.run_epochs(trainer, start_epoch, config.epochs, steps_per_epoch=trainer.steps_per_epoch)
    best = trainer.best_metrics
    result = BaselineResult(run_dir=run_dir, epochs_done=outcome.epochs_done, best_epoch=trainer.stopper.best_epoch,
                            best_val_accuracy=best.get("accuracy"), best_val_loss=best.get("loss"),
                            stopped_early=outcome.end_reason is not None, interrupted_by=outcome.interrupted_by,
                            history=outcome.history)
    if outcome.end_reason:
        logger.info("%s", outcome.end_reason)
    if result.best_epoch and result.interrupted_by is None:
        logger.info("best epoch %d: val accuracy %.4f, val loss %.4f; weights in %s", result.best_epoch,
                    result.best_val_accuracy, result.best_val_loss, run_dir / BEST)
    return result


def _round_or_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
