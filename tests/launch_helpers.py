"""supcon-train under the real launchers (torchrun, accelerate launch, the SLURM recipe), as the tests start them.

Every launcher runs in its own subprocess with a timeout, on free ports, with one thread per process
(the thread count changes the floating-point results bit for bit). :data:`STEP_HOOK_TRAIN` is
supcon-train with a hook in one chosen step, so a test can act while that step is in flight.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TORCHRUN = str(BIN / "torchrun")
ACCELERATE = str(BIN / "accelerate")

#: A model without BatchNorm (GroupNorm, and no BN in the head): its training does not depend on how the global
#: batch is split over the processes, so runs on 1, 2 and 4 processes can be compared weight for weight.
#: 36 images (the ``train_folder`` fixture), 4 per process on 2 processes: 4 steps per epoch.
MODEL_ARGS = ["--model", "test_efficientnet_gn", "--no-head-bn", "--size", "16", "--num-workers", "0",
              "--knn-every", "0", "--quiet", "--epochs", "2", "--save-freq", "1", "--seed", "5", "--log-every", "1"]
BATCH_ON_TWO = 4
STEPS_PER_EPOCH = 4

#: supcon-train, with ``HOOK`` done in the ``HOOK_AT_STEP``-th step (1-based) of the first attempt (not after a
#: torchrun restart) on rank ``HOOK_RANK`` ("all": every rank). ``HOOK``: ``pause`` writes this process's pid to
#: ``HOOK_MARKER`` and sleeps; ``sigterm`` sends it SIGTERM (a preemption: save mid-epoch and exit 143).
#: ``RESTART_DELAY_RANK_0``: seconds rank 0 of a restart waits before it starts (its peers reach the store first).
STEP_HOOK_TRAIN = r"""
import os, signal, sys, time
import supcon.losses
from supcon.cli import main

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get("RANK") == "0":
    time.sleep(float(os.environ.get("RESTART_DELAY_RANK_0", "0")))

original = supcon.losses.SupConLoss.forward
calls = 0

def forward(self, *args, **kwargs):
    global calls
    calls += 1
    mine = os.environ["HOOK_RANK"] in ("all", os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if mine and first_attempt and calls == int(os.environ["HOOK_AT_STEP"]):
        if os.environ["HOOK"] == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            with open(os.environ["HOOK_MARKER"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
    return original(self, *args, **kwargs)

supcon.losses.SupConLoss.forward = forward
sys.argv[0] = "supcon-train"
main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """A launcher's environment: one thread per process, this checkout importable, none of this process's launch
    variables, and an empty accelerate config folder (a user's ``accelerate config`` would change the launch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "MASTER_"))}
    hf_home = Path(os.environ.get("TMPDIR", "/tmp")) / "supcon-tests-hf-home"
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HOME": str(hf_home), **extra}


def hook_script(folder: Path) -> str:
    script = folder / "step_hook_train.py"
    script.write_text(STEP_HOOK_TRAIN)
    return str(script)


def start(args: list, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a launcher, its output (stdout and stderr) to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([str(a) for a in args], cwd=cwd, env=env or launch_env(), stdout=out,
                                stderr=subprocess.STDOUT)


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """The exit codes of ``processes``; kills them all and fails the test when one is still running at ``timeout``."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for process in processes:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a launcher was still running after {timeout:.0f} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes


def wait_for_marker(marker: Path, processes: list[subprocess.Popen], log: Path, timeout: float = 240) -> int:
    """The pid a :data:`STEP_HOOK_TRAIN` ``pause`` wrote, once it is there."""
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            pytest.fail(f"training did not reach the paused step:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return int(marker.read_text())


def kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "last.pth", weights_only=True)
    return {f"{part}.{k}": v for part in ("encoder", "head") for k, v in state[part].items()}


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    """Equal to float tolerance (another split of the batch sums in another order), and not trivially."""
    got, expected = weights(run_dir), weights(reference)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
