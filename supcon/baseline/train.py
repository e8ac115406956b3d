"""Supervised baseline training: ``train_one_epoch``, ``evaluate``, early stopping, and the run loop.

The run directory follows supcon-train's conventions (see :mod:`supcon.rundir`)::

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

import io
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from supcon.baseline.config import RUNTIME_KEYS, BaselineConfig
from supcon.baseline.data import AugmentedDataset, stratified_split, train_transform
from supcon.baseline.losses import ClassifierLoss, logits_to_probabilities
from supcon.baseline.models import build_model, check_input_size, describe_model, freeze_blocks, make_model_config
from supcon.checkpoint import LAST, atomic_write_bytes, rng_state, safe_load, set_rng_state
from supcon.config import config_differences, to_yaml_dict
from supcon.data import (
    EpochBatchSampler,
    EvalDataset,
    check_images,
    eval_transform,
    make_loader,
    report_bad_images,
    scan_image_folder,
)
from supcon.errors import UserError
from supcon.metrics import classification_metrics
from supcon.rundir import default_run_dir, has_run_content, open_run_outputs, read_config
from supcon.train import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    StopFlag,
    broadcast_from_main,
    default_precision,
    format_duration,
    make_accelerator,
    package_versions,
)

logger = logging.getLogger(__name__)

BASELINE_FORMAT = "supcon-baseline-checkpoint"
BASELINE_VERSION = 1
BEST = "best.pth"
METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr",
                 "best", "images_per_s", "epoch_seconds"]


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
    should_stop: Callable[[], bool] = lambda: False,
    progress=None,
) -> dict[str, float] | None:
    """Train one epoch (0-based ``epoch``); returns ``loss`` (incl. auxiliary terms), ``accuracy``,
    ``images`` and ``seconds`` over all processes, or None when ``should_stop()`` cut it short.

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
        if should_stop() and step + 1 < len(loader):  # a finished epoch is kept
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
        if self.interrupted_by is None:
            return 0
        return EXIT_SIGINT if self.interrupted_by == signal.SIGINT else EXIT_SIGTERM


def load_baseline_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load (``weights_only``) and sanity-check a baseline checkpoint.

    Raises:
        UserError: missing, unsafe or corrupt file, or not written by baseline-train.
    """
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != BASELINE_FORMAT:
        raise UserError(f"{path} is not a baseline-train checkpoint (no 'format: {BASELINE_FORMAT}' entry)")
    return state


@dataclass
class PreparedData:
    """The checked images of a run: class names, train and val samples, and where they came from."""

    classes: list[str]
    train_samples: list[tuple[str, int]]
    val_samples: list[tuple[str, int]]
    data_folder: str
    val_folder: str | None
    val_split: dict[str, Any] | None
    test_folder: str | None
    bad_images: int


def prepare_data(config: BaselineConfig, accelerator: Accelerator, progress: bool) -> PreparedData:
    """Scan and check the folders, split off validation if needed, and fill in mean/std.

    Val folder: ``--val-folder``, else a sibling ``val`` of the data folder, else a stratified
    ``--val-split`` of the data folder (seeded by ``--split-seed``). Test folder (recorded for
    check-accuracies): ``--test-folder`` (checked now), else a sibling ``test`` if there is one.
    Mean/std, when not given, are computed on the training part only.

    Raises:
        UserError: a missing or empty folder, < 2 classes, an empty class, class names that differ
            between folders, an unreadable image (unless ``--skip-bad-images``).
    """
    index = scan_image_folder(config.data_folder, "data folder")
    data_folder = Path(index.root).resolve()
    val_folder = config.val_folder
    if val_folder is None and (data_folder.parent / "val").is_dir():
        val_folder = str(data_folder.parent / "val")
    val_split = None
    if val_folder:
        val_index = scan_image_folder(val_folder, "val folder")
        if val_index.classes != index.classes:
            raise UserError(f"class names differ between the data folder {index.classes} and the val folder "
                            f"{val_index.classes}")
        train_samples, val_samples = index.samples, val_index.samples
        val_folder = str(Path(val_index.root).resolve())
    else:
        train_samples, val_samples = stratified_split(index.samples, config.val_split, config.split_seed, index.classes)
        val_split = {"fraction": config.val_split, "seed": config.split_seed}
    test_folder = config.test_folder
    if test_folder:
        test_index = scan_image_folder(test_folder, "test folder")
        if test_index.classes != index.classes:
            raise UserError(f"class names differ between the data folder {index.classes} and the test folder "
                            f"{test_index.classes}")
        test_folder = str(Path(test_index.root).resolve())
    elif (data_folder.parent / "test").is_dir():
        test_folder = str(data_folder.parent / "test")

    need_stats = config.mean is None
    checks = None
    if accelerator.is_main_process:
        desc = "checking images, computing mean/std" if need_stats else "checking images"
        checks = (check_images([p for p, _ in train_samples], need_stats, config.num_workers, progress, desc),
                  check_images([p for p, _ in val_samples], False, config.num_workers, progress, "checking val images"))
    train_check, val_check = broadcast_from_main(checks, accelerator)
    bad = train_check.bad + val_check.bad
    report_bad_images(bad, config.skip_bad_images)
    bad_paths = {p for p, _ in bad}
    train_samples = [s for s in train_samples if s[0] not in bad_paths]
    val_samples = [s for s in val_samples if s[0] not in bad_paths]
    if not val_samples:
        raise UserError("no readable validation images are left")
    if need_stats:
        config.mean, config.std = train_check.mean, train_check.std
        logger.info("mean %s, std %s computed from %d training images", config.mean, config.std, len(train_samples))
    if val_split is not None:
        val_split.update(num_train=len(train_samples), num_val=len(val_samples))
        logger.info("no val folder: %d images (%.0f%% of each class, --split-seed %d) held out for validation, "
                    "%d for training", len(val_samples), 100 * config.val_split, config.split_seed, len(train_samples))
    return PreparedData(index.classes, train_samples, val_samples, str(data_folder), val_folder, val_split,
                        test_folder, len(bad))


def _resolve_run_dir(config: BaselineConfig) -> Path:
    if config.resume and not config.run_dir:
        raise UserError("--resume needs --run-dir (the run to continue)")
    if config.run_dir:
        return Path(config.run_dir)
    holder = [str(default_run_dir(f"{config.model}_baseline", config.batch_size))]
    broadcast_object_list(holder)  # every process uses the main process's timestamp
    return Path(holder[0])


def _check_existing_run(run_dir: Path, config: BaselineConfig) -> dict[str, Any] | None:
    """The state to resume from (or None); refuses to overwrite a run or resume a different one."""
    if not config.resume:
        if has_run_content(run_dir):
            raise UserError(f"run dir {run_dir} already exists and is not empty; pass --resume to continue it, "
                            "or choose another --run-dir")
        return None
    if (run_dir / "config.yaml").is_file():
        stored = {k: v for k, v in read_config(run_dir).items() if k != "run_info"}
        requested = to_yaml_dict(config)
        diffs = config_differences(stored, requested, ignore=RUNTIME_KEYS)
        if diffs:
            details = ", ".join(f"{k}: run has {stored.get(k)!r}, now {requested.get(k)!r}" for k in diffs[:4])
            raise UserError(f"run dir {run_dir} was started with a different configuration ({details})")
    if not (run_dir / LAST).is_file():
        return None
    return load_baseline_checkpoint(run_dir / LAST)


def _result_from_state(run_dir: Path, state: dict[str, Any]) -> BaselineResult:
    return BaselineResult(run_dir=run_dir, epochs_done=int(state["epoch"]), best_epoch=int(state["best_epoch"]),
                          best_val_accuracy=state.get("best_val_accuracy"), best_val_loss=state.get("best_val_loss"),
                          stopped_early=bool(state.get("stopped_early")))


def train(config: BaselineConfig, progress: bool = True, data: PreparedData | None = None) -> BaselineResult:
    """Train (or resume) one supervised baseline as configured; returns where and how it ended.

    ``data``: the folders already checked by :func:`prepare_data` for this config's folders (the grid
    checks them once for all its runs; ``config.mean``/``std`` must then be set).

    Raises:
        UserError: bad input (paths, images, options, model) or a conflicting run directory, before
            anything is written; a non-finite loss during training.
    """
    from tqdm.auto import tqdm

    config = replace(config)
    config.validate()
    if config.precision is None:
        config.precision = default_precision()
    accelerator = make_accelerator(config.precision)
    is_main = accelerator.is_main_process
    global_batch = config.batch_size * accelerator.num_processes

    # 1. Everything that can fail on bad input, before anything is written.
    run_dir = _resolve_run_dir(config)
    resume_state = _check_existing_run(run_dir, config)
    if resume_state is not None and resume_state.get("finished"):
        logger.info("run %s already finished (%d epochs, best epoch %d); nothing to do", run_dir,
                    resume_state["epoch"], resume_state["best_epoch"])
        return _result_from_state(run_dir, resume_state)
    make_model_config(config.model, 2, "ce", config.head, config.head_hidden, config.small_input)  # name, head
    if config.pretrained_file and resume_state is None and not Path(config.pretrained_file).is_file():
        raise UserError(f"--pretrained-file not found: {config.pretrained_file}")
    if resume_state is not None and config.mean is None:
        config.mean, config.std = resume_state["mean"], resume_state["std"]
    if data is None:
        data = prepare_data(config, accelerator, progress)
    num_classes = len(data.classes)
    if config.loss == "bce" and num_classes != 2:
        raise UserError(f"--loss bce (one logit) needs exactly 2 classes, the data folder has {num_classes}; use ce")
    steps_per_epoch = len(data.train_samples) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"the training part has {len(data.train_samples)} images, fewer than one batch of "
                        f"{global_batch}; lower --batch-size")
    model_config = make_model_config(config.model, num_classes, config.loss, config.head, config.head_hidden,
                                     config.small_input)
    config.head, config.head_hidden = model_config["head"], model_config["head_hidden"]
    set_seed(config.seed)
    fresh = resume_state is None
    model = build_model(model_config, pretrained=config.pretrained and fresh,
                        pretrained_file=config.pretrained_file if fresh else None)
    check_input_size(model, config.size)
    frozen = freeze_blocks(model, config.freeze)
    if frozen:
        logger.info("frozen (BatchNorm statistics still update): %d blocks, %s ... %s", len(frozen), frozen[0],
                    frozen[-1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config)
    scheduler = make_scheduler(optimizer, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = ClassifierLoss(config.loss, config.aux_weight)
    stopper = EarlyStopping(config.patience, "min" if config.monitor == "val_loss" else "max")
    best_metrics: dict[str, float] = {}

    start_epoch = 0
    if resume_state is not None:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.backbone.load_state_dict(resume_state["encoder"])
        unwrapped.head.load_state_dict(resume_state["head"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"])
        stopper.load_state_dict(resume_state["early_stopping"])
        best_metrics = {"accuracy": resume_state.get("best_val_accuracy"), "loss": resume_state.get("best_val_loss")}
        start_epoch = int(resume_state["epoch"])
        logger.info("resuming %s after epoch %d", run_dir, start_epoch)

    description = describe_model(model_config, config.pretrained or bool(config.pretrained_file), config.freeze)
    run_info = {
        "kind": "baseline",
        "description": description,
        "class_names": data.classes,
        "num_classes": num_classes,
        "data_folder": data.data_folder,
        "val_folder": data.val_folder,
        "val_split": data.val_split,
        "test_folder": data.test_folder,
        "mean": list(config.mean),
        "std": list(config.std),
        "size": config.size,
        "model_config": model_config,
        "frozen_blocks": frozen,
        "num_train_images": len(data.train_samples),
        "num_val_images": len(data.val_samples),
        "bad_images_skipped": data.bad_images,
        "num_processes": accelerator.num_processes,
        "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "device": str(accelerator.device),
        "versions": package_versions(),
    }
    resolved = to_yaml_dict(config)
    resolved["run_dir"] = str(run_dir)
    metrics_csv, writer = open_run_outputs(run_dir, resolved, run_info, METRIC_FIELDS, start_epoch, is_main)
    accelerator.wait_for_everyone()

    # 2. Data.
    pin = accelerator.device.type == "cuda"
    train_dataset = AugmentedDataset(data.train_samples, train_transform(config.augment, config.size, config.mean,
                                                                         config.std), seed=config.seed)
    sampler = EpochBatchSampler(len(train_dataset), config.batch_size, config.seed, accelerator.process_index,
                                accelerator.num_processes)
    # Own generators: starting worker processes must not draw from the global RNG, which the model's
    # dropout/DropBlock use (a resumed run starts its workers at another epoch than an uninterrupted one).
    loader = make_loader(train_dataset, config.num_workers, pin, batch_sampler=sampler,
                         generator=torch.Generator().manual_seed(config.seed))
    val_dataset = EvalDataset(data.val_samples, eval_transform(config.size, config.mean, config.std))
    val_loader = accelerator.prepare(make_loader(val_dataset, config.num_workers, pin,
                                                 batch_size=max(2 * config.batch_size, 64),
                                                 generator=torch.Generator().manual_seed(config.seed)))

    def checkpoint(epoch_done: int, **extra) -> bytes:
        unwrapped = accelerator.unwrap_model(model)
        state = {
            "format": BASELINE_FORMAT,
            "version": BASELINE_VERSION,
            "kind": "baseline",
            "model_config": model_config,
            "description": description,
            "encoder": unwrapped.backbone.state_dict(),
            "head": unwrapped.head.state_dict(),
            "class_names": data.classes,
            "mean": list(config.mean),
            "std": list(config.std),
            "size": config.size,
            "epoch": epoch_done,
            "best_epoch": stopper.best_epoch,
            "best_val_accuracy": best_metrics.get("accuracy"),
            "best_val_loss": best_metrics.get("loss"),
            "monitor": config.monitor,
            "config": resolved,
            **extra,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    stop = StopFlag()
    stop.install()
    result = BaselineResult(run_dir=run_dir, epochs_done=start_epoch, best_epoch=stopper.best_epoch,
                            best_val_accuracy=best_metrics.get("accuracy"), best_val_loss=best_metrics.get("loss"))
    session_start, session_epochs = time.perf_counter(), 0
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       disable=not (progress and is_main), dynamic_ncols=True)
            lr = optimizer.param_groups[0]["lr"]
            train_stats = train_one_epoch(model, loss_fn, loader, optimizer, accelerator, epoch,
                                          should_stop=lambda: bool(stop), progress=bar)
            bar.close()
            if train_stats is None:
                result.interrupted_by = stop.signal
                logger.warning("interrupted in epoch %d; %s holds epoch %d; continue with --resume --run-dir %s "
                               "(the epoch is redone)", epoch + 1, run_dir / LAST, start_epoch + session_epochs,
                               run_dir)
                return result
            val = evaluate(model, loss_fn, val_loader, accelerator)
            epoch_done = epoch + 1
            improved = stopper.update(epoch_done, val[config.monitor.removeprefix("val_")])
            if improved:
                best_metrics = {"accuracy": val["accuracy"], "loss": val["loss"]}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val[config.monitor.removeprefix("val_")])
            elif scheduler is not None:
                scheduler.step()
            row = {"epoch": epoch_done, "train_loss": round(train_stats["loss"], 6),
                   "train_accuracy": round(train_stats["accuracy"], 6), "val_loss": round(val["loss"], 6),
                   "val_accuracy": round(val["accuracy"], 6), "val_auc": _round_or_none(val["auc"]),
                   "val_f1": round(val["f1"], 6), "lr": lr, "best": int(improved),
                   "images_per_s": round(train_stats["images"] / max(train_stats["seconds"], 1e-9), 2),
                   "epoch_seconds": round(train_stats["seconds"], 3)}
            result.history.append(row)
            finished = epoch_done == config.epochs or stopper.should_stop
            if is_main:
                metrics_csv.append(row)
                for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr"):
                    if row[key] is not None:
                        writer.add_scalar(key.replace("_", "/", 1), row[key], epoch_done)
                writer.flush()
                if improved:
                    atomic_write_bytes(checkpoint(epoch_done, val_accuracy=val["accuracy"], val_loss=val["loss"]),
                                       run_dir / BEST)
                atomic_write_bytes(checkpoint(
                    epoch_done, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    rng=rng_state(), early_stopping=stopper.state_dict(), finished=finished,
                    stopped_early=stopper.should_stop,
                ), run_dir / LAST)
            accelerator.wait_for_everyone()
            result.epochs_done = epoch_done
            result.best_epoch = stopper.best_epoch
            result.best_val_accuracy, result.best_val_loss = best_metrics.get("accuracy"), best_metrics.get("loss")
            session_epochs += 1
            eta = (time.perf_counter() - session_start) / session_epochs * (config.epochs - epoch_done)
            auc_text = f" auc {val['auc']:.4f}" if not math.isnan(val["auc"]) else ""
            logger.info("epoch %d/%d loss %.4f acc %.4f | val loss %.4f acc %.4f%s f1 %.4f%s | lr %.3g %.1fs ETA %s",
                        epoch_done, config.epochs, train_stats["loss"], train_stats["accuracy"], val["loss"],
                        val["accuracy"], auc_text, val["f1"], " (best)" if improved else "", lr,
                        train_stats["seconds"], format_duration(eta))
            if stopper.should_stop:
                result.stopped_early = True
                logger.info("early stopping: no improvement of %s for %d epochs (best epoch %d)", config.monitor,
                            config.patience, stopper.best_epoch)
                break
            if stop and not finished:
                result.interrupted_by = stop.signal
                logger.warning("interrupted after epoch %d; continue with --resume --run-dir %s", epoch_done, run_dir)
                return result
        if result.best_epoch:
            logger.info("best epoch %d: val accuracy %.4f, val loss %.4f; weights in %s", result.best_epoch,
                        result.best_val_accuracy, result.best_val_loss, run_dir / BEST)
        return result
    finally:
        stop.restore()
        if writer is not None:
            writer.close()


def _round_or_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
