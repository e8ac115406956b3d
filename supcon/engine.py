"""The run lifecycle that supcon-train and baseline-train share.

:class:`RunEngine` owns the accelerator, the run directory (refuse, or resume from what it
recorded), the metric sinks, and the epoch loop with stop handling, ETA and saving. A trainer
(:class:`EpochTrainer`) supplies only what is its own: its epoch of steps, what it does at the end
of an epoch (monitors, validation, early stopping) and what it saves.

Epochs follow :mod:`supcon.rundir`'s convention: the N-th epoch (1-based) is "epoch N" everywhere.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list

from supcon.checkpoint import CorruptCheckpoint, atomic_write_bytes, atomic_write_text
from supcon.config import config_differences
from supcon.errors import UserError
from supcon.heartbeat import Heartbeat, beat_interval
from supcon.launch import (
    DEFAULT_DIST_TIMEOUT,
    check_not_alone,
    launch_facts,
    launch_id,
    launched_world_size,
    max_restarts,
    restart_count,
)
from supcon.rundir import (
    CONFIG_FILE,
    DATA_LISTING,
    LAST,
    MetricSinks,
    checkpoint_problem,
    default_run_dir,
    epoch_checkpoints,
    has_run_content,
    listing_difference,
    listing_fingerprint,
    non_finite_weights,
    read_config,
    read_listing,
    split_config,
)
from supcon.runlock import RunLock

logger = logging.getLogger(__name__)

#: Errors of a full disk (ENOSPC) or an exhausted quota (EDQUOT).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

#: Exit codes of an interrupted run (the shell's conventions for SIGINT / SIGTERM) and of a run
#: stopped by --stop-on-collapse.
EXIT_SIGINT, EXIT_SIGTERM, EXIT_COLLAPSE = 130, 143, 3


def default_precision() -> str:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def make_accelerator(precision: str, dist_timeout: float = DEFAULT_DIST_TIMEOUT) -> Accelerator:
    """An Accelerator for ``precision``; CPU-only multi-process runs join a gloo group.

    Without ``cpu=True``, ``Accelerator()`` under ``torchrun`` on a CPU-only host leaves each
    process on its own, which would silently train N independent models. ``dist_timeout``: seconds a
    collective may wait for the other processes before it fails.

    Raises:
        UserError: fp16 without a GPU, or a process that a launcher meant as one of several but that
            is alone (:func:`supcon.launch.check_not_alone`) or joined no process group.
    """
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    check_not_alone()
    launched = launched_world_size()
    kwargs: dict[str, Any] = {}
    if launched > 1:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
        if not torch.cuda.is_available():
            kwargs["cpu"] = True
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision], **kwargs)
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(f"the launcher started {launched} processes, but this one joined a group of "
                        f"{accelerator.num_processes}: it would train a model of its own; check the launch line")
    return accelerator


def split_global_batch(global_batch: int, processes_before: int, processes: int, run_dir: Path) -> int:
    """The per-process batch that keeps a run's ``global_batch`` on ``processes`` processes.

    Raises:
        UserError: ``processes`` do not divide the global batch (names the numbers of processes that do).
    """
    if global_batch % processes == 0:
        return global_batch // processes
    fitting = [n for n in range(1, global_batch + 1) if global_batch % n == 0][:6]
    raise UserError(f"run dir {run_dir} trains a global batch of {global_batch} ({global_batch // processes_before} "
                    f"x {processes_before} processes), which {processes} processes cannot split evenly; resume it "
                    f"on a number of processes that divides {global_batch} (e.g. {', '.join(map(str, fitting))})")


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


def _peer_gone(exc: BaseException) -> bool:
    """True for the error a collective raises when another process of the group has exited."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _timed_out(exc: BaseException) -> bool:
    """True for the error a collective raises after waiting ``--dist-timeout`` (gloo: ``Timed out waiting ...``)."""
    return isinstance(exc, (RuntimeError, torch.distributed.DistError)) and bool(
        re.search(r"timed out|timeout", str(exc), flags=re.IGNORECASE))


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
        dist_timeout: seconds a collective may wait for the other processes (several processes only).
    """

    def __init__(self, precision: str, progress: bool = True, dist_timeout: float = DEFAULT_DIST_TIMEOUT):
        self.accelerator = make_accelerator(precision, dist_timeout)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.dist_timeout = dist_timeout
        self.heartbeat: Heartbeat | None = None
        if self.world > 1:
            self.heartbeat = Heartbeat(self.accelerator.process_index, self.world, beat_interval(dist_timeout))
            self.heartbeat.start()
        self.on_gpu = self.accelerator.device.type == "cuda"
        self.progress = progress
        self.run_dir: Path | None = None
        self.sinks: MetricSinks | None = None
        self.stop = StopFlag()
        #: keep only the newest N ``ckpt_epoch_<N>.pth`` files (0: keep all); set by the trainer.
        self.keep_last = 0
        self.checkpoint_bytes: int | None = None  # the size of the newest checkpoint written or estimated
        self._lock: RunLock | None = None
        self._created: list[Path] = []  # folders the lock created (removed again if the run writes nothing)
        self._set_aside: dict[str, Path] = {}  # checkpoints that did not load, moved aside before being overwritten
        self._listing: list[str] | None = None
        self._data_change: dict[str, Any] | None = None
        self._process_change: dict[str, Any] | None = None

    @property
    def device_name(self) -> str:
        return str(self.accelerator.device) + (f" ({torch.cuda.get_device_name()})" if self.on_gpu else "")

    # --- the run directory ------------------------------------------------------------------------------------

    def choose_run_dir(self, run_dir: str | None, resume: bool, default_name: str, batch_size: int) -> Path:
        """``run_dir``, else a new timestamped one (the main process's, on every process).

        Raises:
            UserError: ``resume`` without ``run_dir``, or torchrun's ``--max-restarts`` without ``run_dir``.
        """
        if resume and not run_dir:
            raise UserError("--resume needs --run-dir (the run to continue)")
        if max_restarts() and not run_dir:
            raise UserError(f"torchrun --max-restarts {max_restarts()} restarts the processes after a failure: pass "
                            "--run-dir, so that the restarted processes find the run they continue")
        if run_dir:
            self.run_dir = Path(run_dir)
        else:
            self.run_dir = Path(self.broadcast(str(default_run_dir(default_name, batch_size)), always=True))
        self.agree(self._take_lock)
        return self.run_dir

    def _take_lock(self) -> None:
        """One training process per run directory (the main process holds ``RUN/.lock`` until :meth:`close`)."""
        folder = self.run_dir.absolute()
        self._created = [p for p in (folder, *folder.parents) if not p.exists()]
        self._lock = RunLock(folder, "run dir")
        self._lock_was_there = self._lock.path.exists()
        try:
            self._lock.acquire()
        except UserError:
            self._lock = None
            self._remove_created()
            raise

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; stops at the first that is not empty
            try:
                folder.rmdir()
            except OSError:
                break

    def close(self) -> None:
        """Stop the heartbeat; release the run directory (a run that wrote nothing leaves no lock file or folder)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        lock.release()
        if not has_run_content(self.run_dir):
            # nothing of the run to guard: a refused start leaves the folder as it found it
            if not self._lock_was_there:
                lock.path.unlink(missing_ok=True)
            self._remove_created()

    def agree(self, check: Callable[[], Any]) -> Any:
        """Run ``check`` on the main process; its UserError is raised on every process (its result returned on all).

        Without this, a refusal on the main process would leave the others waiting in the next
        collective.
        """
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", check())
            except UserError as exc:
                outcome = ("error", str(exc))
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise UserError(outcome[1])
        return outcome[1]

    def resume_wanted(self, resume: bool) -> bool:
        """``resume``, or True when torchrun's elastic agent restarted the launch that wrote the run (logged).

        A restarted process (``TORCHELASTIC_RESTART_COUNT`` > 0) continues the run as ``--resume`` would,
        unless the run directory records another launch id (then it was not this launch's run: the
        restart does what the command line says).
        """
        restart = restart_count()
        if resume or not restart:
            return resume
        return self.agree(lambda: self._restart_resumes(restart))

    def _restart_resumes(self, restart: int) -> bool:
        if (self.run_dir / CONFIG_FILE).is_file():
            _, run_info = split_config(read_config(self.run_dir))
            written_by = (run_info.get("launch") or {}).get("launch_id")
            if written_by != launch_id():
                logger.warning("torchrun restart %d: %s was written by another launch (id %s; this one: %s), so it "
                               "is not resumed without --resume", restart, self.run_dir, written_by, launch_id())
                return False
        logger.warning("torchrun restarted the processes (restart %d of at most %d): resuming %s from its last state",
                       restart, max_restarts(), self.run_dir)
        return True

    def per_process_batch(self, recorded: RecordedRun | None, batch_size: int) -> int:
        """This session's per-process batch: ``batch_size``, or, resuming on another number of processes, the run's
        global batch split over the processes now (logged; recorded by :meth:`session_facts`).

        The global batch sets the learning rate, the steps per epoch and which images a step draws, so
        keeping it keeps the run; ``batch_size`` must be the run's (or already the split one).

        Raises:
            UserError: the processes now cannot split the global batch evenly.
        """
        info = recorded.run_info if recorded else {}
        before, global_batch = info.get("num_processes"), info.get("global_batch")
        if before in (None, self.world) or global_batch is None:
            return batch_size
        if batch_size not in (recorded.options.get("batch_size"), global_batch // self.world):
            return batch_size  # another batch: refuse_changes names the difference
        now = split_global_batch(global_batch, before, self.world, self.run_dir)
        logger.warning("resuming %s on %d process%s (it trained on %d): its global batch of %d is kept, %d per process "
                       "(was %d); the learning rate, the steps per epoch and the place in the epoch are unchanged",
                       self.run_dir, self.world, "" if self.world == 1 else "es", before, global_batch, now,
                       global_batch // before)
        self._process_change = {"processes_before": before, "processes_now": self.world,
                                "batch_size_before": global_batch // before, "batch_size_now": now}
        return now

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
                       global_batch: int, batch_size: int, defaults: dict[str, Any] | None = None) -> None:
        """Refuse to resume a run with other options, or with another number of processes.

        ``defaults``: the options' defaults, for options added after the run started (it trained as those).

        Raises:
            UserError: naming up to four differing options, or the two global batches.
        """
        if recorded is None:
            return
        if self._process_change:  # the per-process batch was adapted to keep the global one
            ignore = ignore | {"batch_size"}
        diffs = config_differences(recorded.options, requested, ignore=ignore, defaults=defaults)
        if diffs:
            details = ", ".join(f"{k}: run has {recorded.options.get(k)!r}, now {requested.get(k)!r}"
                                for k in diffs[:4])
            raise UserError(f"run dir {self.run_dir} was started with a different configuration ({details})")
        # Another global batch changes the LR, the steps per epoch and what a mid-epoch position means
        # (per_process_batch keeps it across another number of processes).
        recorded_batch = recorded.run_info.get("global_batch")
        if recorded_batch is not None and recorded_batch != global_batch:
            raise UserError(
                f"run dir {self.run_dir} was trained with a global batch of {recorded_batch}, now {global_batch} "
                f"({batch_size} x {self.world} processes); resume it with --batch-size "
                f"{recorded.options.get('batch_size')} as it started")

    def last_state(self, load: Callable[[Path], dict[str, Any]], recorded: RecordedRun | None = None
                   ) -> dict[str, Any] | None:
        """The state to resume from through ``load``: ``last.pth``, or None when there is none yet.

        A ``last.pth`` that does not load or fails :func:`supcon.rundir.checkpoint_problem` is named,
        and the newest ``ckpt_epoch_<N>.pth`` that passes is used instead (what was skipped is
        logged). The bad files are left as they are; one that a save would overwrite is first
        renamed to ``<name>.corrupt-<time>`` (see :meth:`save`).

        Raises:
            UserError: an unsafe file, or no checkpoint of the run loads.
        """
        path = self.run_dir / LAST
        if not path.is_file():
            return None
        run_info = recorded.run_info if recorded else None
        skipped: list[str] = []
        for name, candidate, epoch in [(LAST, path, None), *[(p.name, p, n) for n, p in
                                                              reversed(epoch_checkpoints(self.run_dir).items())]]:
            try:
                state = load(candidate)
            except CorruptCheckpoint as exc:
                problem = str(exc)
            else:
                problem = checkpoint_problem(state, run_info, epoch)
                if problem is None:
                    if skipped:
                        logger.warning("resuming from %s instead of %s; skipped: %s. The bad files are kept "
                                       "(set aside as <name>.corrupt-<time> before a save would overwrite them)",
                                       candidate, path, "; ".join(skipped))
                    return state
                problem = f"{candidate} cannot be resumed: {problem}"
            logger.error("%s", problem)
            skipped.append(problem)
            self._set_aside[name] = candidate
        raise UserError(f"cannot resume {self.run_dir}: none of its {len(skipped)} checkpoints loads and matches the "
                        f"run ({skipped[0]}); nothing was changed")

    def open_sinks(self, options: dict[str, Any], run_info: dict[str, Any], fields: list[str],
                   tags: dict[str, str], start_epoch: int) -> MetricSinks:
        """Write ``config.yaml`` (the resolved options and ``run_info``) and open the CSV and TensorBoard."""
        if self.is_main and self._listing is not None:
            listing_file = self.run_dir / DATA_LISTING
            if self._data_change and listing_file.is_file():  # the listing the run had until now is kept
                os.replace(listing_file, listing_file.with_name(f"train_images.before-epoch-{start_epoch + 1}.txt"))
            atomic_write_text("\n".join(self._listing) + "\n", listing_file)
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

    # --- the training images ----------------------------------------------------------------------------------

    def check_data(self, listing: list[str], recorded: RecordedRun | None, allow_change: bool, start_epoch: int
                   ) -> None:
        """On resume, compare the training images with the run's recorded listing (see :data:`DATA_LISTING`).

        The sampler draws images by index, so an added, removed or renamed image changes every later
        batch. :meth:`open_sinks` writes ``listing`` as the run's listing.

        Raises:
            UserError: the images changed, without ``allow_change`` (summarises the difference).
        """
        self._listing = listing
        if recorded is None:
            return
        self.agree(lambda: self._compare_listing(listing, recorded, allow_change, start_epoch))

    def _compare_listing(self, listing: list[str], recorded: RecordedRun, allow_change: bool, start_epoch: int
                         ) -> None:
        old = read_listing(self.run_dir)
        fingerprint = recorded.run_info.get("data_fingerprint")
        if old is None:
            logger.info("%s records no list of its training images (an older run): the check that they are "
                        "unchanged is skipped", self.run_dir)
            return
        difference = listing_difference(old, listing)
        if difference is None and fingerprint in (None, listing_fingerprint(listing)):
            return
        difference = difference or f"{DATA_LISTING} does not match its recorded fingerprint"
        if not allow_change:
            raise UserError(f"the training images changed since {self.run_dir} started ({difference}); the batches "
                            "are drawn by image index, so the run would not continue as it began. Restore the "
                            "folder, or pass --allow-data-change to continue with the images as they are now")
        logger.warning("--allow-data-change: continuing %s with changed training images (%s)", self.run_dir,
                       difference)
        self._data_change = {"epoch": start_epoch, "change": difference, "images_before": len(old),
                             "images_now": len(listing)}

    def data_facts(self, recorded: RecordedRun | None) -> dict[str, Any]:
        """``run_info`` entries of the training images: their fingerprint and the changes accepted so far."""
        if self._listing is None:
            return {}
        changes = list(recorded.run_info.get("data_changes") or []) if recorded else []
        if self._data_change:
            changes.append(self._data_change)
        facts: dict[str, Any] = {"data_fingerprint": listing_fingerprint(self._listing)}
        return {**facts, "data_changes": changes} if changes else facts

    def session_facts(self, recorded: RecordedRun | None, start_epoch: int) -> dict[str, Any]:
        """``run_info`` entries of this session: the training images' (:meth:`data_facts`), how it was launched
        (``launch``) and the changes of the number of processes so far (``process_changes``)."""
        backend = self.accelerator.state.backend if self.world > 1 else None
        facts = {**self.data_facts(recorded), "launch": launch_facts(self.world, backend, self.dist_timeout)}
        changes = list(recorded.run_info.get("process_changes") or []) if recorded else []
        if self._process_change:
            changes.append({"epoch": start_epoch, **self._process_change})
        return {**facts, "process_changes": changes} if changes else facts

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
            if _timed_out(exc):
                raise UserError(self._timeout_message(where)) from None
            if _peer_gone(exc):
                # a collective failed because another process is gone; that process printed why
                raise UserError(f"{where}: stopped because another process of the run stopped (its message is "
                                f"above); the last good checkpoint in {self.run_dir} is kept") from None
            logger.error("%s failed (%s: %s); the launcher stops the others; the last good checkpoint in %s is kept",
                         where, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                         self.run_dir)
            raise

    def _timeout_message(self, where: str) -> str:
        """Which peers stopped answering, after a collective waited ``--dist-timeout`` (asks the heartbeats)."""
        silent = self.heartbeat.silent_peers() if self.heartbeat is not None else {}
        if silent:
            names = ", ".join(f"process {rank} (on {host})" for rank, host in sorted(silent.items()))
            what = f"{names} stopped answering (its heartbeat stopped: the process is stopped or frozen, or cut off)"
        elif silent is None:
            what = "the launcher's store does not answer either (the host of the rendezvous may be gone)"
        else:
            what = "every process still has a heartbeat, so one is stuck (a hung collective, a stalled file system)"
        return (f"{where}: waited longer than --dist-timeout {self.dist_timeout:g} s for the others; {what}. The run "
                f"ends; the last good checkpoint in {self.run_dir} is kept (raise --dist-timeout if a step or a save "
                "can take that long)")

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
