"""scripts/bench_probe.py runs end to end at tiny settings and writes the JSON it promises (plumbing, not figures)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.probe_helpers import copy_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_probe.py"


def test_bench_probe_times_both_protocols_on_the_same_checkpoints(trained_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_probe_under_test", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # it puts scripts/ on sys.path for bench_common
    run = copy_run(trained_run, tmp_path / "run")
    assert bench.main(["--run", str(run), "--checkpoints", "2", "--epochs", "2", "--threads", "1",
                       "--output", str(tmp_path / "out")]) == 0
    [written] = (tmp_path / "out").glob("probe_cpu_*.json")
    report = json.loads(written.read_text())
    assert report["checkpoints"] == ["ckpt_epoch_2.pth", "ckpt_epoch_4.pth"] and report["head_epochs"] == 2
    assert report["benchmark"] == "probe" and report["device"]["type"] == "cpu"
    assert report["cached_seconds"] > 0 and report["augment_seconds"] > 0
    assert report["speedup"] == pytest.approx(report["augment_seconds"] / report["cached_seconds"], rel=0.05)
    assert set(report["per_checkpoint_val_accuracy"]) == {"ckpt_epoch_2.pth", "ckpt_epoch_4.pth"}
    accuracies = report["per_checkpoint_val_accuracy"].values()
    assert all(0 <= v["cached"] <= 1 and 0 <= v["augment"] <= 1 for v in accuracies)
    assert "| cached features |" in capsys.readouterr().out
