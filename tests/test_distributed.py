"""Several processes (gloo, CPU): the loss contrasts the global batch and the gradients match one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from supcon.cli import train_command
from supcon.distributed import gather_no_grad, gather_with_grad, is_distributed, rank, world_size
from supcon.losses import SupConLoss
from tests.launch_helpers import (
    BATCH_ON_TWO,
    MODEL_ARGS,
    STEPS_PER_EPOCH,
    TORCHRUN,
    assert_same_weights,
    hook_script,
    launch_env,
    start,
    wait_all,
)

WORLD = 2
LOCAL_BATCH = 5


def make_problem():
    """Inputs for the whole (concatenated) batch and the weights of a tiny linear 'network'."""
    generator = torch.Generator().manual_seed(0)
    return {
        "inputs": torch.randn(WORLD * LOCAL_BATCH, 3, 6, generator=generator),  # [batch, n_views, in]
        "labels": torch.tensor([0, 1, 2, 0, 1, 3, 1, 2, 0, 4]),
        "weight": torch.randn(6, 8, generator=generator),
    }


def projections_and_loss(weight, inputs, labels):
    features = F.normalize(inputs @ weight, dim=-1)
    return SupConLoss(temperature=0.1, base_temperature=0.07)(features, labels)


def _worker(process_rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process_rank, world_size=WORLD)
    try:
        assert is_distributed() and world_size() == WORLD and rank() == process_rank
        problem = make_problem()
        local = slice(process_rank * LOCAL_BATCH, (process_rank + 1) * LOCAL_BATCH)
        results = {}
        for mode in ("supcon", "simclr"):
            weight = problem["weight"].clone().requires_grad_(True)
            labels = problem["labels"][local] if mode == "supcon" else None
            loss = projections_and_loss(weight, problem["inputs"][local], labels)
            loss.backward()
            # what DDP does with the gradients: average them over the processes
            dist.all_reduce(weight.grad)
            weight.grad /= WORLD
            results[mode] = {"loss": loss.detach(), "grad": weight.grad}
        # the helpers: concatenation in rank order; the gradient of each slice returns to its process
        mine = torch.full((2, 3), float(process_rank), requires_grad=True)
        gathered = gather_with_grad(mine)
        (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
        results["gathered"] = gathered.detach()
        results["gathered_grad"] = mine.grad
        results["labels"] = gather_no_grad(torch.tensor([process_rank, process_rank + 10]))
        torch.save(results, Path(out_dir) / f"rank{process_rank}.pth")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pth", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["supcon", "simclr"])
def test_mean_of_process_losses_and_averaged_gradients_equal_one_process(rank_results, mode):
    problem = make_problem()
    weight = problem["weight"].clone().requires_grad_(True)
    loss = projections_and_loss(weight, problem["inputs"], problem["labels"] if mode == "supcon" else None)
    loss.backward()

    rank_losses = torch.stack([r[mode]["loss"] for r in rank_results])
    assert rank_losses.mean().item() == pytest.approx(loss.item(), rel=1e-5)
    # each process's own loss is not the global one: it really contrasted against the other process
    local_alone = projections_and_loss(problem["weight"], problem["inputs"][:LOCAL_BATCH],
                                       problem["labels"][:LOCAL_BATCH] if mode == "supcon" else None)
    assert rank_losses[0].item() != pytest.approx(local_alone.item(), rel=1e-3)
    for r in rank_results:
        torch.testing.assert_close(r[mode]["grad"], weight.grad, rtol=1e-4, atol=1e-6)


def test_gather_helpers(rank_results):
    expected = torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3, [1.0] * 3])
    for process_rank, r in enumerate(rank_results):
        torch.testing.assert_close(r["gathered"], expected)
        # d(sum over both processes of gathered * [1,2,3,4]) / d(my 2 rows): the weights of my slice, summed
        weights = torch.tensor([1.0, 2.0]) + 2 * process_rank
        torch.testing.assert_close(r["gathered_grad"], (WORLD * weights)[:, None].expand(2, 3))
        assert r["labels"].tolist() == [0, 10, 1, 11]


def test_one_process_does_nothing():
    tensor = torch.ones(3, requires_grad=True)
    assert not is_distributed() and world_size() == 1 and rank() == 0
    assert gather_with_grad(tensor) is tensor
    assert gather_no_grad(tensor) is tensor


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_run(train_folder, tmp_path):
    """Two processes join one gloo group: one run dir, global batch and LR doubled, one set of weights."""
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "supcon.cli", "--data-folder",
            str(train_folder), "--run-dir", str(run_dir), "--model", "test_resnet", "--small-input", "--size", "16",
            "--batch-size", "8", "--num-workers", "0", "--knn-every", "1", "--quiet", "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    info = config["run_info"]
    assert info["num_processes"] == 2  # a real process group, not two lone processes
    assert info["global_batch"] == 16 and info["steps_per_epoch"] == 36 // 16
    assert config["learning_rate"] == pytest.approx(0.5 * 16 / 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one run dir
    # the main process logs and reports; the other one stays quiet
    assert completed.stderr.count("epoch 1/2 loss") == 1
    assert completed.stdout.count(f"run directory: {run_dir}") == 1
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 2 * 2


# --- resuming on another number of processes (issue 22) ---------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_on_two(train_folder, tmp_path_factory) -> Path:
    """A 2-process run preempted (SIGTERM to both) in epoch 2, step 2: its last.pth is mid-epoch."""
    folder = tmp_path_factory.mktemp("stopped_on_two")
    run_dir, log = folder / "run", folder / "train.log"
    env = launch_env(HOOK="sigterm", HOOK_RANK="all", HOOK_AT_STEP=str(STEPS_PER_EPOCH + 2))
    launcher = start([TORCHRUN, "--standalone", "--nproc-per-node", "2", hook_script(folder), "--data-folder",
                      train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO], folder, log, env)
    assert wait_all([launcher], timeout=300) != [0]  # the workers exit 143 after saving
    assert "interrupted in epoch 2 at step 2/4" in log.read_text(), log.read_text()[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 4])
def test_a_two_process_run_resumes_on_another_number_keeping_its_global_batch(train_folder, stopped_on_two,
                                                                              two_process_run, tmp_path, processes):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_on_two, run_dir)
    # the same command as before (--batch-size 4), on another number of processes
    args = ["--data-folder", train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO, "--resume"]
    if processes == 1:
        result = CliRunner().invoke(train_command, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        output = result.output
    else:
        log = tmp_path / "train.log"
        launcher = start([TORCHRUN, "--standalone", "--nproc-per-node", processes, "-m", "supcon.cli", *args],
                         tmp_path, log)
        assert wait_all([launcher], timeout=300) == [0], log.read_text()[-3000:]
        output = log.read_text()
    per_process = 8 // processes
    assert (f"resuming {run_dir} on {processes} process{'es' if processes > 1 else ''} (it trained on 2): its global "
            f"batch of 8 is kept, {per_process} per process (was 4)") in output
    assert f"resuming {run_dir} in epoch 2 at step 2/4" in output
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    info = config["run_info"]
    assert info["num_processes"] == processes and info["global_batch"] == 8 and info["steps_per_epoch"] == 4
    assert config["batch_size"] == per_process and config["learning_rate"] == pytest.approx(0.5 * 8 / 1024)
    assert info["process_changes"] == [{"epoch": 1, "processes_before": 2, "processes_now": processes,
                                        "batch_size_before": 4, "batch_size_now": per_process}]
    assert_same_weights(run_dir, two_process_run)
