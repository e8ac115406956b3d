"""scripts/gpu_check.sh runs on a CPU-only machine with tiny settings, so it is known to work before a
GPU session spends its minutes on it: every stage's outcome is recorded, a failing stage is reported
with its log and makes the script exit non-zero, and one summary table comes last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, python: str = sys.executable, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def stages(out: Path) -> dict[str, str]:
    return {line.split("\t")[0]: line.split("\t")[1] for line in (out / "stages.tsv").read_text().splitlines()}


def test_one_stage_runs_and_the_summary_comes_last(tmp_path):
    out = tmp_path / "check"
    result = gpu_check("--only", "bench_loader", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert stages(out) == {"bench_loader": "ok"}
    rows = json.loads((out / "loader.json").read_text())["results"]
    assert {r["pipeline"] for r in rows} == {"plain", "fast-cpu", "decode"} and all(r["images_per_s"] > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| bench_loader | ok |" in summary and "| fast-cpu | 0 |" in summary
    assert summary.strip().endswith("failed stages: none")
    assert result.stdout.rstrip().endswith(f"gpu_check: all stages passed; results in {out}")


def test_a_failing_stage_is_reported_with_its_log_and_fails_the_script(tmp_path):
    # A python that fails the loader benchmark (only) with a message, and runs everything else.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *bench_loader.py*) echo "loader exploded" >&2; exit 7;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "check"
    result = gpu_check("--only", "bench_loader", "--out", str(out), python=str(python))
    assert result.returncode == 1
    assert stages(out) == {"bench_loader": "failed (exit 7)"}
    assert "bench_loader: failed (exit 7)" in result.stdout and "| loader exploded" in result.stdout
    assert "failed stages: bench_loader" in result.stdout
    assert "some stages failed" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--only", "bench_trian"], "Error: unknown stage 'bench_trian' in --only"),
    (["--bogus"], "Error: unknown option --bogus"),
])
def test_bad_arguments_get_one_line_errors(args, message, tmp_path):
    result = gpu_check(*args, "--out", str(tmp_path / "check"))
    assert result.returncode == 2 and result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith(message)
    assert not (tmp_path / "check").exists()


@pytest.mark.slow
def test_every_stage_runs_on_the_cpu_with_tiny_settings(tmp_path):
    out = tmp_path / "check"
    result = gpu_check("--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert stages(out) == {"tests": "ok", "bench_train": "ok", "bench_train_batches": "ok", "profile_step": "ok",
                           "bench_train_seresnext": "skipped (CPU smoke)", "bench_loader": "ok", "make_jpegs": "ok",
                           "supcon_train": "ok", "probe_all": "ok", "check_accuracies": "ok"}
    train = json.loads((out / "train.json").read_text())["results"]
    by_setting = {(r["setting"], r["data"]): r for r in train}
    assert set(by_setting) == {("plain", "synthetic"), ("plain", "folder"),
                               ("fast fp32/nchw/eager/device-aug", "synthetic"),
                               ("fast fp32/nchw/eager/device-aug", "folder"), ("reference fp32/nchw", "synthetic")}
    reference = by_setting[("reference fp32/nchw", "synthetic")]["images_per_s"]
    for row in train:  # every row carries its ratio to the reference loop
        assert row["ratio_vs_reference"] == pytest.approx(row["images_per_s"] / reference, rel=1e-2)
    assert (out / "pipeline" / "run" / "last.pth").is_file()
    comparison = (out / "pipeline" / "comparison.csv").read_text()
    assert "val_accuracy" in comparison and str(out / "pipeline" / "run") in comparison
    assert result.stdout.rstrip().endswith("all stages passed; results in " + str(out))
