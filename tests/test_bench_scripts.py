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
    # precision and memory format pinned: the GPU defaults (bf16, NHWC) would name other settings
    report = bench.main(["--precision", "fp32", "--memory-format", "nchw",
                         "--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4",
                         "--warmup", "1", "--steps", "2", "--repeats", "1", "--rounds", "2", "--num-workers", "0",
                         "--data-folder", str(jpeg_folder), "--threads", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["results"] == report["results"]
    assert {"name", "type", "cpu"} <= written["device"].keys() and {"torch", "timm"} <= written["versions"].keys()
    rows = {(r["setting"], r["data"]): r for r in written["results"]}
    fast = "fast fp32/nchw/eager/device-aug"
    reference = "reference fp32/nchw"  # the 40-line loop: synthetic float views only
    assert set(rows) == {("plain", "synthetic"), ("plain", "folder"), (fast, "synthetic"), (fast, "folder"),
                         (reference, "synthetic")}
    loop = rows[(reference, "synthetic")]
    assert loop["loop"] == "reference" and loop["mean_loss"] > 0
    for (setting, _), row in rows.items():
        assert row["images_per_s"] > 0 and len(row["images_per_s_runs"]) == 2 and row["rounds"] == 2
        assert row["ratio_vs_plain"] == (1.0 if setting == "plain" else pytest.approx(
            row["images_per_s"] / rows[("plain", row["data"])]["images_per_s"], rel=1e-2))
        assert row["ratio_vs_reference"] == pytest.approx(row["images_per_s"] / loop["images_per_s"], rel=1e-2)
        if written["device"]["type"] == "cpu":  # CPU-time figures are kept on the CPU only
            assert row["cpu_ratio_vs_reference"] == pytest.approx(
                row["cpu_images_per_s"] / loop["cpu_images_per_s"], rel=1e-2)
    output = capsys.readouterr().out
    assert "| plain |" in output and f"| {reference} |" in output


def test_bench_train_times_gradient_caching(tmp_path):
    bench = load_script("bench_train")
    out = tmp_path / "train.json"
    bench.main(["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--chunk-size", "0,2",
                "--data", "synthetic", "--no-plain", "--warmup", "1", "--steps", "1", "--repeats", "1", "--rounds", "1",
                "--threads", "1", "--precision", "fp32", "--memory-format", "nchw", "--out", str(out)])
    # the project's rows; the reference loop (no chunking) is measured beside them
    rows = {r["setting"]: r for r in json.loads(out.read_text())["results"] if not r["setting"].startswith("reference")}
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


def test_the_reference_loop_computes_the_same_loss_as_the_project():
    """Two independent implementations of SupCon L_out (the reference's formula and supcon.losses) agree."""
    import torch
    import torch.nn.functional as F

    from supcon.losses import SupConLoss

    bench = load_script("bench_train")
    generator = torch.Generator().manual_seed(3)
    features = F.normalize(torch.randn(12, 2, 16, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (12,), generator=generator)
    labels[-1] = 9  # a label seen once: its views are each other's only positive
    expected = SupConLoss(temperature=0.1)(features, labels)
    # supcon.losses computes in float32
    assert bench.reference_supcon_loss(features, labels, temperature=0.1).item() == pytest.approx(expected.item(),
                                                                                          rel=1e-6)


def test_bench_quality_runs_the_whole_comparison_and_writes_its_table(tmp_path):
    """One image set, one seed, three epochs of a tiny net: every stage runs and the summary holds each row."""
    bench = load_script("bench_quality")
    report = bench.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--datasets",
                         "textures", "--seeds", "0", "--epochs", "3", "--model", "test_resnet", "--small-input",
                         "--size", "16", "--per-class", "12,6,6", "--batch-size", "8", "--jobs", "1",
                         "--pixel-size", "8"])
    table = report["summary"]["textures"]["table"]
    assert set(table) == {"supcon", "supcon_finetune", "ce_scratch", "ce_scratch_2x", "svm", "logreg", "knn"}
    assert all(0 <= row["median"] <= 1 and len(row["per_seed"]) == 1 for row in table.values())
    verdicts = report["summary"]["textures"]["verdicts"]
    assert {v["outcome"] for v in verdicts.values()} <= {"beats", "ties with", "loses to"}
    cell = report["cells"][0]
    assert len(cell["test"]["supcon"]["correct"]) == 24  # 6 test images x 4 classes
    assert set(cell["rules"]) == {"trend", "within-noise", "max-val-acc"}
    written = sorted((tmp_path / "out").glob("quality_*.json"))
    assert len(written) == 1 and written[0].with_suffix(".md").read_text().count("### textures") == 1
    assert "SupCon + linear probe" in written[0].with_suffix(".md").read_text()
    # the tuning mode reads no test folder: the test folder can even be gone
    import shutil

    shutil.rmtree(tmp_path / "work" / "data" / "textures" / "test")
    val = bench.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--datasets", "textures",
                      "--seeds", "0", "--epochs", "3", "--model", "test_resnet", "--small-input", "--size", "16",
                      "--per-class", "12,6,6", "--batch-size", "8", "--jobs", "1", "--val-only", "--no-finetune"])
    assert set(val["cells"][0]["val_accuracy"]) == {"supcon", "ce_scratch"} and "test" not in val["cells"][0]


def test_bench_quality_summary_compares_every_run_with_the_svm_but_not_the_svm_with_itself():
    """summarize() on fabricated cells (two seeds, four runs): the SVM line names every other run, never the SVM."""
    import argparse

    bench = load_script("bench_quality")
    correct = {"supcon": [1, 1, 1, 0, 1, 1], "ce_scratch": [1, 0, 1, 0, 1, 1], "svm": [1, 1, 0, 1, 1, 0],
               "knn": [0, 1, 0, 1, 1, 0]}
    cells = []
    for seed in (0, 1):
        test = {name: {"accuracy": sum(c) / len(c), "interval": [0.5, 1.0], "correct": c, "verdict": None}
                for name, c in correct.items()}
        rules = {rule: {"backbone_epoch": 4, "val_accuracy": 0.9, "test_accuracy": 0.8}
                 for rule in bench.SELECTION_RULES}
        cells.append({"dataset": "digits", "seed": seed, "selected_backbone_epoch": 4, "test": test, "rules": rules})
    args = argparse.Namespace(val_only=False, epochs=6)
    summary, markdown = bench.summarize(cells, args)
    assert set(summary["digits"]["versus_svm"]) == {"supcon", "ce_scratch", "knn"}
    (line,) = [line for line in markdown.splitlines() if line.startswith("- Against the RBF SVM on pixels:")]
    assert "RBF SVM on pixels ties with it" not in line and line.count(" it (p=") == 3
    assert all(bench.LABELS[name] in line for name in ("supcon", "ce_scratch", "knn"))
    assert set(summary["digits"]["table"]) == set(correct)  # the SVM keeps its row in the table


@pytest.mark.slow
def test_bench_until_compares_the_auto_stopped_run_with_fixed_lengths(tmp_path):
    bench = load_script("bench_until")
    report = bench.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--datasets",
                         "textures", "--seeds", "0", "--length", "6", "--probe-every", "1", "--model", "test_resnet",
                         "--small-input", "--size", "16", "--per-class", "12,6,6", "--batch-size", "8", "--jobs", "1"])
    summary = report["summary"]["textures"]
    assert set(summary["table"]) == {"cosine_3", "cosine_6", "cosine_12", "until_plateau"}
    assert [summary["table"][n]["epochs"] for n in ("cosine_3", "cosine_6", "cosine_12")] == [[3], [6], [12]]
    assert 3 <= summary["auto_median_epochs"] <= 24  # the ceiling is 4L
    assert summary["best_fixed"] in {"cosine_3", "cosine_6", "cosine_12"} and 0 <= summary["mcnemar_p"] <= 1
    assert (tmp_path / "out").glob("until_*.md")


@pytest.mark.slow
def test_bench_live_probe_reports_the_probe_time_against_the_training_time(tmp_path):
    bench = load_script("bench_live_probe")
    report = bench.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--demo-epochs", "4",
                         "--demo-model", "test_resnet", "--large-epochs", "2", "--large-images", "12",
                         "--large-size", "32", "--large-model", "test_resnet", "--large-batch-size", "4",
                         "--threads", "1"])
    assert report["demo"]["probes"] == 4 and report["large"]["probes"] == 2  # every 1 (4 // 4) and every epoch
    assert 0 < report["demo"]["overhead"] < 10 and report["large"]["seconds_per_probe"] > 0
    assert report["large"]["overhead_at_default_save_freq"] == pytest.approx(
        report["large"]["seconds_per_probe"] / (50 * report["large"]["seconds_per_epoch"]))


def _metrics_csv(run_dir: Path, rows: list[dict]) -> Path:
    import csv

    run_dir.mkdir(parents=True)
    fields = ["epoch", "loss", "collapsed_loss", "spread", "probe_accuracy", "probe_low", "probe_high",
              "probe_num_val"]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in fields} for row in rows)
    return run_dir


def test_live_probe_table_reads_the_last_and_best_probe_and_the_collapsed_level(tmp_path, capsys):
    table = load_script("live_probe_table")
    probe = {"collapsed_loss": 4.844, "probe_num_val": 200}
    run = _metrics_csv(tmp_path / "run", [
        {"epoch": 1, "loss": 5.2, "spread": 0.05, **probe},
        {"epoch": 2, "loss": 4.9, "spread": 0.03, "probe_accuracy": 0.6, "probe_low": 0.53, "probe_high": 0.67,
         **probe},
        {"epoch": 3, "loss": 4.6, "spread": 0.02, "probe_accuracy": 0.7, "probe_low": 0.63, "probe_high": 0.76,
         **probe},
        {"epoch": 4, "loss": 4.5, "spread": 0.03, "probe_accuracy": 0.65, "probe_low": 0.58, "probe_high": 0.72,
         **probe},
        {"epoch": 5, "loss": 4.4, "spread": 0.04, **probe}])
    (row,) = table.main([str(run), "--json", str(tmp_path / "rows.json")])
    assert (row["epochs"], row["last_probe"]["epoch"], row["best_probe"]["epoch"]) == (5, 4, 3)
    assert (row["last_probe"]["accuracy"], row["best_probe"]["accuracy"], row["loss"]) == (0.65, 0.7, 4.4)
    assert "65.0% [58.0, 72.0] (epoch 4)" in capsys.readouterr().out
    assert json.loads((tmp_path / "rows.json").read_text()) == [row]


def test_live_probe_table_says_which_run_has_no_probe(tmp_path):
    table = load_script("live_probe_table")
    run = _metrics_csv(tmp_path / "run", [{"epoch": 1, "loss": 5.2, "collapsed_loss": 4.8, "spread": 0.05}])
    with pytest.raises(SystemExit, match="no live probe in metrics.csv"):
        table.main([str(run)])
    with pytest.raises(SystemExit, match="no metrics.csv"):
        table.main([str(tmp_path / "nowhere")])
