"""The benchmark scripts run end to end (tiny settings) and write the JSON they promise.

So a GPU session can run them unchanged: this checks the plumbing, not the figures.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    common = load_script("bench_common")
    return common.make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), images=12, size=(40, 36), classes=3)


def test_bench_train_compares_the_plain_and_fast_paths(jpeg_folder, tmp_path, capsys):
    bench = load_script("bench_train")
    out = tmp_path / "train.json"
    report = bench.main(["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4",
                         "--warmup", "1", "--steps", "2", "--repeats", "1", "--rounds", "2", "--num-workers", "0",
                         "--data-folder", str(jpeg_folder), "--threads", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["results"] == report["results"]
    assert {"name", "type", "cpu"} <= written["device"].keys() and {"torch", "timm"} <= written["versions"].keys()
    rows = {(r["setting"], r["data"]): r for r in written["results"]}
    fast = "fast fp32/nchw/eager/device-aug"
    assert set(rows) == {("plain", "synthetic"), ("plain", "folder"), (fast, "synthetic"), (fast, "folder")}
    for (setting, _), row in rows.items():
        assert row["images_per_s"] > 0 and len(row["images_per_s_runs"]) == 2 and row["rounds"] == 2
        assert row["ratio_vs_plain"] == (1.0 if setting == "plain" else pytest.approx(
            row["images_per_s"] / rows[("plain", row["data"])]["images_per_s"], rel=1e-2))
    assert "| plain |" in capsys.readouterr().out


def test_bench_train_times_gradient_caching(tmp_path):
    bench = load_script("bench_train")
    out = tmp_path / "train.json"
    bench.main(["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--chunk-size", "0,2",
                "--data", "synthetic", "--no-plain", "--warmup", "1", "--steps", "1", "--repeats", "1", "--rounds", "1",
                "--threads", "1", "--out", str(out)])
    rows = {r["setting"]: r for r in json.loads(out.read_text())["results"]}
    whole, chunked = "fast fp32/nchw/eager/device-aug", "fast fp32/nchw/eager/device-aug/chunk2"
    assert set(rows) == {whole, chunked}
    assert (rows[whole]["chunk_size"], rows[chunked]["chunk_size"]) == (0, 2)
    assert all(row["images_per_s"] > 0 for row in rows.values())


def test_bench_loader_reports_each_pipeline_per_worker_count(jpeg_folder, tmp_path):
    bench = load_script("bench_loader")
    out = tmp_path / "loader.json"
    bench.main(["--data-folder", str(jpeg_folder), "--size", "16", "--batch-size", "4", "--batches", "2",
                "--workers", "0,1", "--train-rate", "100", "--out", str(out)])
    written = json.loads(out.read_text())
    rows = {(r["pipeline"], r["num_workers"]): r for r in written["results"]}
    assert set(rows) == {(p, w) for p in ("plain", "fast-cpu", "decode") for w in (0, 1)}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert rows[("fast-cpu", 1)]["loader_over_training"] == pytest.approx(rows[("fast-cpu", 1)]["images_per_s"] / 100,
                                                                          rel=1e-2)
    assert "loader_over_training" not in rows[("decode", 0)]
