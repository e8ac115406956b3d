"""check-accuracies end to end: selection on val, metrics on test, files, baseline runs, bad input."""

import csv
import inspect
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from linear_probe.check import check_accuracies
from linear_probe.cli import check_accuracies_command
from linear_probe.config import CheckConfig
from linear_probe.heads import load_head_records
from linear_probe.select import select_best
from tests.probe_helpers import (
    copy_run,
    edit_run_config,
    invoke,
    one_line_error,
    probed_run,
    snapshot,
    write_malicious,
)


@pytest.fixture(scope="module")
def probed(trained_run, tmp_path_factory):
    return probed_run(trained_run, tmp_path_factory)


@pytest.fixture
def runs_root(probed, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    copy_run(probed, root / "supcon_probed")
    return root


def write_baseline_run(run_dir, data_folder):
    run_dir.mkdir(parents=True)
    config = {"model": "resnet18", "batch_size": 32,
              "run_info": {"kind": "baseline", "data_folder": str(data_folder), "class_names": ["neg", "pos"]}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture
def fake_baseline(monkeypatch):
    """``supcon.baseline.evaluate.predict_run`` as the contract describes it, with known outputs."""
    calls = []

    def predict_run(run_dir, test_folder=None, batch_size=256, num_workers=0, allow_split_names=False):
        calls.append({"run_dir": str(run_dir), "test_folder": test_folder, "num_workers": num_workers})
        positive = np.array([0.1, 0.4, 0.35, 0.8])
        return {"probabilities": np.stack([1 - positive, positive], axis=1), "labels": np.array([0, 0, 1, 1]),
                "class_names": ["neg", "pos"], "network": "resnet18 (baseline, linear head)", "batch_size": 32,
                "selected_epoch": 7, "val_accuracy": 0.9, "test_folder": "/data/test"}

    def predict_val(run_dir, batch_size=256, num_workers=0, allow_split_names=False):
        positive = np.array([0.2, 0.6, 0.3, 0.9])
        return {"probabilities": np.stack([1 - positive, positive], axis=1), "labels": np.array([0, 0, 1, 1]),
                "class_names": ["neg", "pos"], "network": "resnet18 (baseline, linear head)", "batch_size": 32,
                "selected_epoch": 7, "val_accuracy": 0.9, "val_folder": "/data/val"}

    package = types.ModuleType("supcon.baseline")
    module = types.ModuleType("supcon.baseline.evaluate")
    module.predict_run = predict_run
    module.predict_val = predict_val
    package.evaluate = module
    monkeypatch.setitem(sys.modules, "supcon.baseline", package)
    monkeypatch.setitem(sys.modules, "supcon.baseline.evaluate", module)
    return calls


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_over_the_runs_root(runs_root, trained_run, image_root, fake_baseline):
    copy_run(trained_run, runs_root / "supcon_not_probed")  # skipped: no probe results
    write_baseline_run(runs_root / "baseline_resnet18", image_root / "train")
    result = invoke(check_accuracies_command, ["--runs-root", runs_root, "--num-workers", "0", "--quiet"])
    assert result.exit_code == 0, result.stderr
    header = "| bs / backbone epoch / head epoch | Accuracy | Precision | Recall | F1 | AUC | Network | Run | vs best |"
    assert header in result.stdout
    # the docs show this table as the command prints it: every comparison table there has this header
    printed = next(line for line in result.stdout.splitlines() if line.startswith("| bs / backbone epoch"))
    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]
    shown = [line.strip() for page in pages for line in page.read_text().splitlines()
             if line.strip().startswith("| bs / backbone epoch")]
    assert shown and all(line == printed for line in shown), (printed, shown)
    baseline_row = next(line for line in result.stdout.splitlines() if line.startswith("| 32 / 7 / - |"))
    cells = [cell.strip() for cell in baseline_row.strip("|").split("|")]
    assert [cell.split(" [")[0] for cell in cells[1:6]] == ["75.00%", "83.33%", "75.00%", "73.33%", "75.00%"]
    assert all(" [" in cell for cell in cells[1:6])  # each with its interval
    assert cells[6] == "resnet18 (baseline, linear head)"
    assert cells[8] == "other test images"  # the fake baseline's 4 test images are not the SupCon run's 18
    supcon_row = next(line for line in result.stdout.splitlines() if "SupCon test_resnet" in line)
    assert supcon_row.rstrip().endswith("| best |")  # the most accurate run
    assert "supcon_not_probed" not in result.stdout
    assert fake_baseline == [{"run_dir": str(runs_root / "baseline_resnet18"), "test_folder": None, "num_workers": 0}]

    run = runs_root / "supcon_probed"
    report = json.loads((run / "test_metrics.json").read_text())
    best = select_best(load_head_records(run / "probe", run))
    selection = report["selection"]
    # the default tests the chosen checkpoint's final head; the default head (L-BFGS) is one fit, so its
    # final head is its only head: head epoch 1, the val accuracy of the C chosen on val
    assert best.settings["head_solver"] == "lbfgs"
    assert (selection["checkpoint"], selection["head"]) == (best.checkpoint, "final")
    assert selection["head_epoch"] == best.best_head_epoch == 1
    assert selection["val_accuracy"] == best.best_val_accuracy == max(best.val_accuracy_per_epoch)
    assert selection["candidates"] == 2
    assert selection["rule"] == "trend" and "one standard error" in selection["rule_text"]
    assert "2 probed checkpoints span" in selection["note"] and "on 18 val images" in selection["note"]
    low, high = selection["val_accuracy_interval"]
    assert low < best.best_val_accuracy <= high <= 1
    metrics = report["metrics"]
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum(axis=1).tolist() == [6, 6, 6]  # 6 test images per class
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / 18)
    assert set(metrics["per_class"]) == {"cat", "dog", "fox"} and metrics["average"] == "macro"
    assert 0 <= metrics["roc_auc"] <= 1 and report["test_folder"] == str(image_root / "test")  # one-vs-rest
    assert metrics["bootstrap"]["resamples"] == 1000 and metrics["bootstrap"]["seed"] == 0
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        low, high = metrics["intervals"][name]
        assert 0 <= low <= metrics[name] <= high <= 1
    assert report["batch_size"] == 8 and report["network"] == "SupCon test_resnet"
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run / "roc_curve.png").exists()  # three classes

    baseline = runs_root / "baseline_resnet18"
    baseline_report = json.loads((baseline / "test_metrics.json").read_text())
    assert baseline_report["metrics"]["roc_auc"] == pytest.approx(0.75)
    assert baseline_report["metrics"]["confusion_matrix"] == [[2, 0], [1, 1]]
    assert (baseline / "roc_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (baseline / "confusion_matrix.png").is_file()

    rows = {r["kind"]: r for r in read_csv(runs_root / "comparison.csv")}
    assert sorted(rows) == ["baseline", "supcon"]
    supcon_row = rows["supcon"]
    assert float(supcon_row["accuracy"]) == pytest.approx(metrics["accuracy"])
    assert supcon_row["checkpoint"] == best.checkpoint and supcon_row["head_epoch"] == str(selection["head_epoch"])
    markdown = (runs_root / "comparison.md").read_text()
    assert "| 8 / " in markdown and "SupCon test_resnet" in markdown


def test_runs_on_the_same_test_images_are_compared_pairwise(runs_root, tmp_path):
    """Two runs that make the same predictions: McNemar finds no discordant image, the F1 difference is 0."""
    copy_run(runs_root / "supcon_probed", runs_root / "supcon_copy")
    result = invoke(check_accuracies_command, ["--runs-root", runs_root, "--output", tmp_path, "--num-workers", "0",
                                               "--quiet", "--bootstrap", "200"])
    assert result.exit_code == 0, result.stderr
    verdicts = [line.rstrip().rsplit("|", 2)[-2].strip() for line in result.stdout.splitlines()
                if "SupCon test_resnet" in line]
    assert sorted(verdicts) == ["best", "same (p=1, 0:0; F1 diff [+0.00, +0.00])"]
    assert "McNemar's exact test" in result.stdout  # the explanation under the table
    rows = read_csv(tmp_path / "comparison.csv")
    compared = [r for r in rows if r["versus_best_mcnemar_exact_p"]]
    assert len(compared) == 1 and float(compared[0]["versus_best_mcnemar_exact_p"]) == 1.0
    assert compared[0]["versus_best_distinguishable"] == "False"
    assert all(float(r["accuracy_low"]) <= float(r["accuracy"]) <= float(r["accuracy_high"]) for r in rows)


def test_head_files_without_a_final_head_fall_back_to_the_best_head(runs_root, tmp_path, caplog):
    """Head files written before probe-all stored final heads still check, with their best-val head."""
    run = runs_root / "supcon_probed"
    for path in (run / "probe" / "heads").glob("*.pth"):
        state = torch.load(path, weights_only=True)
        del state["final_state_dict"]
        torch.save(state, path)
    check_accuracies(CheckConfig(runs=[str(run)], num_workers=0, output=str(tmp_path), bootstrap=0))
    selection = json.loads((run / "test_metrics.json").read_text())["selection"]
    best = select_best(load_head_records(run / "probe", run))
    assert selection["head"] == "best" and selection["head_epoch"] == best.best_head_epoch
    assert selection["val_accuracy"] == best.best_val_accuracy
    assert "holds no final head" in caplog.text and "probe-all --force" in caplog.text


def test_max_val_acc_rule_reproduces_the_recorded_experiments_choice(runs_root, tmp_path):
    run = runs_root / "supcon_probed"
    check_accuracies(CheckConfig(runs=[str(run)], num_workers=0, output=str(tmp_path), select="max-val-acc"))
    selection = json.loads((run / "test_metrics.json").read_text())["selection"]
    best = select_best(load_head_records(run / "probe", run), "max-val-acc")
    assert (selection["rule"], selection["head"]) == ("max-val-acc", "best")
    assert (selection["checkpoint"], selection["head_epoch"]) == (best.checkpoint, best.best_head_epoch)
    assert "highest val accuracy" in (tmp_path / "comparison.md").read_text()


def test_selection_is_blind_to_test_labels(runs_root, image_root, tmp_path):
    run = runs_root / "supcon_probed"
    flipped = tmp_path / "flipped_test"
    for source, target in [("cat", "dog"), ("dog", "fox"), ("fox", "cat")]:  # every test label changed
        shutil.copytree(image_root / "test" / source, flipped / target)
    reports = []
    for test_folder in (image_root / "test", flipped):
        check_accuracies(CheckConfig(runs=[str(run)], test_folder=str(test_folder), num_workers=0,
                                     output=str(tmp_path)))
        reports.append(json.loads((run / "test_metrics.json").read_text()))
    assert reports[0]["selection"] == reports[1]["selection"]
    assert reports[0]["metrics"]["accuracy"] != reports[1]["metrics"]["accuracy"]
    assert reports[0]["metrics"]["accuracy"] >= 0.9 and reports[1]["metrics"]["accuracy"] <= 0.1


def test_average_option_reaches_the_json(runs_root, tmp_path):
    run = runs_root / "supcon_probed"
    result = invoke(check_accuracies_command, ["--run", run, "--average", "weighted", "--output", tmp_path / "out",
                                               "--num-workers", "0", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "test_metrics.json").read_text())["metrics"]["average"] == "weighted"
    assert (tmp_path / "out" / "comparison.csv").is_file() and (tmp_path / "out" / "comparison.md").is_file()


def test_real_baseline_run_appears_beside_the_supcon_run(runs_root, image_root, tmp_path):
    """With baseline-train installed (issue 4): a tiny real baseline run in the same table."""
    evaluate = pytest.importorskip("supcon.baseline.evaluate")
    baseline_train = pytest.importorskip("supcon.baseline.train")
    baseline_config = pytest.importorskip("supcon.baseline.config")
    assert list(inspect.signature(evaluate.predict_run).parameters)[:4] == [
        "run_dir", "test_folder", "batch_size", "num_workers"]
    baseline = runs_root / "baseline_simple_cnn"
    baseline_train.train(baseline_config.BaselineConfig(
        data_folder=str(image_root / "train"), run_dir=str(baseline), model="simple_cnn", size=32, batch_size=12,
        epochs=2, num_workers=0, augment="none", seed=0), progress=False)
    result = invoke(check_accuracies_command, ["--runs-root", runs_root, "--num-workers", "0", "--quiet"])
    assert result.exit_code == 0, result.stderr
    prediction = evaluate.predict_run(baseline)
    expected = (prediction["probabilities"].argmax(1) == prediction["labels"]).mean()
    report = json.loads((baseline / "test_metrics.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(expected)
    assert f"| 12 / {prediction['selected_epoch']} / - | {100 * expected:.2f}% [" in result.stdout
    assert prediction["network"] in result.stdout and "SupCon test_resnet" in result.stdout


# --- bad input: one line, non-zero exit, nothing written -------------------------------------------------


def assert_refused(args, expected, *folders):
    before = snapshot(*folders)
    result = invoke(check_accuracies_command, [*args, "--num-workers", "0", "--quiet"])
    assert result.exit_code != 0
    message = one_line_error(result)
    assert expected in message, message
    assert snapshot(*folders) == before
    return message


def test_never_probed_run_names_the_command(runs_root, trained_run):
    never = copy_run(trained_run, runs_root / "never")
    message = assert_refused(["--run", runs_root / "supcon_probed", "--run", never], "was never probed", runs_root)
    assert f"probe-all --run {never}" in message
    assert not (runs_root / "supcon_probed" / "test_metrics.json").exists()  # the good run was not written either


def test_no_run_found(tmp_path, trained_run):
    (tmp_path / "runs").mkdir()
    copy_run(trained_run, tmp_path / "runs" / "not_probed")
    assert_refused(["--runs-root", tmp_path / "runs"], "no run found under", tmp_path)


def test_empty_test_folder(runs_root, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(["--runs-root", runs_root, "--test-folder", tmp_path / "empty"], "has no class subfolders",
                   runs_root)


def test_class_names_differ_in_test_folder(runs_root, tmp_path):
    from tests.conftest import write_image_folder

    other = write_image_folder(tmp_path / "other", 2, classes={"cat": (0, 0, 0), "dog": (90, 90, 90)})
    message = assert_refused(["--runs-root", runs_root, "--test-folder", other], "class names differ", runs_root)
    assert "['cat', 'dog', 'fox']" in message


def test_missing_test_folder_asks_for_the_option(runs_root, image_root, tmp_path):
    lonely = shutil.copytree(image_root / "train", tmp_path / "alone" / "train")
    edit_run_config(runs_root / "supcon_probed", lambda data: data["run_info"].update(data_folder=str(lonely)))
    assert_refused(["--runs-root", runs_root], "pass --test-folder DIR", runs_root)


def test_malicious_head_file_is_refused_and_never_runs(runs_root, tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(runs_root / "supcon_probed" / "probe" / "heads" / "ckpt_epoch_4__0000000000000000.pth", marker)
    assert_refused(["--runs-root", runs_root], "needs arbitrary unpickling", runs_root)
    assert not marker.exists()


def test_baseline_run_without_the_baseline_package(runs_root, image_root, monkeypatch):
    write_baseline_run(runs_root / "baseline", image_root / "train")
    monkeypatch.setitem(sys.modules, "supcon.baseline.evaluate", None)  # import fails
    assert_refused(["--runs-root", runs_root], "baseline runs need supcon.baseline.evaluate", runs_root)


def test_negative_bootstrap_is_refused(runs_root):
    assert_refused(["--runs-root", runs_root, "--bootstrap", "-1"], "--bootstrap must be >= 0", runs_root)


def test_unknown_selection_rule_is_refused_in_yaml(runs_root, tmp_path):
    config = tmp_path / "check.yaml"
    config.write_text("check:\n  select: best-test\n")
    assert_refused(["--runs-root", runs_root, "--config", config], "--select must be one of trend, within-noise, "
                   "max-val-acc", runs_root)
