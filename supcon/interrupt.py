"""SIGTERM and Ctrl-C: the flag a run checks between steps, and the exit code of a run they ended.

A signal does not kill a run: :class:`StopFlag` records it, the epoch loop of
:class:`supcon.engine.RunEngine` saves a resumable state at the next step and the command exits with
the shell's code for that signal (:func:`exit_code`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: Exit codes of an interrupted run (the shell's conventions for SIGINT / SIGTERM) and of a run
#: stopped by --stop-on-collapse.
EXIT_SIGINT, EXIT_SIGTERM, EXIT_COLLAPSE = 130, 143, 3


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
