"""Hung peers (issue 22): a process that stops (SIGSTOP) ends the run after --dist-timeout, with one line naming it."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch

from supcon.heartbeat import beat_interval
from tests.launch_helpers import (
    BATCH_ON_TWO,
    MODEL_ARGS,
    STEPS_PER_EPOCH,
    TORCHRUN,
    hook_script,
    kill_if_alive,
    launch_env,
    start,
    wait_all,
    wait_for_marker,
)


def test_beats_are_a_tenth_of_the_timeout_within_bounds():
    assert [beat_interval(t) for t in (1, 10, 60, 1800, 86400)] == [0.5, 1.0, 6.0, 30.0, 30.0]


@pytest.mark.slow
def test_a_stopped_process_ends_the_run_after_the_timeout_naming_it(train_folder, tmp_path):
    run_dir, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "train.log"
    env = launch_env(HOOK="pause", HOOK_RANK="1", HOOK_AT_STEP=str(STEPS_PER_EPOCH + 2), HOOK_MARKER=str(marker))
    launcher = start([TORCHRUN, "--standalone", "--nproc-per-node", "2", hook_script(tmp_path), "--data-folder",
                      train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO,
                      "--dist-timeout", "10"], tmp_path, log, env)
    pid = wait_for_marker(marker, [launcher], log)
    os.kill(pid, signal.SIGSTOP)  # rank 1 stops in epoch 2, step 2; rank 0 waits for it in that step's all-gather
    stopped = time.monotonic()
    try:
        codes = wait_all([launcher], timeout=150)  # without --dist-timeout it would wait 30 minutes
    finally:
        kill_if_alive(pid)
    waited = time.monotonic() - stopped
    text = log.read_text()
    assert codes != [0] and 10 <= waited < 120, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert errors == [
        f"Error: process 0 of 2: waited longer than --dist-timeout 10 s for the others; process 1 (on "
        f"{socket.gethostname()}) stopped answering (its heartbeat stopped: the process is stopped or frozen, or cut "
        f"off). The run ends; the last good checkpoint in {run_dir} is kept (raise --dist-timeout if a step or a save "
        "can take that long)"], text[-3000:]
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and not state["epoch_state"]["steps_done"]
