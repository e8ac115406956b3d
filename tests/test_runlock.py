"""RunLock: one writer per folder; a live holder is named, a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supcon.errors import UserError
from supcon.runlock import LOCK_FILE, RunLock

HOLD = ("import sys, time; from supcon.runlock import RunLock; "
        "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that takes the lock on ``folder`` and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path, caplog):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(UserError) as error:
            RunLock(tmp_path, "run dir").acquire()
        message = str(error.value)
        assert f"run dir {tmp_path} is in use by process {holder.pid}" in message
        assert "-c" in message and str(tmp_path / LOCK_FILE) in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock, as after kill -9 or a power cut
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # the stale file is still there
    with caplog.at_level(logging.WARNING, logger="supcon.runlock"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"left by process {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: cleared, so the next taker logs nothing


def test_release_lets_the_next_process_take_it(tmp_path):
    with RunLock(tmp_path):
        pass
    holder = hold_in_another_process(tmp_path)  # its acquire fails (no 'locked' line) if the lock is still held
    holder.kill()
    holder.wait()
