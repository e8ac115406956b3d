"""SupCon pretraining: ``train_one_epoch`` and the run loop that owns saving, logging and resuming."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from supcon import __version__
from supcon.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST,
    atomic_write_bytes,
    epoch_checkpoint_name,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from supcon.config import TrainConfig, config_differences, to_yaml_dict
from supcon.data import (
    EpochBatchSampler,
    EvalDataset,
    MultiViewDataset,
    check_images,
    eval_transform,
    make_loader,
    report_bad_images,
    scan_image_folder,
    two_view_augmentation,
)
from supcon.errors import UserError
from supcon.health import (
    COLLAPSE_ADVICE,
    CollapseDetector,
    collapsed_loss,
    embedding_spread,
    extract_features,
    knn_accuracy,
)
from supcon.losses import SupConLoss
from supcon.models import build_model, check_model_name, model_config_from
from supcon.rundir import BAD_IMAGES_FILE, default_run_dir, has_run_content, open_run_outputs, read_config
from supcon.schedule import AUTO_WARM_ABOVE_BATCH, LRSchedule, linear_scaled_lr

logger = logging.getLogger(__name__)

N_VIEWS = 2
METRIC_FIELDS = ["epoch", "loss", "collapsed_loss", "spread", "knn_accuracy", "lr", "images_per_s", "epoch_seconds"]

#: Exit codes of an interrupted run (the shell's conventions for SIGINT / SIGTERM) and of a run
#: stopped by --stop-on-collapse.
EXIT_SIGINT, EXIT_SIGTERM, EXIT_COLLAPSE = 130, 143, 3


def default_precision() -> str:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator for ``precision``; CPU-only multi-process runs join a gloo group.

    Without ``cpu=True``, ``Accelerator()`` under ``torchrun`` on a CPU-only host leaves each
    process on its own, which would silently train N independent models.
    """
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs: dict[str, Any] = {}
    if multi_process and not torch.cuda.is_available():
        kwargs["cpu"] = True
    return Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision], **kwargs)


def build_optimizer(params, lr: float, momentum: float, weight_decay: float,
                    device: torch.device | str) -> torch.optim.SGD:
    """SGD with torch's fused kernel where this torch has one for ``device`` (CUDA, and the CPU since 2.4).

    The fused step updates every parameter in one kernel (one per chunk of tensors), where the default
    runs several multi-tensor kernels on a GPU (weight decay, momentum, update) and a Python loop of
    four ops per parameter on the CPU; the update it computes is the same (tests/test_step_overhead.py).
    With a GradScaler (fp16) it also unscales and skips on overflow inside the kernel, without the
    host sync of the unfused path.
    """
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: if a later torch moves it, CUDA has had the kernel since 2.2
        supported = {"cuda"}
    fused = torch.device(device).type in supported
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def keep_implementation(optimizer: torch.optim.Optimizer, implementation: list[dict]) -> None:
    """Restore each group's fused/foreach choice after ``load_state_dict`` (which copies the saved one)."""
    for group, chosen in zip(optimizer.param_groups, implementation):
        group.update(chosen)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and saves a resumable state."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop without waiting for the save
        self.signal = signum
        logger.warning("received %s: finishing this step, saving a resumable state, then exiting",
                       signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class EpochState:
    """Progress through one epoch, saved in a mid-epoch checkpoint so it resumes exactly."""

    steps_done: int = 0
    loss_sum: float = 0.0
    spread_sum: float = 0.0
    seconds: float = 0.0


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
) -> EpochState:
    """Train for one epoch (0-based ``epoch``) from ``state.steps_done``; returns the updated state.

    Args:
        augment: for the GPU data path, turns a device batch of images into ``[B, n_views, C, H, W]``
            views; ``None`` when the loader already yields views.
        should_stop: called after each step with the step index within the epoch; True stops early
            (``state.steps_done`` then tells where to resume).
        progress: an optional tqdm bar, advanced per step.

    Raises:
        UserError: the loss became NaN or infinite (names the epoch and step).
    """
    state = state or EpochState()
    model.train()
    device = accelerator.device
    steps_per_epoch = schedule.steps_per_epoch
    # Per step, the loss and the spread go into row `pending` of a small device buffer (2 copies,
    # no host sync); every `log_every` steps (and at the end) one transfer brings back the sums and
    # the first non-finite loss. A per-step check would stall the GPU's queue on every step.
    window = torch.zeros(max(log_every, 1), 2, device=device)
    pending = 0
    loss_sum, spread_sum = state.loss_sum, state.spread_sum
    start_step = state.steps_done
    start_time = time.perf_counter()
    steps = 0
    lr = schedule.lr_at(epoch * steps_per_epoch + start_step)

    def flush(last_step_in_epoch: int) -> None:
        """Add the pending rows to the sums; raise if one of their losses is not finite."""
        nonlocal loss_sum, spread_sum, pending
        rows = window[:pending]
        bad = ~torch.isfinite(rows[:, 0])
        first_bad = torch.where(bad.any(), bad.int().argmax(), -1)
        loss_total, spread_total, first = torch.cat([rows.sum(0), first_bad.view(1).float()]).tolist()
        if first >= 0:
            bad_step = last_step_in_epoch - pending + 1 + int(first)
            raise UserError(
                f"loss became non-finite at epoch {epoch + 1}, step {bad_step + 1} of {steps_per_epoch} "
                f"(global step {epoch * steps_per_epoch + bad_step}); the last good checkpoint is kept. "
                "Try a lower --learning-rate or --precision fp32"
            )
        loss_sum, spread_sum, pending = loss_sum + loss_total, spread_sum + spread_total, 0

    step_in_epoch = start_step - 1
    batch = 0
    for step_in_epoch, (images, labels) in enumerate(loader, start=start_step):
        global_step = epoch * steps_per_epoch + step_in_epoch
        lr = schedule.lr_at(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        views = augment(images, global_step) if augment is not None else images
        batch, n_views = views.shape[:2]
        inputs = views.flatten(0, 1)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            projection = model(inputs)["projection"]
        projection = projection.float().view(batch, n_views, -1)
        loss = loss_fn(projection, labels if supervised else None)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()

        window[pending, 0] = loss.detach()
        window[pending, 1] = embedding_spread(projection.detach()[:, 0])
        pending += 1
        steps += 1
        last_of_epoch = step_in_epoch + 1 == steps_per_epoch
        stopping = should_stop(step_in_epoch) and not last_of_epoch
        # Also check before stopping early: the caller saves the state we stop in.
        if pending == window.shape[0] or last_of_epoch or stopping:
            flush(step_in_epoch)
            if progress is not None:
                elapsed = state.seconds + time.perf_counter() - start_time
                done = state.steps_done + steps
                progress.set_postfix(
                    loss=f"{loss_sum / done:.4f}", lr=f"{lr:.3g}",
                    img_s=f"{done * batch * accelerator.num_processes / max(elapsed, 1e-9):.0f}",
                )
        if progress is not None:
            progress.update(1)
        if stopping:
            break
    if pending:  # the loader ended before the epoch's last step (e.g. a benchmark's few batches)
        flush(step_in_epoch)

    return EpochState(
        steps_done=state.steps_done + steps,
        loss_sum=loss_sum,
        spread_sum=spread_sum,
        seconds=state.seconds + time.perf_counter() - start_time,
    )


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted_by: int | None = None  # signal number
    stopped_on_collapse: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted_by == signal.SIGINT:
            return EXIT_SIGINT
        if self.interrupted_by is not None:
            return EXIT_SIGTERM
        return EXIT_COLLAPSE if self.stopped_on_collapse else 0


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _resolve_run_dir(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Pick the run directory and refuse anything that would overwrite a run."""
    if config.resume and not config.run_dir:
        raise UserError("--resume needs --run-dir (the run to continue)")
    if config.run_dir:
        return Path(config.run_dir)
    holder = [str(default_run_dir(config.model, config.batch_size))]
    broadcast_object_list(holder)  # every process uses the main process's timestamp
    return Path(holder[0])


def _check_existing_run(run_dir: Path, config: TrainConfig, global_batch: int) -> dict[str, Any] | None:
    """Returns the checkpoint to resume from (or None); refuses conflicting run directories."""
    last_path = run_dir / LAST
    if not config.resume:
        if has_run_content(run_dir):
            raise UserError(
                f"run dir {run_dir} already exists and is not empty; pass --resume to continue it, "
                "or choose another --run-dir"
            )
        return None
    if (run_dir / "config.yaml").is_file():
        stored = {k: v for k, v in read_config(run_dir).items() if k != "run_info"}
        requested = to_yaml_dict(config)
        requested["mean"], requested["std"] = config.mean, config.std
        diffs = config_differences(stored, requested)
        if diffs:
            details = ", ".join(f"{k}: run has {stored.get(k)!r}, now {requested.get(k)!r}" for k in diffs[:4])
            raise UserError(f"run dir {run_dir} was started with a different configuration ({details})")
        # Another number of processes changes the global batch, hence the LR, the steps per epoch and
        # what a mid-epoch position means.
        recorded_batch = read_config(run_dir).get("run_info", {}).get("global_batch")
        if recorded_batch is not None and recorded_batch != global_batch:
            raise UserError(
                f"run dir {run_dir} was trained with a global batch of {recorded_batch}, now {global_batch} "
                f"({config.batch_size} x {global_batch // config.batch_size} processes); resume it with the same "
                "number of processes"
            )
    for stale in run_dir.glob(".*.pth.*.tmp"):  # left by a kill -9 during a checkpoint write
        stale.unlink(missing_ok=True)
    if not last_path.is_file():
        return None
    return load_checkpoint(last_path)


def _recorded_option(config: TrainConfig, name: str, default: Any) -> Any:
    """The value a resumed run recorded for an option left to its automatic default, else ``default``."""
    if config.resume and config.run_dir and (Path(config.run_dir) / "config.yaml").is_file():
        recorded = read_config(Path(config.run_dir)).get(name)
        if recorded is not None:
            return recorded
    return default


def broadcast_from_main(obj, accelerator: Accelerator):
    """The main process's ``obj`` on every process (a no-op with one process)."""
    holder = [obj]
    if accelerator.num_processes > 1:
        broadcast_object_list(holder)
    return holder[0]


def package_versions() -> dict[str, str]:
    """Versions recorded in every run's config.yaml."""
    import accelerate
    import timm
    import torchvision

    return {"supcon": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "timm": str(timm.__version__), "accelerate": str(accelerate.__version__)}


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) SupCon pretraining as configured; returns where and how it ended.

    Raises:
        UserError: bad input (paths, images, options) or a conflicting run directory, before
            anything is written; a non-finite loss during training.
    """
    from tqdm.auto import tqdm

    config = replace(config)
    config.validate()
    check_model_name(config.model)  # before the images are decoded, not after
    if config.precision is None:
        config.precision = default_precision()
    accelerator = make_accelerator(config.precision)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    global_batch = config.batch_size * world
    on_gpu = accelerator.device.type == "cuda"
    if config.channels_last is None:
        config.channels_last = on_gpu
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    if config.gpu_augment is None:
        # On with a GPU; a resumed run keeps the data path it started with (it shapes the random stream).
        config.gpu_augment = _recorded_option(config, "gpu_augment", default=on_gpu)
    if config.grad_checkpointing and config.compile:
        raise UserError("--grad-checkpointing with --compile is not supported; use one of them")

    # 1. Everything that can fail on bad input, before anything is written.
    # Absolute paths, so a resumed run matches whatever the working directory.
    config.data_folder = str(Path(config.data_folder).expanduser().resolve())
    if config.val_folder:
        config.val_folder = str(Path(config.val_folder).expanduser().resolve())
    run_dir = _resolve_run_dir(config, accelerator)
    resume_state = _check_existing_run(run_dir, config, global_batch)
    index = scan_image_folder(config.data_folder, "data folder", allow_split_names=config.allow_split_class_names)
    val_folder = config.val_folder
    if val_folder is None and (Path(config.data_folder).parent / "val").is_dir():
        val_folder = str(Path(config.data_folder).parent / "val")
    val_index = (scan_image_folder(val_folder, "val folder", allow_split_names=config.allow_split_class_names)
                 if val_folder else None)
    config.val_folder = str(Path(val_folder).resolve()) if val_folder else None
    if val_index is not None and val_index.classes != index.classes:
        raise UserError(
            f"class names differ between the data folder {index.classes} and val folder {val_index.classes}")
    if resume_state is not None and config.mean is None:
        config.mean, config.std = resume_state["mean"], resume_state["std"]
    need_stats = config.mean is None or config.std is None
    if need_stats and (config.mean is not None or config.std is not None):
        raise UserError("give both --mean and --std, or neither (they are then computed from the data folder)")
    check = None
    if is_main:
        desc = "checking images, computing mean/std" if need_stats else "checking images"
        check = check_images([p for p, _ in index.samples], need_stats, config.num_workers, progress, desc)
    check = broadcast_from_main(check, accelerator)
    report_bad_images(check.bad, config.skip_bad_images, run_dir / BAD_IMAGES_FILE, write_list=is_main)
    index = index.without([p for p, _ in check.bad])
    if need_stats:
        config.mean, config.std = check.mean, check.std
        logger.info("mean %s, std %s computed from %d images", config.mean, config.std, len(index.samples))
    steps_per_epoch = len(index.samples) // global_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"the data folder has {len(index.samples)} usable images, fewer than one global batch of {global_batch}; "
            "lower --batch-size"
        )
    if config.learning_rate is None:
        config.learning_rate = linear_scaled_lr(global_batch)
        logger.info("learning rate %.6g = 0.5 x %d (global batch) / 1024 (linear scaling rule)",
                    config.learning_rate, global_batch)
    else:
        logger.info("learning rate %.6g (from --learning-rate)", config.learning_rate)
    if config.warm is None:
        config.warm = global_batch > AUTO_WARM_ABOVE_BATCH
        if config.warm:
            logger.info("global batch %d > %d: %d-epoch linear warm-up switched on (--warm)",
                        global_batch, AUTO_WARM_ABOVE_BATCH, config.warm_epochs)
    model_config = model_config_from(config)

    set_seed(config.seed)
    model = build_model(**model_config, pretrained=config.pretrained, sync_bn=config.sync_bn and world > 1)
    if config.grad_checkpointing:
        from supcon.grad_checkpointing import enable_grad_checkpointing

        enable_grad_checkpointing(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay, device=accelerator.device)
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = LRSchedule(config.learning_rate, config.epochs, steps_per_epoch, cosine=config.cosine,
                          decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate, warm=config.warm,
                          warm_epochs=config.warm_epochs, warmup_from=config.warmup_from)
    loss_fn = SupConLoss(config.temp, config.base_temp)
    detector = CollapseDetector(patience=config.collapse_patience)
    collapsed_value = collapsed_loss(global_batch, N_VIEWS, config.temp, config.base_temp)

    start_epoch, epoch_state = 0, EpochState()
    if resume_state is not None:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.encoder.load_state_dict(resume_state["encoder"])
        unwrapped.head.load_state_dict(resume_state["head"])
        implementation = [{"fused": g.get("fused"), "foreach": g.get("foreach")} for g in optimizer.param_groups]
        optimizer.load_state_dict(resume_state["optimizer"])
        keep_implementation(optimizer, implementation)  # a checkpoint from an unfused run resumes fused
        if resume_state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"])
        detector.load_state_dict(resume_state.get("collapse", {}))
        start_epoch = int(resume_state["epoch"])
        epoch_state = EpochState(**resume_state.get("epoch_state", {}))
        logger.info("resuming %s from epoch %d%s", run_dir, start_epoch,
                    f", step {epoch_state.steps_done}" if epoch_state.steps_done else "")

    run_info = {
        "kind": "supcon",
        "class_names": index.classes,
        "num_classes": len(index.classes),
        "num_images": len(index.samples),
        "bad_images_skipped": len(check.bad),
        "data_folder": str(Path(config.data_folder).resolve()),
        "val_folder": str(Path(val_folder).resolve()) if val_folder else None,
        "num_processes": world,
        "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "learning_rate_rule": "0.5 x global_batch / 1024" if config.learning_rate == linear_scaled_lr(global_batch)
        else "given",
        "collapsed_loss": collapsed_value,
        "model_config": model_config,
        "device": str(accelerator.device) + (f" ({torch.cuda.get_device_name()})" if on_gpu else ""),
        "versions": package_versions(),
    }
    resolved = to_yaml_dict(config)
    resolved["run_dir"] = str(run_dir)
    metrics_csv, writer = open_run_outputs(run_dir, resolved, run_info, METRIC_FIELDS, start_epoch, is_main)
    accelerator.wait_for_everyone()

    # 2. Data.
    pin = on_gpu
    augment = None
    if config.gpu_augment:
        from supcon.gpu_augment import build_gpu_pipeline

        train_dataset, augment = build_gpu_pipeline(index.samples, config, accelerator.device, N_VIEWS)
    else:
        train_dataset = MultiViewDataset(index.samples, two_view_augmentation(
            config.size, config.mean, config.std, crop_min=config.crop_min, flip=config.flip),
                                         N_VIEWS, seed=config.seed)
    sampler = EpochBatchSampler(len(train_dataset), config.batch_size, config.seed, accelerator.process_index, world)
    loader = make_loader(train_dataset, config.num_workers, pin, batch_sampler=sampler)
    knn_loaders = None
    if config.knn_every > 0:
        tf = eval_transform(config.size, config.mean, config.std)
        eval_batch = max(config.batch_size * 2, 64)
        bank_loader = make_loader(EvalDataset(index.samples, tf), config.num_workers, pin, persistent=False,
                                  batch_size=eval_batch)
        query_loader = (make_loader(EvalDataset(val_index.samples, tf), config.num_workers, pin, persistent=False,
                                    batch_size=eval_batch) if val_index else None)
        knn_loaders = accelerator.prepare(bank_loader) if query_loader is None else accelerator.prepare(
            bank_loader, query_loader)
        if query_loader is None:
            knn_loaders = (knn_loaders, None)
            logger.info("no val folder: the kNN monitor uses leave-one-out on the training folder")

    stop = StopFlag()
    stop.install()

    def should_stop(step_in_epoch: int) -> bool:
        if world == 1:
            return bool(stop)
        if (step_in_epoch + 1) % config.log_every:
            return False
        flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def save(epoch_done: int, state: EpochState, numbered: bool) -> None:
        if is_main:
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model_config": model_config,
                "encoder": unwrapped.encoder.state_dict(),
                "head": unwrapped.head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "epoch": epoch_done,
                "global_step": epoch_done * steps_per_epoch + state.steps_done,
                "epoch_state": vars(state).copy(),
                "collapse": detector.state_dict(),
                "rng": rng_state(),
                "config": resolved,
                "class_names": index.classes,
                "mean": list(config.mean),
                "std": list(config.std),
                "data_folder": run_info["data_folder"],
            }
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            if numbered:
                atomic_write_bytes(data, run_dir / epoch_checkpoint_name(epoch_done))
            atomic_write_bytes(data, run_dir / LAST)
        accelerator.wait_for_everyone()

    result = TrainResult(run_dir=run_dir, epochs_done=start_epoch)
    session_start = time.perf_counter()
    session_epochs = 0
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch, epoch_state.steps_done)
            desc = f"epoch {epoch + 1}/{config.epochs}"
            if session_epochs:  # the run's ETA, from this session's mean epoch time
                mean_epoch = (time.perf_counter() - session_start) / session_epochs
                desc += f" (run ETA {format_duration(mean_epoch * (config.epochs - epoch))})"
            bar = tqdm(total=steps_per_epoch, initial=epoch_state.steps_done, desc=desc,
                       disable=not (progress and is_main), leave=False, dynamic_ncols=True)
            epoch_state = train_one_epoch(
                model, loss_fn, loader, optimizer, schedule, accelerator, epoch,
                supervised=config.method == "supcon", state=epoch_state, augment=augment,
                channels_last=config.channels_last, should_stop=should_stop, log_every=config.log_every, progress=bar,
            )
            bar.close()
            if epoch_state.steps_done < steps_per_epoch:
                save(epoch, epoch_state, numbered=False)
                result.interrupted_by = stop.signal or signal.SIGTERM
                logger.warning("interrupted in epoch %d at step %d/%d; state saved to %s; continue with "
                               "--resume --run-dir %s", epoch + 1, epoch_state.steps_done, steps_per_epoch,
                               run_dir / LAST, run_dir)
                return result

            epoch_done = epoch + 1
            loss_value = _mean_over_processes(epoch_state.loss_sum / steps_per_epoch, accelerator)
            spread = _mean_over_processes(epoch_state.spread_sum / steps_per_epoch, accelerator)
            images_per_s = global_batch * steps_per_epoch / max(epoch_state.seconds, 1e-9)
            row = {"epoch": epoch_done, "loss": round(loss_value, 6), "collapsed_loss": round(collapsed_value, 6),
                   "spread": round(spread, 6), "knn_accuracy": None, "lr": schedule.lr_at(epoch * steps_per_epoch),
                   "images_per_s": round(images_per_s, 2), "epoch_seconds": round(epoch_state.seconds, 3)}
            if knn_loaders is not None and (epoch_done % config.knn_every == 0 or epoch_done == config.epochs):
                row["knn_accuracy"] = round(_knn_monitor(model, knn_loaders, accelerator, len(index.classes),
                                                         config), 6)
            session_epochs += 1
            eta = (time.perf_counter() - session_start) / session_epochs * (config.epochs - epoch_done)
            knn_text = f" kNN {row['knn_accuracy']:.4f}" if row["knn_accuracy"] is not None else ""
            logger.info("epoch %d/%d loss %.4f (collapsed %.4f) spread %.4f%s lr %.4g %.0f img/s %.1fs ETA %s",
                        epoch_done, config.epochs, loss_value, collapsed_value, spread, knn_text, row["lr"],
                        images_per_s, epoch_state.seconds, format_duration(eta))
            if is_main:
                metrics_csv.append(row)
                for key in ("loss", "collapsed_loss", "spread", "lr", "images_per_s", "knn_accuracy"):
                    if row[key] is not None:
                        writer.add_scalar(f"{'monitor' if key == 'knn_accuracy' else 'train'}/{key}", row[key],
                                          epoch_done)
                writer.flush()
            result.history.append(row)
            fired = detector.update(loss_value, collapsed_value, spread, config.feat_dim)
            epoch_state = EpochState()
            save(epoch_done, epoch_state, numbered=epoch_done % config.save_freq == 0 or epoch_done == config.epochs)
            result.epochs_done = epoch_done
            if fired:
                logger.warning("epoch %d: the loss has sat at the collapsed value %.4f for %d epochs: %s", epoch_done,
                               collapsed_value, detector.epochs_collapsed, COLLAPSE_ADVICE)
                if config.stop_on_collapse:
                    result.stopped_on_collapse = True
                    logger.warning("stopping (--stop-on-collapse); checkpoints are kept in %s", run_dir)
                    return result
            if stop:
                result.interrupted_by = stop.signal
                logger.warning("interrupted after epoch %d; state saved to %s", epoch_done, run_dir / LAST)
                return result
        return result
    finally:
        stop.restore()
        if writer is not None:
            writer.close()


def _mean_over_processes(value: float, accelerator: Accelerator) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="mean").item())


def _knn_monitor(model, loaders, accelerator: Accelerator, num_classes: int, config: TrainConfig) -> float:
    """Weighted kNN accuracy of the encoder's features: val queries against the training bank."""
    encoder = accelerator.unwrap_model(model).encoder
    bank_loader, query_loader = loaders
    bank_features, bank_labels = extract_features(encoder, bank_loader, accelerator)
    if query_loader is None:
        return knn_accuracy(bank_features, bank_labels, bank_features, bank_labels, num_classes, config.knn_k,
                            config.knn_temperature, exclude_self=True)
    query_features, query_labels = extract_features(encoder, query_loader, accelerator)
    return knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes, config.knn_k,
                        config.knn_temperature)

