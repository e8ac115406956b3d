"""One process of a 2-process (gloo, CPU) run fails: every process stops promptly, none hangs in a collective,
the failing process's message is printed, and the last good checkpoint stays (issue 14, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

#: supcon-train, with a fault injected in rank ``FAIL_RANK``'s ``FAIL_AT_STEP``-th step (1-based) only.
FAILING_RANK_TRAIN = r"""
import os, sys
import supcon.losses
from supcon.cli import main

original = supcon.losses.SupConLoss.forward
calls = 0

def forward(self, *args, **kwargs):
    global calls
    loss = original(self, *args, **kwargs)
    if os.environ.get("RANK") == os.environ["FAIL_RANK"]:
        calls += 1
        if calls == int(os.environ["FAIL_AT_STEP"]):
            if os.environ["FAULT"] == "nan":
                return loss * float("nan")
            raise RuntimeError(f"injected fault on rank {os.environ['RANK']}")
    return loss

supcon.losses.SupConLoss.forward = forward
sys.argv[0] = "supcon-train"
main()
"""


@pytest.mark.parametrize("fault", ["nan", pytest.param("raise", marks=pytest.mark.slow)])
def test_one_failing_process_stops_the_run_and_keeps_the_last_good_checkpoint(train_folder, tmp_path, fault):
    script = tmp_path / "failing_rank_train.py"
    script.write_text(FAILING_RANK_TRAIN)
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    # 36 images, 2 x 4 per step: 4 steps per epoch; the fault is in epoch 2, step 2, on rank 1 only
    args = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), "--data-folder", str(train_folder),
            "--run-dir", str(run_dir), "--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4",
            "--num-workers", "0", "--knn-every", "0", "--quiet", "--epochs", "3", "--save-freq", "1",
            "--log-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIL_RANK": "1", "FAIL_AT_STEP": "6", "FAULT": fault,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.monotonic()
    try:
        completed = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("a process of the run hung after rank 1 failed")
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output[-3000:]
    assert time.monotonic() - started < 240
    if fault == "nan":  # the failing process's own message
        assert "Error: loss became non-finite at epoch 2, step 2 of 4" in output, output[-3000:]
    else:
        assert "process 1 of 2 failed (RuntimeError: injected fault on rank 1)" in output, output[-3000:]
        assert "Error: process 0 of 2: stopped because another process of the run stopped" in output
    # the last good checkpoint (epoch 1) is what last.pth still holds; nothing of epoch 2 was saved
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["ckpt_epoch_1.pth", "last.pth"]
    assert (run_dir / "last.pth").read_bytes() == (run_dir / "ckpt_epoch_1.pth").read_bytes()
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["encoder"].values()
                                       if t.is_floating_point())
