"""predict: same predictions as check-accuracies on the test folder, CSV columns, threshold, bad files."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from linear_probe.check import check_accuracies
from linear_probe.config import CheckConfig
from linear_probe.use_cli import predict_command
from supcon.baseline.evaluate import predict_run
from tests.probe_helpers import copy_run, invoke, one_line_error, probed_run
from tests.use_helpers import binary_baseline_run, binary_image_root


@pytest.fixture(scope="module")
def checked_run(trained_run, tmp_path_factory):
    """A probed run on which check-accuracies wrote test_metrics.json."""
    run = copy_run(probed_run(trained_run, tmp_path_factory), tmp_path_factory.mktemp("checked") / "run")
    check_accuracies(CheckConfig(runs=[str(run)], num_workers=0, output=str(run.parent), device="cpu"))
    return run


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_on_the_test_folder_equal_check_accuracies(checked_run, image_root, tmp_path):
    out = tmp_path / "predictions.csv"
    result = invoke(predict_command, ["--run", checked_run, image_root / "test", "--out", out, "--quiet",
                                      "--device", "cpu", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert len(rows) == 18
    assert list(rows[0]) == ["path", "predicted_class", "probability_cat", "probability_dog", "probability_fox"]
    classes = ["cat", "dog", "fox"]
    truth = [classes.index(r["path"].split("/")[-2]) for r in rows]  # folders are the classes
    predicted = [classes.index(r["predicted_class"]) for r in rows]
    matrix = np.zeros((3, 3), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        matrix[t, p] += 1
    metrics = json.loads((checked_run / "test_metrics.json").read_text())["metrics"]
    assert matrix.tolist() == metrics["confusion_matrix"]
    assert np.mean(np.array(truth) == np.array(predicted)) == pytest.approx(metrics["accuracy"])
    probabilities = np.array([[float(r[f"probability_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_binary_baseline_threshold_and_positive_probability(tmp_path_factory, tmp_path):
    run = binary_baseline_run(tmp_path_factory)
    test_folder = binary_image_root(tmp_path_factory) / "test"
    expected = predict_run(run, num_workers=0)  # what check-accuracies evaluates for a baseline
    out = tmp_path / "p.csv"
    result = invoke(predict_command, ["--run", run, test_folder, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert [r["path"] for r in rows] == expected["paths"]
    positive = np.array([float(r["positive_probability"]) for r in rows])
    # both on the same device; on a GPU, convolutions may run in TF32
    assert np.allclose(positive, expected["probabilities"][:, 1], atol=1e-3 if torch.cuda.is_available() else 1e-5)
    assert np.allclose(positive, [float(r["probability_malignant"]) for r in rows])
    assert [r["predicted_class"] for r in rows] == [["benign", "malignant"][int(p >= 0.5)] for p in positive]

    # a threshold between two of the probabilities moves exactly the images above it
    cut = float(np.median(positive))
    result = invoke(predict_command, ["--run", run, test_folder, "--out", out, "--quiet", "--threshold", cut])
    assert result.exit_code == 0
    rows = read_rows(out)
    assert [r["predicted_class"] for r in rows] == [["benign", "malignant"][int(p >= cut)] for p in positive]
    assert {r["threshold"] for r in rows} == {str(cut)}


def test_files_and_nested_folders_unreadable_files_skipped(checked_run, image_root, tmp_path):
    inputs = tmp_path / "new"
    shutil.copytree(image_root / "val" / "cat", inputs / "a" / "b")
    (inputs / "a" / "broken.png").write_bytes(b"not a png")
    (inputs / "notes.txt").write_text("not an image")
    single = image_root / "test" / "dog" / "dog_000.png"
    out = tmp_path / "p.csv"
    result = invoke(predict_command, ["--run", checked_run, inputs, single, "--out", out, "--quiet"])
    assert result.exit_code == 3  # some files were skipped
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    rows = read_rows(out)
    assert len(rows) == 7 and rows[-1]["path"] == str(single)
    assert not any("broken" in r["path"] for r in rows)


def test_bad_inputs_one_line_errors(checked_run, trained_run, tmp_path):
    out = tmp_path / "p.csv"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(predict_command, ["--run", checked_run, empty, "--out", out])
    assert result.exit_code == 2 and "no image files" in one_line_error(result)
    result = invoke(predict_command, ["--run", tmp_path / "nowhere", empty, "--out", out])
    assert result.exit_code == 2 and "run directory not found" in one_line_error(result)
    never = copy_run(trained_run, tmp_path / "never")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.png").write_bytes(b"junk")
    result = invoke(predict_command, ["--run", never, tmp_path / "one", "--out", out])
    assert result.exit_code == 2 and "never probed" in one_line_error(result)
    result = invoke(predict_command, ["--run", checked_run, tmp_path / "one", "--out", out, "--checkpoint", "3"])
    assert result.exit_code == 2 and "no checkpoint of backbone epoch 3" in one_line_error(result)
    result = invoke(predict_command, ["--run", checked_run, tmp_path / "one", "--out", out, "--quiet"])
    assert result.exit_code == 2 and "none of the 1 image files could be read" in one_line_error(result)
    result = invoke(predict_command, ["--run", checked_run, tmp_path / "missing.png", "--out", out])
    assert result.exit_code == 2 and "no such file or folder" in one_line_error(result)
    assert not out.exists()
