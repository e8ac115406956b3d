"""The first quick-start command: the digits export and the whole pipeline through ``supcon-demo``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supcon.digits import MARKER, export_digits
from supcon.errors import UserError


def test_digits_export_is_a_stratified_rgb_image_folder(tmp_path):
    root = export_digits(tmp_path / "digits", size=24)
    counts = {split: {c.name: len(list(c.iterdir())) for c in (root / split).iterdir()}
              for split in ("train", "val", "test")}
    assert all(sorted(counts[s]) == [str(d) for d in range(10)] for s in counts)
    total = sum(sum(c.values()) for c in counts.values())
    assert total == 1797
    for digit in range(10):  # every class split 60/20/20 (within rounding)
        n = sum(counts[s][str(digit)] for s in counts)
        assert abs(counts["train"][str(digit)] - 0.6 * n) <= 1.5
        assert abs(counts["test"][str(digit)] - 0.2 * n) <= 1.5
    image = Image.open(next((root / "train" / "0").iterdir()))
    assert image.mode == "RGB" and image.size == (24, 24)
    pixels = np.asarray(image)
    assert pixels.max() > 200 and pixels.min() < 30  # strokes on a dark background
    # no image in two splits
    names = [p.name for p in root.rglob("*.png")]
    assert len(names) == len(set(names))


def test_a_smaller_training_set_keeps_val_and_test_as_split(tmp_path):
    full = export_digits(tmp_path / "full", size=8)
    small = export_digits(tmp_path / "small", size=8, train_per_class=7)

    def files(root, split):
        return sorted(str(p.relative_to(root / split)) for p in (root / split).rglob("*.png"))

    assert all(len(list((small / "train" / str(d)).iterdir())) == 7 for d in range(10))
    assert set(files(small, "train")) < set(files(full, "train"))  # a subset of the same split
    assert files(small, "val") == files(full, "val") and files(small, "test") == files(full, "test")
    assert json.loads((small / MARKER).read_text())["train_per_class"] == 7
    assert "train_per_class" not in json.loads((full / MARKER).read_text())  # older exports still match


def test_digits_export_is_reused_or_refused(tmp_path):
    root = export_digits(tmp_path / "digits", size=16, one_vs_rest=3)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    assert sorted(p.name for p in (root / "train").iterdir()) == ["3", "other"]
    export_digits(tmp_path / "digits", size=16, one_vs_rest=3)  # same settings: reused untouched
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before
    with pytest.raises(UserError, match="other settings"):
        export_digits(tmp_path / "digits", size=32)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_digits(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "busy" / MARKER).exists()


def test_demo_runs_the_whole_pipeline_and_prints_the_table(tmp_path):
    """supcon-train -> probe-all --from auto -> baseline-train (ResNet, SVM) -> check-accuracies, tiny settings."""
    script = Path(sys.executable).parent / "supcon-demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(script), "--workdir", str(tmp_path / "demo"), "--model", "test_resnet", "--epochs", "3",
            "--batch-size", "64", "--size", "16", "--baseline-epochs", "1", "--num-workers", "0"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    demo = tmp_path / "demo"
    supcon_run = demo / "runs" / "supcon_test_resnet_bs64"
    baseline_run = demo / "runs" / "baseline_test_resnet"
    assert (supcon_run / "ckpt_epoch_3.pth").is_file()
    assert (supcon_run / "probe" / "probe_results.csv").is_file()
    assert (supcon_run / "probe" / "probe_plot.png").is_file()
    assert (baseline_run / "best.pth").is_file()
    svm_run = demo / "runs" / "svm_pixels"
    for run, kind in ((supcon_run, "supcon"), (baseline_run, "baseline"), (svm_run, "baseline")):
        report = json.loads((run / "test_metrics.json").read_text())
        assert report["kind"] == kind
        assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
        assert Path(report["test_folder"]) == (demo / "digits" / "test").resolve()
    rows = list(csv.DictReader(open(demo / "comparison.csv")))
    assert len(rows) == 3
    svm_row = next(r for r in rows if r["network"].startswith("RBF SVM on 8 px pixels"))
    assert float(svm_row["accuracy"]) > 0.95  # an RBF SVM on the 8x8 digits is a strong baseline
    assert "| Accuracy |" in done.stdout and "Comparison table" in done.stdout
    # export, predict and the report of the selected model
    assert (demo / "export" / "model.safetensors").is_file()
    assert (demo / "export" / "classifier" / "config.json").is_file()
    test_images = list((demo / "digits" / "test").rglob("*.png"))
    assert len(list(csv.DictReader(open(demo / "predictions.csv")))) == len(test_images)
    assert (supcon_run / "report" / "index.html").is_file() and (baseline_run / "report" / "index.html").is_file()
    assert done.stdout.strip().splitlines()[-1].startswith(f"Report: {supcon_run / 'report' / 'index.html'}")
    # a second run reuses everything: nothing is retrained
    checkpoint = supcon_run / "ckpt_epoch_3.pth"
    mtime = checkpoint.stat().st_mtime_ns
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint.stat().st_mtime_ns == mtime


def test_demo_passes_its_seed_and_pins_the_threads_of_every_step(tmp_path, monkeypatch):
    """--seed reaches supcon-train, probe-all and baseline-train; every step runs with --threads CPU threads."""
    from click.testing import CliRunner

    import supcon.demo as demo

    calls = []

    def run(command, env=None):
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo.subprocess, "run", run)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the caller's setting does not leak into the steps
    result = CliRunner().invoke(demo.demo_command, ["--workdir", str(tmp_path / "demo"), "--seed", "3",
                                                    "--threads", "1", "--size", "8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    def name(command):  # a console script, or its ``python -m linear_probe.use_cli NAME`` fallback
        return command[3] if command[1:3] == ["-m", "linear_probe.use_cli"] else Path(command[0]).name

    names = [name(command) for command, _ in calls]
    assert names[:5] == ["supcon-train", "probe-all", "baseline-train", "baseline-train", "check-accuracies"]
    assert len(names) == 8  # then export, predict, report
    for command, _ in calls[:3]:  # supcon-train, probe-all, the ResNet baseline (the SVM has no seed)
        assert command[command.index("--seed") + 1] == "3", name(command)
    assert all(env[name] == "1" for _, env in calls for name in demo.THREAD_VARIABLES)
