"""The run lifecycle that supcon-train and baseline-train share.

:class:`RunEngine` assembles a run: its processes (:mod:`supcon.processes`), its run directory,
refused or resumed (:mod:`supcon.resume`), the metric sinks, and the epoch loop with stop handling
(:mod:`supcon.interrupt`), ETA and saving. A trainer (:class:`EpochTrainer`) supplies only what is
its own: its epoch of steps, what it does at the end of an epoch (monitors, validation, early
stopping) and what it saves.

Epochs follow :mod:`supcon.rundir`'s convention: the N-th epoch (1-based) is "epoch N" everywhere.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from supcon.checkpoint import atomic_write_bytes
from supcon.errors import UserError
from supcon.interrupt import StopFlag
from supcon.launch import DEFAULT_DIST_TIMEOUT
from supcon.processes import peer_gone, timed_out
from supcon.resume import RunDirSession
from supcon.rundir import LAST, MetricSinks, epoch_checkpoints, non_finite_weights

logger = logging.getLogger(__name__)

#: Errors of a full disk (ENOSPC) or an exhausted quota (EDQUOT).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def serialized(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _missing_optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes an optimizer's state will hold once it has stepped, when it holds none yet (else 0)."""
    if optimizer.state:
        return 0
    slots = 2 if "betas" in optimizer.defaults else int(bool(optimizer.defaults.get("momentum")))
    return slots * sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"]
                       if p.requires_grad)


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


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


class RunEngine(RunDirSession):
    """The processes, the run directory and the epoch loop of one training run.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        progress: show progress bars (main process only).
        dist_timeout: seconds a collective may wait for the other processes (several processes only).
    """

    def __init__(self, precision: str, progress: bool = True, dist_timeout: float = DEFAULT_DIST_TIMEOUT):
        super().__init__(precision, dist_timeout)
        self.progress = progress
        self.sinks: MetricSinks | None = None
        self.stop = StopFlag()
        #: keep only the newest N ``ckpt_epoch_<N>.pth`` files (0: keep all); set by the trainer.
        self.keep_last = 0
        self.checkpoint_bytes: int | None = None  # the size of the newest checkpoint written or estimated

    def open_sinks(self, options: dict[str, Any], run_info: dict[str, Any], fields: list[str],
                   tags: dict[str, str], start_epoch: int) -> MetricSinks:
        """Write ``config.yaml`` (the resolved options and ``run_info``) and open the CSV and TensorBoard."""
        self.write_listing(start_epoch)
        self.sinks = MetricSinks(self.run_dir, {**options, "run_dir": str(self.run_dir)}, run_info, fields, tags,
                                 start_epoch, self.is_main)
        self.accelerator.wait_for_everyone()
        return self.sinks

    def should_stop(self, step_in_epoch: int, sync_every: int) -> bool:
        """True once a signal arrived (on any process; they agree every ``sync_every`` steps)."""
        if self.world == 1:
            return bool(self.stop)
        if (step_in_epoch + 1) % sync_every:
            return False
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def save(self, files: dict[str, dict[str, Any]]) -> None:
        """Write checkpoints into the run directory (main process, atomically; one serialisation each).

        A file that did not load at resume is renamed aside first, never overwritten; with
        :attr:`keep_last`, older ``ckpt_epoch_<N>.pth`` files are deleted once the new ones are written.

        Raises:
            UserError: non-finite weights (nothing is written), or a full disk (the previous files are
                intact; names the folder and the space one checkpoint needs).
        """
        if self.is_main and files:
            data: dict[int, bytes] = {}
            for name, state in files.items():
                if id(state) not in data:
                    problem = non_finite_weights(state)
                    if problem:
                        raise UserError(f"refusing to save {self.run_dir / name}: {problem}; the last good "
                                        "checkpoint is kept")
                    data[id(state)] = serialized(state)
                    self.checkpoint_bytes = len(data[id(state)])
                self._move_aside(name)
                atomic_write_bytes(data[id(state)], self.run_dir / name)
            self._prune_periodic()
        self.accelerator.wait_for_everyone()

    def _move_aside(self, name: str) -> None:
        bad = self._set_aside.pop(name, None)
        if bad is not None and bad.exists():
            aside = bad.with_name(f"{bad.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(bad, aside)
            logger.warning("%s did not load at resume: kept as %s", bad, aside)

    def _prune_periodic(self) -> None:
        if self.keep_last <= 0:
            return
        periodic = list(epoch_checkpoints(self.run_dir).values())
        for old in periodic[:-self.keep_last]:
            old.unlink(missing_ok=True)
            logger.info("--keep-last %d: deleted %s", self.keep_last, old.name)

    def check_disk_space(self, sample: dict[str, Any], optimizer: torch.optim.Optimizer, saves_to_come: int) -> None:
        """Warn when the disk lacks room for ``saves_to_come`` checkpoints like ``sample`` (main process).

        ``sample`` is serialised to measure it; before the first step the optimizer holds no
        momentum/moments yet, so their size is added from the parameters. One more checkpoint is
        counted for the temporary copy of an atomic write.
        """
        if not self.is_main:
            return
        self.checkpoint_bytes = len(serialized(sample)) + _missing_optimizer_state_bytes(optimizer)
        needed = (saves_to_come + 1) * self.checkpoint_bytes
        free = free_bytes(self.run_dir)
        logger.info("one checkpoint is %s; the %d still to write need about %s (%s free in %s)",
                    format_bytes(self.checkpoint_bytes), saves_to_come, format_bytes(needed), format_bytes(free),
                    self.run_dir)
        if free < needed:
            logger.warning("the disk of %s has %s free, the run's checkpoints need about %s (%d x %s, plus one for "
                           "writing): the run will stop when the disk fills; free space%s", self.run_dir,
                           format_bytes(free), format_bytes(needed), saves_to_come,
                           format_bytes(self.checkpoint_bytes), ", or keep fewer with --keep-last N"
                           if saves_to_come > 1 else "")

    def disk_full_error(self, exc: OSError) -> UserError:
        need = f"; one checkpoint needs {format_bytes(self.checkpoint_bytes)}" if self.checkpoint_bytes else ""
        return UserError(f"disk full writing to {self.run_dir} ({format_bytes(free_bytes(self.run_dir))} free{need}); "
                         f"the previous checkpoints are intact. Free space, then continue with --resume --run-dir "
                         f"{self.run_dir}")

    # --- the epoch loop ---------------------------------------------------------------------------------------

    def run_epochs(self, trainer: EpochTrainer, start_epoch: int, epochs: int, sync_every: int = 10,
                   resume_step: int = 0, steps_per_epoch: int | None = None) -> LoopOutcome:
        """Epochs ``start_epoch + 1`` to ``epochs`` (1-based) of ``trainer``, with stop handling and saving.

        A signal stops within a step: the trainer's :meth:`~EpochTrainer.stopped_mid_epoch` state is
        saved; a signal during the last step of an epoch lets the epoch finish and be saved first.
        """
        self.stop.install()
        try:
            return self._loop(trainer, start_epoch, epochs, sync_every, resume_step, steps_per_epoch)
        finally:
            self.stop.restore()
            if self.sinks is not None:
                self.sinks.close()

    @contextmanager
    def failures_as_messages(self) -> Iterator[None]:
        """Turn what ends a run from outside into one-line errors: a full disk, a peer that exited, a timeout.

        A process whose own code failed keeps its traceback (a bug), after one line naming the process.
        """
        try:
            yield
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise self.disk_full_error(exc) from None
            raise
        except UserError:
            raise
        except Exception as exc:
            if self.world == 1:
                raise
            where = f"process {self.accelerator.process_index} of {self.world}"
            if timed_out(exc):
                raise UserError(self.timeout_message(where, self.run_dir)) from None
            if peer_gone(exc):
                # a collective failed because another process is gone; that process printed why
                raise UserError(f"{where}: stopped because another process of the run stopped (its message is "
                                f"above); the last good checkpoint in {self.run_dir} is kept") from None
            logger.error("%s failed (%s: %s); the launcher stops the others; the last good checkpoint in %s is kept",
                         where, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                         self.run_dir)
            raise

    def _loop(self, trainer: EpochTrainer, start_epoch: int, epochs: int, sync_every: int, resume_step: int,
              steps_per_epoch: int | None) -> LoopOutcome:
        from tqdm.auto import tqdm

        outcome = LoopOutcome(epochs_done=start_epoch)
        session_start, session_epochs = time.perf_counter(), 0
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
