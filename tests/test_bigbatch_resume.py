"""A run with gradient caching and a cross-batch memory resumes exactly: after kill -9, and mid-epoch."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from supcon.losses import SupConLoss
from tests.test_resume import (
    ARGS,
    STEPS_PER_EPOCH,
    assert_identical_training_state,
    assert_same_metrics,
    final_state,
    invoke,
    start_pausing_run,
)
from tests.test_resume import data as data  # noqa: F401 - the module's image folder fixture

# batch 4 in chunks of 2 (BatchNorm sees 4 views at a time); the memory (16 views) is used from epoch 2
BIG_ARGS = [*ARGS, "--chunk-size", "2", "--memory-size", "16", "--memory-warmup", "1"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("straight_bigbatch") / "run"
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *BIG_ARGS])
    assert result.exit_code == 0, result.output
    return run_dir


def assert_same_memory(run_dir: Path, reference: Path):
    got, expected = final_state(run_dir)["memory"], final_state(reference)["memory"]
    assert expected["filled"] == 16  # full: 4 epochs x 4 steps x 8 views went through it
    assert (got["filled"], got["next_slot"]) == (expected["filled"], expected["next_slot"])
    assert torch.equal(got["labels"], expected["labels"])
    assert torch.equal(got["features"], expected["features"])


def test_the_memory_is_in_the_weights_only_checkpoint_and_changes_the_run(data, straight, tmp_path):  # noqa: F811
    memory = torch.load(straight / "ckpt_epoch_2.pth", weights_only=True)["memory"]
    assert memory["features"].shape == (16, 128) and memory["filled"] == 16
    assert set(memory["labels"].tolist()) <= {0, 1, 2}
    # without the memory the same run trains otherwise (from epoch 2, when the memory is used)
    plain = tmp_path / "plain"
    result = invoke(["--data-folder", data, "--run-dir", plain, *ARGS, "--chunk-size", "2"])
    assert result.exit_code == 0, result.output
    from tests.test_resume import metrics

    assert metrics(plain)[0]["loss"] == metrics(straight)[0]["loss"]  # epoch 1: warm-up, memory not used
    assert metrics(plain)[1]["loss"] != metrics(straight)[1]["loss"]


def test_kill_9_then_resume_gives_identical_weights_and_memory(data, straight, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    process = start_pausing_run(["--data-folder", data, "--run-dir", run_dir, *BIG_ARGS], tmp_path,
                                pause_at_step=2 * STEPS_PER_EPOCH + 3, pause_seconds=120)
    assert final_state(run_dir)["epoch"] == 2
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *BIG_ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert_identical_training_state(run_dir, straight)
    assert_same_metrics(run_dir, straight)
    assert_same_memory(run_dir, straight)


def test_ctrl_c_mid_epoch_then_resume_gives_identical_weights_and_memory(data, straight, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    run_dir = tmp_path / "run"
    original = SupConLoss.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * STEPS_PER_EPOCH + 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SupConLoss, "forward", forward)
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *BIG_ARGS])
    assert result.exit_code == 130, result.output
    state = final_state(run_dir)
    assert (state["epoch"], state["epoch_state"]["steps_done"]) == (2, 2)
    assert state["memory"]["filled"] == 16
    monkeypatch.undo()

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *BIG_ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {run_dir} in epoch 3 at step 2/4" in result.output
    assert_identical_training_state(run_dir, straight)
    assert_same_metrics(run_dir, straight)
    assert_same_memory(run_dir, straight)


def test_a_run_refuses_to_resume_with_another_memory_size(data, straight):  # noqa: F811
    before = (straight / "last.pth").read_bytes()
    options = [*ARGS, "--chunk-size", "2", "--memory-size", "32", "--memory-warmup", "1"]
    result = invoke(["--data-folder", data, "--run-dir", straight, *options, "--resume"])
    assert result.exit_code != 0
    assert "memory_size" in result.output, result.output
    assert (straight / "last.pth").read_bytes() == before
