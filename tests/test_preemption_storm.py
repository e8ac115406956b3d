"""Preemption storm: a run killed 10 times, at moments chosen at random among its steps and its checkpoint writes
(SIGKILL or SIGTERM), resumed each time, ends with the weights of an uninterrupted run. Slow (minutes): each session
pays the start-up of a new process.

Each session kills itself at an event the code controls (its N-th step, or inside its N-th checkpoint write, after
the temporary file is written and before it is renamed), never at a moment a wall clock races with: on any machine,
fast or slow, loaded or idle, every kill lands on a running session, and ten sessions of at most 12 steps each cannot
finish the 160-step run by themselves.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from supcon.cli import train_command
from tests.conftest import write_image_folder

ARGS = ["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--num-workers", "0",
        "--knn-every", "0", "--quiet", "--epochs", "40", "--save-freq", "5", "--seed", "3"]
STEPS_PER_EPOCH = 4  # 18 images, batch 4
MAX_STEPS_PER_SESSION = 12

#: supcon-train that sends itself ``KILL_SIGNAL`` at its ``KILL_AT``-th ``KILL_EVENT`` (``step``: inside a training
#: step; ``save``: inside a checkpoint write, the temporary file written, not yet renamed over the checkpoint).
KILLING_TRAIN = r"""
import os, signal, sys
import supcon.checkpoint
import supcon.losses
from supcon.cli import main

event, at, how = os.environ["KILL_EVENT"], int(os.environ["KILL_AT"]), getattr(signal, os.environ["KILL_SIGNAL"])
counts = {"step": 0, "save": 0}

def reached(kind):
    counts[kind] += 1
    return kind == event and counts[kind] == at

original_forward = supcon.losses.SupConLoss.forward

def forward(self, *args, **kwargs):
    if reached("step"):
        os.kill(os.getpid(), how)
    return original_forward(self, *args, **kwargs)

original_write = supcon.checkpoint._atomic_write

def atomic_write(path, write):
    if str(path).endswith(".pth") and reached("save"):
        def write_then_die(f):
            write(f)
            f.flush()
            os.kill(os.getpid(), how)
        return original_write(path, write_then_die)
    return original_write(path, write)

supcon.losses.SupConLoss.forward = forward
supcon.checkpoint._atomic_write = atomic_write
sys.argv[0] = "supcon-train"
main()
"""


@pytest.mark.slow
def test_ten_random_kills_and_resumes_end_with_the_uninterrupted_weights(tmp_path):
    data = write_image_folder(tmp_path / "train", 6, size=20, seed=4)  # 18 images, batch 4: 4 steps per epoch
    reference = tmp_path / "straight"
    result = CliRunner().invoke(train_command, ["--data-folder", str(data), "--run-dir", str(reference), *ARGS])
    assert result.exit_code == 0, result.output

    run_dir = tmp_path / "run"
    args = ["--data-folder", str(data), "--run-dir", str(run_dir), *ARGS, "--resume"]
    rng = random.Random(14)
    kills = []
    for session in range(10):
        # a random moment: one of the session's first 12 steps, or one of its first 3 checkpoint writes (a
        # checkpoint is written every epoch, so both bound the session to 3 epochs)
        event = rng.choice(["step", "save"])
        at = rng.randint(1, MAX_STEPS_PER_SESSION if event == "step" else MAX_STEPS_PER_SESSION // STEPS_PER_EPOCH)
        how = rng.choice(["SIGKILL", "SIGTERM"])
        env = {**os.environ, "KILL_EVENT": event, "KILL_AT": str(at), "KILL_SIGNAL": how,
               "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same floating-point reductions as here
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        log_path = tmp_path / f"session{session}.log"
        with open(log_path, "w") as log:
            process = subprocess.run([sys.executable, "-c", KILLING_TRAIN, *args], cwd=tmp_path, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, timeout=300)
        text = log_path.read_text()
        assert "Traceback" not in text, text
        expected = (-signal.SIGKILL,) if how == "SIGKILL" else (143, -signal.SIGTERM)
        assert process.returncode in expected, (session, event, at, how, process.returncode, text)
        kills.append((event, how))
    assert {"SIGKILL", "SIGTERM"} <= {how for _, how in kills}
    assert {"step", "save"} <= {event for event, _ in kills}
    assert ("save", "SIGKILL") in kills  # at least one kill -9 left a half-renamed checkpoint write behind
    progress = torch.load(run_dir / "last.pth", weights_only=True)
    assert progress["global_step"] < 40 * STEPS_PER_EPOCH  # the storm did not finish the run by itself

    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    got = torch.load(run_dir / "last.pth", weights_only=True)
    expected = torch.load(reference / "last.pth", weights_only=True)
    assert got["epoch"] == expected["epoch"] == 40 and got["global_step"] == expected["global_step"]
    for part in ("encoder", "head"):
        assert [k for k in expected[part] if not torch.equal(got[part][k], expected[part][k])] == []
    momentum, expected_momentum = got["optimizer"]["state"], expected["optimizer"]["state"]
    assert all(torch.equal(momentum[k]["momentum_buffer"], expected_momentum[k]["momentum_buffer"])
               for k in expected_momentum)
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, 41))  # each epoch logged once
    assert sorted(p.name for p in run_dir.glob("*.pth")) == sorted(p.name for p in reference.glob("*.pth"))
    assert list(run_dir.glob(".*.tmp")) == [] and list(run_dir.glob("*.corrupt-*")) == []
    assert (run_dir / ".lock").read_text() == ""
