"""One writer per run directory: an advisory lock file that names its holder.

The lock is an ``fcntl`` lock on ``<folder>/.lock``: the kernel releases it when the holding process
ends in any way (exit, crash, ``kill -9``), so a lock file left behind by a dead process is stale by
construction and is taken over (logged) rather than blocking the run forever. The file's text names
the holder (pid, host, command, start time) for the refusal message. Locks on network filesystems
depend on their lock daemon; a filesystem that does not support locking is logged and not locked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from supcon.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]})


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"process {holder['pid']} on {holder['host']} (started {holder['started']}: "
                f"{holder['command']})")
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """Hold ``<folder>/.lock`` for the life of a command; refuse when a live process holds it.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Only the main process of a
    multi-process run should take it.

    Args:
        folder: the directory to guard (created if needed).
        what: how to name it in messages ("run dir", "probe results of run ...").
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run dir"):
        self.path = Path(folder) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            UserError: a running process holds it (named in the message).
        """
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"{self.what} {self.path.parent} is in use by {_describe(holder)}; wait for it to "
                                f"finish or stop it (its lock: {self.path})")
            logger.warning("cannot lock %s (%s); continuing without a lock", self.path, exc.strerror)
            return self
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            logger.warning("taking over the lock of %s left by %s, which is no longer running",
                           self.path.parent, _describe(previous))
        text = _holder_text().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear and release the lock (the file stays: removing it could race with a new holder)."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
