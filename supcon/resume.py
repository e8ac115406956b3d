"""Refuse or resume a run directory: what one session of a run may do with the folder it writes.

:class:`RunDirSession` takes the run directory under its lock (one writer), refuses to overwrite a
run, and on ``--resume`` (or a torchrun restart) checks that the session continues the run as it
began: the same options, the same global batch (split over however many processes there are now),
the same training images; then finds the last state that loads. What it accepted is recorded in
``run_info`` (:meth:`RunDirSession.session_facts`). The file names and schemas it reads are
:mod:`supcon.rundir`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supcon.checkpoint import CorruptCheckpoint, atomic_write_text
from supcon.config import config_differences
from supcon.errors import UserError
from supcon.launch import DEFAULT_DIST_TIMEOUT, launch_facts, launch_id, max_restarts, restart_count
from supcon.processes import RunProcesses
from supcon.rundir import (
    CONFIG_FILE,
    DATA_LISTING,
    LAST,
    checkpoint_problem,
    default_run_dir,
    epoch_checkpoints,
    has_run_content,
    listing_difference,
    listing_fingerprint,
    read_config,
    read_listing,
    split_config,
)
from supcon.runlock import RunLock

logger = logging.getLogger(__name__)


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


@dataclass
class RecordedRun:
    """What a run directory recorded when it started: its options and its ``run_info`` (read once)."""

    options: dict[str, Any]
    run_info: dict[str, Any]


class RunDirSession(RunProcesses):
    """The run directory of one session of a run, on the run's processes (:class:`~supcon.processes.RunProcesses`).

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        dist_timeout: seconds a collective may wait for the other processes (several processes only).
    """

    def __init__(self, precision: str, dist_timeout: float = DEFAULT_DIST_TIMEOUT):
        super().__init__(precision, dist_timeout)
        self.run_dir: Path | None = None
        self._lock: RunLock | None = None
        self._created: list[Path] = []  # folders the lock created (removed again if the run writes nothing)
        self._set_aside: dict[str, Path] = {}  # checkpoints that did not load, moved aside before being overwritten
        self._listing: list[str] | None = None
        self._data_change: dict[str, Any] | None = None
        self._process_change: dict[str, Any] | None = None

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
        super().close()
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        lock.release()
        if not has_run_content(self.run_dir):
            # nothing of the run to guard: a refused start leaves the folder as it found it
            if not self._lock_was_there:
                lock.path.unlink(missing_ok=True)
            self._remove_created()

    def resume_wanted(self, resume: bool) -> bool:
        """``resume``, or True when torchrun's elastic agent restarted the launch that wrote the run (logged).

        Under ``torchrun --max-restarts`` the main process decides for all: the run is resumed, as
        ``--resume`` would, when its directory records this launch's id (a process of this launch wrote
        it, so this is a restart), or when it holds no run yet and this is a restart
        (``TORCHELASTIC_RESTART_COUNT`` > 0). Not the restart count alone: on several nodes torchrun
        counts restarts per node, and a node whose processes were still running when another node's
        failed starts them again with its count unchanged.
        """
        if resume or not max_restarts():
            return resume
        return self.agree(self._restart_resumes)

    def _restart_resumes(self) -> bool:
        restart = restart_count()
        if not (self.run_dir / CONFIG_FILE).is_file():
            return restart > 0
        _, run_info = split_config(read_config(self.run_dir))
        written_by = (run_info.get("launch") or {}).get("launch_id")
        if written_by != launch_id():
            if restart:
                logger.warning("torchrun restart %d: %s was written by another launch (id %s; this one: %s), so it "
                               "is not resumed without --resume", restart, self.run_dir, written_by, launch_id())
            return False
        if restart:
            logger.warning("torchrun restarted the processes (restart %d of at most %d): resuming %s from its last "
                           "state", restart, max_restarts(), self.run_dir)
        else:
            logger.warning("torchrun started the processes again (this node counts no restart: another node's "
                           "processes failed, or the launch id %s was used before): resuming %s, which this launch "
                           "wrote, from its last state", launch_id(), self.run_dir)
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
            trained = {**(defaults or {}), **recorded.options}  # an option the run predates trained as its default
            details = ", ".join(f"{k}: run has {trained.get(k)!r}, now {requested.get(k)!r}" for k in diffs[:4])
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
        renamed to ``<name>.corrupt-<time>`` (see :meth:`supcon.engine.RunEngine.save`).

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

    # --- the training images ----------------------------------------------------------------------------------

    def check_data(self, listing: list[str], recorded: RecordedRun | None, allow_change: bool, start_epoch: int
                   ) -> None:
        """On resume, compare the training images with the run's recorded listing (see :data:`DATA_LISTING`).

        The sampler draws images by index, so an added, removed or renamed image changes every later
        batch. :meth:`write_listing` writes ``listing`` as the run's listing.

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

    def write_listing(self, start_epoch: int) -> None:
        """Write the training images :meth:`check_data` was given as the run's listing (main process)."""
        if self.is_main and self._listing is not None:
            listing_file = self.run_dir / DATA_LISTING
            if self._data_change and listing_file.is_file():  # the listing the run had until now is kept
                os.replace(listing_file, listing_file.with_name(f"train_images.before-epoch-{start_epoch + 1}.txt"))
            atomic_write_text("\n".join(self._listing) + "\n", listing_file)
