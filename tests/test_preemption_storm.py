"""Preemption storm (issue 14, item 7): a run killed 10 times at random moments, resumed each time, ends with the
weights of an uninterrupted run. Slow (minutes): each session pays the start-up of a new process."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from supcon.cli import train_command
from tests.conftest import write_image_folder

ARGS = ["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--num-workers", "0",
        "--knn-every", "0", "--quiet", "--epochs", "40", "--save-freq", "5", "--seed", "3"]
TRAINING_STARTED = "one checkpoint is"  # logged once the session has loaded its state, before its first step


@pytest.mark.slow
def test_ten_random_kills_and_resumes_end_with_the_uninterrupted_weights(tmp_path):
    data = write_image_folder(tmp_path / "train", 6, size=20, seed=4)  # 18 images, batch 4: 4 steps per epoch
    reference = tmp_path / "straight"
    result = CliRunner().invoke(train_command, ["--data-folder", str(data), "--run-dir", str(reference), *ARGS])
    assert result.exit_code == 0, result.output

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "supcon.cli", "--data-folder", str(data), "--run-dir", str(run_dir), *ARGS,
               "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(14)
    landed = []
    for session in range(10):
        log_path = tmp_path / f"session{session}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while TRAINING_STARTED not in log_path.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, "the session did not start training"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))  # a random moment of the training: a step, a save, between epochs
        how = rng.choice([signal.SIGKILL, signal.SIGTERM])
        if process.poll() is None:
            landed.append(how.name)
            process.send_signal(how)
        code = process.wait(timeout=120)
        text = log_path.read_text()
        assert "Traceback" not in text, text
        assert code in (0, -signal.SIGKILL, 143, -signal.SIGTERM), text
        if code == 0:
            break  # the run finished between two kills
    assert len(landed) >= 8, landed  # most kills hit a running session
    assert {"SIGKILL", "SIGTERM"} <= set(landed)

    result = CliRunner().invoke(train_command, [str(a) for a in command[3:]])
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
