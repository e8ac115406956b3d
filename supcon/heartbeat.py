"""Heartbeats through the process group's store, so that a run that waited too long can say which peer went silent.

Each process of a multi-process run counts up a key of its own in the store the launcher set up
(torchrun's agent holds it, not a training process) every ``interval`` seconds, from a daemon thread.
When a collective times out (``--dist-timeout``), :meth:`Heartbeat.silent_peers` reads every counter
twice, two intervals apart: the processes whose counter did not move are stopped (SIGSTOP, a frozen
node) or cut off; a process that is only slow still counts. Counters, not clock times, so the hosts'
clocks need not agree.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger(__name__)

_PREFIX = "supcon/heartbeat"


def beat_interval(timeout_seconds: float) -> float:
    """A tenth of the timeout, between 0.5 s and 30 s: a handful of store writes per process and minute."""
    return min(max(timeout_seconds / 10, 0.5), 30.0)


class Heartbeat:
    """This process's heartbeat and its view of the others' (a no-op until :meth:`start`).

    Args:
        rank, world: this process's rank and the number of processes.
        interval: seconds between two beats.
    """

    def __init__(self, rank: int, world: int, interval: float):
        self.rank, self.world, self.interval = rank, world, interval
        self._store = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Publish this host's name and start beating (needs the default process group)."""
        self._store = dist.PrefixStore(_PREFIX, dist.distributed_c10d._get_default_store())
        self._store.set(f"host/{self.rank}", socket.gethostname())
        self._store.add(f"beat/{self.rank}", 1)
        self._thread = threading.Thread(target=self._beat, name="supcon-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._store.add(f"beat/{self.rank}", 1)
            except Exception:  # the store is gone (the launcher is ending the run): nothing left to tell
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)

    def _counts(self) -> list[int]:
        keys = [f"beat/{rank}" for rank in range(self.world)]
        return [int(value.decode() or 0) for value in self._store.multi_get(keys)]

    def silent_peers(self) -> dict[int, str] | None:
        """``{rank: host}`` of the other processes that did not beat for two intervals; None if the store is gone.

        Blocks for about two intervals.
        """
        if self._store is None:
            return {}
        try:
            self._store.set_timeout(timedelta(seconds=max(5.0, 2 * self.interval)))
            before = self._counts()
            time.sleep(2 * self.interval + 0.1)
            after = self._counts()
            silent = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            return {r: self._store.get(f"host/{r}").decode() for r in silent}
        except Exception as exc:  # noqa: BLE001 - the store's host may be what stopped
            logger.debug("heartbeat store unreadable: %s", exc)
            return None
