"""Beyond one machine (issue 22): the launchers as they are used, on one host over gloo.

Two "nodes" are two launchers, each its own process tree with its own working folder, on one run
directory as on a shared file system: torchrun with the c10d rendezvous, accelerate launch
--multi_gpu, and the SLURM recipe's launch line. Then a torchrun elastic restart after a kill -9.
Every run is compared weight for weight with the same global batch trained by one launcher
(``two_process_run``): nodes that trained apart (a global batch of 4 each, half the learning rate)
would not match it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from supcon.cli import train_command
from supcon.launch import check_not_alone
from tests.launch_helpers import (
    ACCELERATE,
    BATCH_ON_TWO,
    BIN,
    MODEL_ARGS,
    REPO,
    STEPS_PER_EPOCH,
    TORCHRUN,
    assert_same_weights,
    free_port,
    hook_script,
    launch_env,
    start,
    wait_all,
    wait_for_marker,
)

SLURM = REPO / "scripts" / "slurm"


def node_folders(tmp_path: Path) -> list[Path]:
    folders = [tmp_path / f"node{node}" for node in (0, 1)]
    for folder in folders:
        folder.mkdir()
    return folders


def run_nodes(commands: list[list], folders: list[Path], env: dict[str, str] | None = None,
              timeout: float = 300) -> tuple[list[int], list[str]]:
    """Start one launcher per node at once; their exit codes and logs."""
    launchers = [start(command, folder, folder / "node.log", env) for command, folder in zip(commands, folders)]
    codes = wait_all(launchers, timeout)
    return codes, [(folder / "node.log").read_text() for folder in folders]


def assert_one_run_of_two_nodes(run_dir: Path, logs: list[str], folders: list[Path]) -> None:
    """One group of two processes on two nodes wrote one run; rank 0 alone logged and wrote."""
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["num_processes"] == 2 and info["global_batch"] == 2 * BATCH_ON_TWO
    assert info["steps_per_epoch"] == STEPS_PER_EPOCH
    assert info["launch"]["nodes"] == 2 and info["launch"]["processes_per_node"] == 1
    assert info["launch"]["backend"] == "gloo"
    text = "".join(logs)
    assert text.count(f"run directory: {run_dir}") == 1 and text.count("epoch 2/2 loss") == 1
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    for folder in folders:  # nothing written beside the shared run directory
        assert [p.name for p in folder.iterdir()] == ["node.log"]


@pytest.mark.slow
def test_two_torchrun_nodes_with_the_c10d_rendezvous_train_one_run(train_folder, two_process_run, tmp_path):
    run_dir, port, folders = tmp_path / "shared" / "run", free_port(), node_folders(tmp_path)
    commands = [[TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", node, "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "-m", "supcon.cli",
                 "--data-folder", train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO]
                for node in (0, 1)]
    codes, logs = run_nodes(commands, folders)
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert_one_run_of_two_nodes(run_dir, logs, folders)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]["launch"]["launch_id"] == "two-nodes"
    assert_same_weights(run_dir, two_process_run)


def accelerate_machines(port: int, *flags: str) -> list[list]:
    return [[ACCELERATE, "launch", *flags, "--num_machines", "2", "--machine_rank", node, "--main_process_ip",
             "127.0.0.1", "--main_process_port", port, "--num_processes", "2", "-m", "supcon.cli"] for node in (0, 1)]


@pytest.mark.slow
def test_two_accelerate_machines_with_multi_gpu_train_one_run(train_folder, two_process_run, tmp_path):
    run_dir, folders = tmp_path / "shared" / "run", node_folders(tmp_path)
    args = ["--data-folder", train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO]
    codes, logs = run_nodes([[*c, *args] for c in accelerate_machines(free_port(), "--multi_gpu")], folders)
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert_one_run_of_two_nodes(run_dir, logs, folders)
    assert_same_weights(run_dir, two_process_run)


@pytest.mark.slow
def test_two_accelerate_machines_without_multi_gpu_are_refused_not_two_separate_runs(train_folder, tmp_path):
    # On a CPU-only host accelerate's plain launcher starts one lone process per machine (seen with accelerate 1.16)
    run_dir, folders = tmp_path / "shared" / "run", node_folders(tmp_path)
    args = ["--data-folder", train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO]
    codes, logs = run_nodes([[*c, *args] for c in accelerate_machines(free_port())], folders, timeout=200)
    assert all(code != 0 for code in codes)
    for log in logs:
        errors = [line for line in log.splitlines() if line.startswith("Error: ")]
        assert errors == ["Error: accelerate launch started this process alone although it was asked for several "
                          "processes or machines (MASTER_ADDR is set, no WORLD_SIZE): without --multi_gpu it starts "
                          "one independent process per machine, which would train separate models. Add --multi_gpu "
                          "(it runs torchrun, also on CPUs: gloo), or launch with torchrun"], log[-2000:]
    assert not run_dir.exists()


def test_a_lone_process_of_accelerate_launch_cpu_is_refused_before_anything_is_written(train_folder, tmp_path,
                                                                                       monkeypatch):
    # the environment `accelerate launch --cpu --num_processes 2` gives its one process (accelerate 1.16)
    for name, value in {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(train_command, ["--data-folder", str(train_folder), "--run-dir",
                                                str(tmp_path / "run"), *MODEL_ARGS])
    assert result.exit_code == 2
    assert result.output.startswith("Error: accelerate launch started this process alone")
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun (also under accelerate launch --multi_gpu) says how many
    check_not_alone()


# --- restarts ---------------------------------------------------------------------------------------------------

RESTART_ARGS = ["--model", "test_resnet", "--small-input", "--size", "32", "--batch-size", "8", "--epochs", "4",
                "--save-freq", "2", "--num-workers", "0", "--knn-every", "1", "--seed", "0", "--quiet"]  # trained_run


def restarted(monkeypatch, launch: str) -> None:
    """This process's environment as torchrun gives it after one restart, in launch ``launch``."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", launch)


def test_a_restart_resumes_the_run_of_its_own_launch_only(trained_run, train_folder, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    args = ["--data-folder", str(train_folder), "--run-dir", str(run_dir), *RESTART_ARGS]
    restarted(monkeypatch, "another-launch")  # trained_run was written without torchrun: launch id None
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 2
    assert f"torchrun restart 1: {run_dir} was written by another launch (id None; this one: another-launch)" \
        in result.output
    assert f"Error: run dir {run_dir} already exists and is not empty; pass --resume" in result.output

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_info"]["launch"] = {"launch_id": "this-launch"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    restarted(monkeypatch, "this-launch")
    result = CliRunner().invoke(train_command, args)  # no --resume typed
    assert result.exit_code == 0, result.output
    assert f"torchrun restarted the processes (restart 1 of at most 1): resuming {run_dir} from its last state" \
        in result.output
    assert f"run {run_dir} is finished: 4 of 4 epochs done" in result.output


def test_a_node_that_counts_no_restart_resumes_the_run_its_launch_wrote(trained_run, train_folder, tmp_path,
                                                                        monkeypatch):
    # on several nodes, a node whose processes were still running when another node's failed is started again by
    # its agent with TORCHELASTIC_RESTART_COUNT unchanged: the run's launch id, not the count, says it is a restart
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_info"]["launch"] = {"launch_id": "this-launch"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    restarted(monkeypatch, "this-launch")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    result = CliRunner().invoke(train_command, ["--data-folder", str(train_folder), "--run-dir", str(run_dir),
                                                *RESTART_ARGS])
    assert result.exit_code == 0, result.output
    assert (f"torchrun started the processes again (this node counts no restart: another node's processes failed, "
            f"or the launch id this-launch was used before): resuming {run_dir}, which this launch wrote, from its "
            "last state") in result.output
    assert f"run {run_dir} is finished: 4 of 4 epochs done" in result.output
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a-new-launch")  # a first attempt of another launch: refused as ever
    result = CliRunner().invoke(train_command, ["--data-folder", str(train_folder), "--run-dir", str(run_dir),
                                                *RESTART_ARGS])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: run dir {run_dir} already exists and is not empty; pass "
                                                  "--resume to continue it, or choose another --run-dir"]


def test_max_restarts_needs_a_run_dir(train_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    result = CliRunner().invoke(train_command, ["--data-folder", str(train_folder), *RESTART_ARGS])
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: torchrun --max-restarts 2 restarts the processes after a failure: pass "
                                     "--run-dir, so that the restarted processes find the run they continue")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_torchrun_restarts_after_a_kill_9_and_the_run_resumes_by_itself(train_folder, two_process_run, tmp_path):
    run_dir, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "train.log"
    # rank 1 pauses in epoch 2, step 2 (of the first attempt only); the test kills it there. Rank 0 of the restart
    # starts late: rank 1 meets the killed group's gloo addresses in torchrun's store, which must not mislead it
    env = launch_env(HOOK="pause", HOOK_RANK="1", HOOK_AT_STEP=str(STEPS_PER_EPOCH + 2), HOOK_MARKER=str(marker),
                     RESTART_DELAY_RANK_0="8")
    launcher = start([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", hook_script(tmp_path),
                      "--data-folder", train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO],
                     tmp_path, log, env)
    pid = wait_for_marker(marker, [launcher], log)
    subprocess.run(["kill", "-9", str(pid)], check=True, timeout=10)
    assert wait_all([launcher], timeout=300) == [0], log.read_text()[-3000:]
    text = log.read_text()
    assert f"torchrun restarted the processes (restart 1 of at most 1): resuming {run_dir} from its last state" in text
    assert f"resuming {run_dir} at epoch 2 (1 of 2 epochs done)" in text
    assert text.count(f"run directory: {run_dir}") == 1
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # epoch 2 once, though it was begun twice
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["launch"]["restart"] == 1 and info["num_processes"] == 2
    assert_same_weights(run_dir, two_process_run)


@pytest.mark.slow
def test_two_torchrun_nodes_restart_after_a_kill_9_and_resume_by_themselves(train_folder, two_process_run, tmp_path):
    # node 1's process pauses in epoch 2 and is killed: node 1 counts a restart; node 0, whose process only lost its
    # peer, may be started again by its agent with no restart counted. A fresh store per restart, as the SLURM
    # recipe sets it
    run_dir, port, folders, marker = tmp_path / "shared" / "run", free_port(), node_folders(tmp_path), tmp_path / "p"
    env = launch_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", HOOK="pause", HOOK_RANK="1",
                     HOOK_AT_STEP=str(STEPS_PER_EPOCH + 2), HOOK_MARKER=str(marker))
    script = hook_script(tmp_path)
    launchers = [start([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", node, "--rdzv-backend",
                        "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--max-restarts", "1",
                        script, "--data-folder", train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size",
                        BATCH_ON_TWO], folder, folder / "node.log", env) for node, folder in zip((0, 1), folders)]
    pid = wait_for_marker(marker, launchers, folders[1] / "node.log")
    subprocess.run(["kill", "-9", str(pid)], check=True, timeout=10)
    logs = lambda: "\n".join((folder / "node.log").read_text()[-2000:] for folder in folders)  # noqa: E731
    assert wait_all(launchers, timeout=300) == [0, 0], logs()
    text = "".join((folder / "node.log").read_text() for folder in folders)
    assert f"resuming {run_dir} at epoch 2 (1 of 2 epochs done)" in text
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    assert_same_weights(run_dir, two_process_run)


def test_several_nodes_with_max_restarts_need_a_fresh_store_per_restart(train_folder, tmp_path, monkeypatch):
    # what torchrun --nnodes 2 --max-restarts 1 gives a process when torchrun shares its store (torch's default)
    for name, value in {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    args = ["--data-folder", str(train_folder), "--run-dir", str(tmp_path / "run"), *MODEL_ARGS]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: torchrun --max-restarts 1 on 2 nodes: torchrun keeps one store for all restarts, where the restarted "
        "processes would meet the failed ones' addresses; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun "
        "on every node (scripts/slurm/torchrun_node.sh does), or launch without --max-restarts"]
    assert list(tmp_path.iterdir()) == []
    node_script = (SLURM / "torchrun_node.sh").read_text()
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in node_script.split("exec ")[0]


# --- the SLURM recipe -------------------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# srun on one host: the command once per "node" (SLURM_NODEID 0 .. SLURM_NNODES-1); TERM goes to them all
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
trap 'echo "srun: TERM" >> "$FAKE_LOG"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
wait  # a TERM cuts one of the waits above short: until every node is done
exit $status
"""
FAKE_SCONTROL = r"""#!/bin/bash
# scontrol on one host: every node of the job is 127.0.0.1; a requeue is noted
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; echo 127.0.0.1; else echo "scontrol: $*" >> "$FAKE_LOG"; fi
"""


def slurm_job(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of the sbatch script on one host: srun and scontrol stand-ins, a 2-node job of 1 GPU each."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env = launch_env(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]",
                     SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", RDZV_PORT=str(free_port()),
                     FAKE_LOG=str(tmp_path / "slurm.log"), **extra)
    env["PATH"] = f"{fake_bin}:{BIN}:{env['PATH']}"
    return env


def test_the_slurm_scripts_parse():
    for script in ("supcon-train.sbatch", "torchrun_node.sh"):
        assert subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
def test_the_slurm_recipe_trains_two_nodes_as_one_run(train_folder, two_process_run, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = start(["bash", SLURM / "supcon-train.sbatch", "--data-folder", train_folder, "--run-dir", run_dir,
                 *MODEL_ARGS, "--batch-size", BATCH_ON_TWO], tmp_path, log, slurm_job(tmp_path))
    assert wait_all([job], timeout=300) == [0], log.read_text()[-3000:]
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["num_processes"] == 2 and info["launch"]["nodes"] == 2
    assert info["launch"]["launch_id"] == "4242" and info["launch"]["max_restarts"] == 1
    assert log.read_text().count(f"run directory: {run_dir}") == 1
    assert_same_weights(run_dir, two_process_run)


def test_the_slurm_recipe_stops_the_training_and_requeues_on_usr1(tmp_path):
    fake_torchrun = tmp_path / "torchrun"  # stands in for the training: notes the TERM it gets
    fake_torchrun.write_text('#!/bin/bash\ntrap \'echo "training: TERM" >> "$FAKE_LOG"; exit 143\' TERM\n'
                             'echo "training: $*" >> "$FAKE_LOG"\nwhile true; do sleep 0.1; done\n')
    fake_torchrun.chmod(0o755)
    env = slurm_job(tmp_path, TORCHRUN=str(fake_torchrun))
    job = start(["bash", SLURM / "supcon-train.sbatch", "--run-dir", "runs/x"], tmp_path, tmp_path / "job.out", env)
    fake_log = tmp_path / "slurm.log"
    deadline = time.monotonic() + 30
    while (not fake_log.exists() or fake_log.read_text().count("training: ") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300: the time limit is near
    assert wait_all([job], timeout=30) == [0]
    lines = fake_log.read_text().splitlines()
    launches = [line for line in lines if line.startswith("training: --nnodes")]
    assert sorted(launches) == [f"training: --nnodes 2 --nproc-per-node 1 --node-rank {node} --rdzv-backend c10d "
                                f"--rdzv-endpoint 127.0.0.1:{env['RDZV_PORT']} --rdzv-id 4242 --max-restarts 1 -m "
                                "supcon.cli --run-dir runs/x --resume" for node in (0, 1)]
    assert lines.count("training: TERM") == 2 and "srun: TERM" in lines
    assert lines[-1] == "scontrol: requeue 4242"
    assert "USR1: stopping supcon-train" in (tmp_path / "job.out").read_text()
