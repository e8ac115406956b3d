"""The run lifecycle that supcon-train and baseline-train share.

:class:`RunEngine` owns the accelerator, the run directory (refuse, or resume from what it
recorded), the metric sinks, and the epoch loop with stop handling, ETA and saving. A trainer
(:class:`EpochTrainer`) supplies only what is its own: its epoch of steps, what it does at the end
of an epoch (monitors, validation, early stopping) and what it saves.

Epochs follow :mod:`supcon.rundir`'s convention: the N-th epoch (1-based) is "epoch N" everywhere.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from supcon.checkpoint import atomic_write_bytes
from supcon.config import config_differences
from supcon.errors import UserError
from supcon.rundir import (
    CONFIG_FILE,
    LAST,
    MetricSinks,
    default_run_dir,
    has_run_content,
    read_config,
    split_config,
)

logger = logging.getLogger(__name__)

#: Exit codes of an interrupted run (the shell's conventions for SIGINT / SIGTERM) and of a run
#: stopped by --stop-on-collapse.
EXIT_SIGINT, EXIT_SIGTERM, EXIT_COLLAPSE = 130, 143, 3


def default_precision() -> str:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch) started; 1 when run alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator for ``precision``; CPU-only multi-process runs join a gloo group.

    Without ``cpu=True``, ``Accelerator()`` under ``torchrun`` on a CPU-only host leaves each
    process on its own, which would silently train N independent models.
    """
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    kwargs: dict[str, Any] = {}
    if launched_world_size() > 1 and not torch.cuda.is_available():
        kwargs["cpu"] = True
    return Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision], **kwargs)


def exit_code(interrupted_by: int | None) -> int:
    """The exit code of a run ended by signal ``interrupted_by`` (0 when it was not interrupted)."""
    if interrupted_by is None:
        return 0
    return EXIT_SIGINT if interrupted_by == signal.SIGINT else EXIT_SIGTERM


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and saves a resumable state.

    Only the process that installed it reacts: loader workers forked from it inherit the handler,
    and a Ctrl-C in a terminal reaches the whole process group, so without this check every worker
    would report the interruption too. The main process stops the workers itself.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._owner = os.getpid()

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._owner = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner:  # a loader worker: the main process handles the stop
            return
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop without waiting for the save
        self.signal = signum
        logger.warning("received %s: finishing this step, saving a resumable state, then exiting",
                       signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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


@dataclass
class RecordedRun:
    """What a run directory recorded when it started: its options and its ``run_info`` (read once)."""

    options: dict[str, Any]
    run_info: dict[str, Any]


@dataclass
class EpochEnd:
    """What a trainer reports at the end of an epoch.

    Args:
        row: the metrics row (``row["epoch"]`` is the finished epoch, 1-based).
        summary: the log line's text, before the engine's ETA.
        files: ``{file name: checkpoint}`` to write into the run directory (main process, atomically).
        end_reason: a message when the run ends here though epochs remain (early stopping, collapse).
    """

    row: dict[str, Any]
    summary: str
    files: dict[str, dict[str, Any]]
    end_reason: str | None = None


class EpochTrainer(Protocol):
    """What a trainer supplies to :meth:`RunEngine.run_epochs`."""

    def train_epoch(self, epoch: int, should_stop: Callable[[int], bool], progress) -> Any | None:
        """Train the ``epoch``-th epoch (0-based index); None when ``should_stop`` cut it short."""

    def end_epoch(self, epoch_done: int, stats: Any) -> EpochEnd:
        """Monitors, validation and what to save after epoch ``epoch_done`` (1-based)."""

    def stopped_mid_epoch(self, epoch: int) -> tuple[dict[str, dict[str, Any]], str]:
        """``(files to save, message)`` when a signal stopped epoch ``epoch + 1`` part way."""


@dataclass
class LoopOutcome:
    """How :meth:`RunEngine.run_epochs` ended."""

    epochs_done: int
    interrupted_by: int | None = None
    end_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class RunEngine:
    """The accelerator, the run directory and the epoch loop of one training run.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        progress: show progress bars (main process only).
    """

    def __init__(self, precision: str, progress: bool = True):
        self.accelerator = make_accelerator(precision)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.on_gpu = self.accelerator.device.type == "cuda"
        self.progress = progress
        self.run_dir: Path | None = None
        self.sinks: MetricSinks | None = None
        self.stop = StopFlag()

    @property
    def device_name(self) -> str:
        return str(self.accelerator.device) + (f" ({torch.cuda.get_device_name()})" if self.on_gpu else "")

    # --- the run directory ------------------------------------------------------------------------------------

    def choose_run_dir(self, run_dir: str | None, resume: bool, default_name: str, batch_size: int) -> Path:
        """``run_dir``, else a new timestamped one (the main process's, on every process).

        Raises:
            UserError: ``resume`` without ``run_dir``.
        """
        if resume and not run_dir:
            raise UserError("--resume needs --run-dir (the run to continue)")
        if run_dir:
            self.run_dir = Path(run_dir)
        else:
            self.run_dir = Path(self.broadcast(str(default_run_dir(default_name, batch_size)), always=True))
        return self.run_dir

    def open_existing(self, resume: bool) -> RecordedRun | None:
        """Refuse to overwrite a run; on ``resume`` return what it recorded (None for a new run).

        Raises:
            UserError: a non-empty run directory without ``resume``.
        """
        run_dir = self.run_dir
        if not resume:
            if has_run_content(run_dir):
                raise UserError(f"run dir {run_dir} already exists and is not empty; pass --resume to continue it, "
                                "or choose another --run-dir")
            return None
        for stale in run_dir.glob(".*.pth.*.tmp"):  # left by a kill -9 during a checkpoint write
            stale.unlink(missing_ok=True)
        if not (run_dir / CONFIG_FILE).is_file():
            return None
        return RecordedRun(*split_config(read_config(run_dir)))

    def refuse_changes(self, recorded: RecordedRun | None, requested: dict[str, Any], ignore: frozenset[str],
                       global_batch: int, batch_size: int) -> None:
        """Refuse to resume a run with other options, or with another number of processes.

        Raises:
            UserError: naming up to four differing options, or the two global batches.
        """
        if recorded is None:
            return
        diffs = config_differences(recorded.options, requested, ignore=ignore)
        if diffs:
            details = ", ".join(f"{k}: run has {recorded.options.get(k)!r}, now {requested.get(k)!r}"
                                for k in diffs[:4])
            raise UserError(f"run dir {self.run_dir} was started with a different configuration ({details})")
        # Another number of processes changes the global batch, hence the LR, the steps per epoch and
        # what a mid-epoch position means.
        recorded_batch = recorded.run_info.get("global_batch")
        if recorded_batch is not None and recorded_batch != global_batch:
            raise UserError(
                f"run dir {self.run_dir} was trained with a global batch of {recorded_batch}, now {global_batch} "
                f"({batch_size} x {global_batch // batch_size} processes); resume it with the same number of "
                "processes")

    def last_state(self, load: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        """The run's ``last.pth`` through ``load``, or None when there is none yet."""
        path = self.run_dir / LAST
        return load(path) if path.is_file() else None

    def open_sinks(self, options: dict[str, Any], run_info: dict[str, Any], fields: list[str],
                   tags: dict[str, str], start_epoch: int) -> MetricSinks:
        """Write ``config.yaml`` (the resolved options and ``run_info``) and open the CSV and TensorBoard."""
        self.sinks = MetricSinks(self.run_dir, {**options, "run_dir": str(self.run_dir)}, run_info, fields, tags,
                                 start_epoch, self.is_main)
        self.accelerator.wait_for_everyone()
        return self.sinks

    # --- processes --------------------------------------------------------------------------------------------

    def broadcast(self, obj, always: bool = False):
        """The main process's ``obj`` on every process (a no-op with one process unless ``always``)."""
        holder = [obj]
        if always or self.world > 1:
            broadcast_object_list(holder)
        return holder[0]

    def mean_over_processes(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def should_stop(self, step_in_epoch: int, sync_every: int) -> bool:
        """True once a signal arrived (on any process; they agree every ``sync_every`` steps)."""
        if self.world == 1:
            return bool(self.stop)
        if (step_in_epoch + 1) % sync_every:
            return False
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def save(self, files: dict[str, dict[str, Any]]) -> None:
        """Write checkpoints into the run directory (main process, atomically; one serialisation each)."""
        if self.is_main and files:
            serialized: dict[int, bytes] = {}
            for name, state in files.items():
                if id(state) not in serialized:
                    buffer = io.BytesIO()
                    torch.save(state, buffer)
                    serialized[id(state)] = buffer.getvalue()
                atomic_write_bytes(serialized[id(state)], self.run_dir / name)
        self.accelerator.wait_for_everyone()

    # --- the epoch loop ---------------------------------------------------------------------------------------

    def run_epochs(self, trainer: EpochTrainer, start_epoch: int, epochs: int, sync_every: int = 10,
                   resume_step: int = 0, steps_per_epoch: int | None = None) -> LoopOutcome:
        """Epochs ``start_epoch + 1`` to ``epochs`` (1-based) of ``trainer``, with stop handling and saving.

        A signal stops within a step: the trainer's :meth:`~EpochTrainer.stopped_mid_epoch` state is
        saved; a signal during the last step of an epoch lets the epoch finish and be saved first.
        """
        from tqdm.auto import tqdm

        outcome = LoopOutcome(epochs_done=start_epoch)
        session_start, session_epochs = time.perf_counter(), 0
        self.stop.install()
        try:
            for epoch in range(start_epoch, epochs):
                desc = f"epoch {epoch + 1}/{epochs}"
                if session_epochs:  # the run's ETA, from this session's mean epoch time
                    mean_epoch = (time.perf_counter() - session_start) / session_epochs
                    desc += f" (run ETA {format_duration(mean_epoch * (epochs - epoch))})"
                bar = tqdm(total=steps_per_epoch, initial=resume_step if epoch == start_epoch else 0, desc=desc,
                           disable=not (self.progress and self.is_main), leave=False, dynamic_ncols=True)
                stats = trainer.train_epoch(epoch, lambda step: self.should_stop(step, sync_every), bar)
                bar.close()
                if stats is None:
                    files, message = trainer.stopped_mid_epoch(epoch)
                    self.save(files)
                    outcome.interrupted_by = self.stop.signal or signal.SIGTERM
                    logger.warning("%s", message)
                    return outcome
                end = trainer.end_epoch(epoch + 1, stats)
                if self.sinks is not None:
                    self.sinks.log(end.row)
                outcome.history.append(end.row)
                self.save(end.files)
                outcome.epochs_done = epoch + 1
                session_epochs += 1
                eta = (time.perf_counter() - session_start) / session_epochs * (epochs - epoch - 1)
                logger.info("epoch %d/%d %s ETA %s", epoch + 1, epochs, end.summary, format_duration(eta))
                if end.end_reason:
                    outcome.end_reason = end.end_reason
                    return outcome
                if self.stop and epoch + 1 < epochs:
                    outcome.interrupted_by = self.stop.signal
                    logger.warning("interrupted after epoch %d; state saved to %s; continue with --resume --run-dir %s",
                                   epoch + 1, self.run_dir / LAST, self.run_dir)
                    return outcome
            return outcome
        finally:
            self.stop.restore()
            if self.sinks is not None:
                self.sinks.close()
