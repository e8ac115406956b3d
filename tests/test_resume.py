"""Days of compute must survive: kill -9, SIGTERM and Ctrl-C, then --resume, give the uninterrupted weights.

The interrupted runs are real ``supcon-train`` processes. To signal them at a known step, they run
through a small wrapper (:data:`PAUSING_TRAIN`) that calls the same ``supcon.cli.main`` but pauses
in one chosen step, so the test can send the signal while that step is in flight.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from supcon.cli import train_command
from supcon.losses import SupConLoss
from tests.conftest import CLASS_COLOURS, write_image_folder

STEPS_PER_EPOCH = 4  # 18 images // batch 4
ARGS = ["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--num-workers", "0",
        "--knn-every", "1", "--quiet", "--epochs", "4", "--save-freq", "2", "--seed", "3"]

PAUSING_TRAIN = r"""
import os, sys, time
import supcon.losses
from supcon.cli import main

original = supcon.losses.SupConLoss.forward
calls = 0

def forward(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == int(os.environ["PAUSE_AT_STEP"]):
        with open(os.environ["PAUSE_MARKER"], "w") as f:
            f.write(str(calls))
        time.sleep(float(os.environ["PAUSE_SECONDS"]))
    return original(self, *args, **kwargs)

supcon.losses.SupConLoss.forward = forward
sys.argv[0] = "supcon-train"
main()
"""




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("resume") / "train", 6, size=20, seed=4)


def invoke(args):
    return CliRunner().invoke(train_command, [str(a) for a in args])


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth", weights_only=True)


def assert_identical_training_state(run_dir: Path, reference: Path):
    got, expected = final_state(run_dir), final_state(reference)
    assert got["epoch"] == expected["epoch"] == 4
    for part in ("encoder", "head"):
        assert got[part].keys() == expected[part].keys()
        different = [k for k in expected[part] if not torch.equal(got[part][k], expected[part][k])]
        assert not different, f"{part} tensors differ: {different[:5]}"
    got_momentum, expected_momentum = got["optimizer"]["state"], expected["optimizer"]["state"]
    assert got_momentum.keys() == expected_momentum.keys()
    assert all(torch.equal(got_momentum[k]["momentum_buffer"], expected_momentum[k]["momentum_buffer"])
               for k in expected_momentum)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_metrics(run_dir: Path, reference: Path):
    got, expected = metrics(run_dir), metrics(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] == ["1", "2", "3", "4"]
    for column in ("loss", "lr", "knn_accuracy"):
        assert [float(r[column]) for r in got] == pytest.approx([float(r[column]) for r in expected], abs=2e-6)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """4 epochs, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert result.exit_code == 0, result.output
    return run_dir


def start_pausing_run(args, workdir: Path, pause_at_step: int, pause_seconds: float = 3.0, new_session: bool = False):
    """Start ``supcon-train args`` in a subprocess that pauses inside its ``pause_at_step``-th step (1-based).

    ``new_session``: in its own process group, so the test can signal it as a terminal does (the group).
    ``pause_seconds``: short for a test whose signal lets the step finish (the sleep goes on after the handler);
    long for a kill -9, so that a slow or loaded machine cannot let the run go on before the kill lands.
    """
    marker = workdir / "paused"
    env = {**os.environ, "PAUSE_AT_STEP": str(pause_at_step), "PAUSE_MARKER": str(marker),
           "PAUSE_SECONDS": str(pause_seconds),
           # the same number of threads as this process: same floating-point reductions
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = open(workdir / "train.log", "w")
    process = subprocess.Popen([sys.executable, "-c", PAUSING_TRAIN, *[str(a) for a in args]], cwd=workdir,
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)
    log.close()
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before step {pause_at_step}:\n"
                        f"{(workdir / 'train.log').read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not reach the step in time")
        time.sleep(0.02)
    return process


def test_kill_9_mid_run_then_resume_gives_identical_weights(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    # pause in epoch 3, step 3: epochs 1-2 are saved, epoch 3 is half done
    process = start_pausing_run(["--data-folder", data, "--run-dir", run_dir, *ARGS], tmp_path,
                                pause_at_step=2 * STEPS_PER_EPOCH + 3, pause_seconds=120)
    assert final_state(run_dir)["epoch"] == 2
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "ckpt_epoch_4.pth").exists()

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {run_dir} at epoch 3 (2 of 4 epochs done)" in result.output
    assert_identical_training_state(run_dir, straight)
    assert_same_metrics(run_dir, straight)
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["ckpt_epoch_2.pth", "ckpt_epoch_4.pth", "last.pth"]
    # TensorBoard: one value per epoch across the two sessions' event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    # the two sessions' event files are read in file-name order (a timestamp with 1 s resolution, then
    # the pid), so compare by step; a repeated epoch would still show as a duplicate step
    losses = sorted(losses, key=lambda s: s.step)
    assert [s.step for s in losses] == [1, 2, 3, 4]
    assert [s.value for s in losses] == pytest.approx([float(r["loss"]) for r in metrics(straight)], abs=1e-5)


def test_sigterm_saves_mid_epoch_state_promptly_and_resumes_identically(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    process = start_pausing_run(["--data-folder", data, "--run-dir", run_dir, *ARGS], tmp_path,
                                pause_at_step=STEPS_PER_EPOCH + 2)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert time.monotonic() - sent < 60
    log = (tmp_path / "train.log").read_text()
    assert "received SIGTERM" in log and "interrupted in epoch 2 at step 2/4" in log
    assert "Traceback" not in log

    state = final_state(run_dir)
    assert state["epoch"] == 1  # epochs completed
    assert state["epoch_state"]["steps_done"] == 2  # the step in flight was finished, then saved
    assert state["global_step"] == STEPS_PER_EPOCH + 2
    assert not (run_dir / "ckpt_epoch_2.pth").exists()

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    # the same state is named the same way when it is saved and when it is resumed: epoch in progress, 1-based
    assert f"resuming {run_dir} in epoch 2 at step 2/4" in result.output
    assert_identical_training_state(run_dir, straight)
    assert_same_metrics(run_dir, straight)


def ctrl_c_at_loss_call(monkeypatch, call: int) -> None:
    """Send this process a SIGINT (Ctrl-C) during the ``call``-th loss computation (1-based)."""
    original = SupConLoss.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SupConLoss, "forward", forward)


def test_ctrl_c_mid_epoch_in_process_then_resume(data, straight, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    ctrl_c_at_loss_call(monkeypatch, 2 * STEPS_PER_EPOCH + 1)
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert result.exit_code == 130, result.output
    state = final_state(run_dir)
    assert (state["epoch"], state["epoch_state"]["steps_done"]) == (2, 1)
    # one convention for the same state: the epoch in progress (1-based) and the steps done in it
    assert "interrupted in epoch 3 at step 1/4" in result.output
    assert [line for line in result.output.splitlines() if "epoch 3/4" in line] == []  # epoch 3 was not logged
    monkeypatch.undo()

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {run_dir} in epoch 3 at step 1/4" in result.output
    # the epoch that finishes is logged, and recorded in the CSV and the checkpoint names, as epoch 3 and 4
    assert "epoch 3/4 loss" in result.output and "epoch 4/4 loss" in result.output
    assert_identical_training_state(run_dir, straight)
    assert_same_metrics(run_dir, straight)


def test_ctrl_c_with_loader_workers_is_reported_once(data, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, loader workers included: one message, one save."""
    run_dir = tmp_path / "run"
    process = start_pausing_run(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--num-workers", "2"], tmp_path,
                                pause_at_step=STEPS_PER_EPOCH + 2, new_session=True)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130
    log = (tmp_path / "train.log").read_text()
    assert log.count("received SIGINT") == 1, log
    assert log.count("interrupted in epoch 2 at step 2/4") == 1, log
    assert "Traceback" not in log
    assert (final_state(run_dir)["epoch"], final_state(run_dir)["epoch_state"]["steps_done"]) == (1, 2)


def test_resume_needs_a_run_dir(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(["--data-folder", data, *ARGS, "--resume"])
    assert result.exit_code != 0
    assert result.output.strip() == "Error: --resume needs --run-dir (the run to continue)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_kill_9_of_the_plain_command_after_epoch_2(data, straight, tmp_path):
    """The same as above without the pausing wrapper: ``python -m supcon.cli``, killed once last.pth holds epoch 2."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-m", "supcon.cli", "--data-folder", str(data), "--run-dir",
                                str(run_dir), *ARGS], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "ckpt_epoch_2.pth").exists():  # written just before last.pth of epoch 2
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    if process.wait(timeout=60) != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed (machine too fast for this variant)")
    # ckpt_epoch_2 is written just before last.pth: the kill may land between the two
    assert final_state(run_dir)["epoch"] in (1, 2, 3)

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert_identical_training_state(run_dir, straight)


#: Options added after the first runs were recorded (a run dir from then has none of them in config.yaml).
NEWER_OPTIONS = ("allow_split_class_names", "allow_data_change", "keep_last", "chunk_size", "memory_size",
                 "memory_warmup", "sampler")


def test_a_run_recorded_before_newer_options_resumes_identically(data, straight, tmp_path, monkeypatch):
    import yaml

    run_dir = tmp_path / "run"
    ctrl_c_at_loss_call(monkeypatch, 2 * STEPS_PER_EPOCH + 1)
    assert invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS]).exit_code == 130
    monkeypatch.undo()
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert all(name in recorded for name in NEWER_OPTIONS)
    for name in NEWER_OPTIONS:  # as an older version wrote it
        del recorded[name]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))

    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert_identical_training_state(run_dir, straight)
    # asking for something else than what the old run trained with is still refused
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume", "--memory-size", "64"])
    assert result.exit_code != 0 and "memory_size" in result.output
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume", "--sampler", "balanced"])
    assert result.exit_code != 0 and "sampler: run has 'random', now 'balanced'" in result.output


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    """12 cats, 3 dogs, 3 foxes: a balanced batch of 4 holds 1-2 of each, so dogs and foxes repeat every epoch."""
    root = tmp_path_factory.mktemp("imbalanced") / "train"
    write_image_folder(root, 12, classes={"cat": CLASS_COLOURS["cat"]}, size=20, seed=5)
    write_image_folder(root, 3, classes={name: CLASS_COLOURS[name] for name in ("dog", "fox")}, size=20, seed=6)
    return root


@pytest.fixture(scope="module")
def straight_balanced(imbalanced, tmp_path_factory) -> Path:
    """4 epochs with --sampler balanced, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight_balanced") / "run"
    result = invoke(["--data-folder", imbalanced, "--run-dir", run_dir, *ARGS, "--sampler", "balanced"])
    assert result.exit_code == 0, result.output
    return run_dir


def test_balanced_sampler_ctrl_c_mid_epoch_then_resume(imbalanced, straight_balanced, tmp_path, monkeypatch):
    """As test_ctrl_c_mid_epoch_in_process_then_resume, with the balanced sampler: its repeats resume too."""
    import yaml

    args = ["--data-folder", imbalanced, "--run-dir", tmp_path / "run", *ARGS, "--sampler", "balanced"]
    ctrl_c_at_loss_call(monkeypatch, 2 * STEPS_PER_EPOCH + 3)
    result = invoke(args)
    assert result.exit_code == 130, result.output
    assert "interrupted in epoch 3 at step 3/4" in result.output
    monkeypatch.undo()

    result = invoke([*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {tmp_path / 'run'} in epoch 3 at step 3/4" in result.output
    assert_identical_training_state(tmp_path / "run", straight_balanced)
    assert_same_metrics(tmp_path / "run", straight_balanced)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["sampler"] == "balanced"
    # the same steps per epoch as the random sampler: 18 images // 4
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["run_info"]["steps_per_epoch"] == 4
    refused = invoke([*args, "--resume", "--sampler", "random"])
    assert refused.exit_code == 2 and "sampler: run has 'balanced', now 'random'" in refused.output
