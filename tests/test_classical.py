"""Classical baselines (supcon/baseline/classical*.py): predictions rebuilt from stored tensors equal
scikit-learn's, the ``baseline-train --model svm|logreg|knn`` run directory, check-accuracies on it,
and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from linear_probe.cli import check_accuracies_command
from supcon.baseline.classical import load_classical_checkpoint
from supcon.baseline.classical_features import extract, extractor_from_state
from supcon.baseline.classical_models import (
    SVM_C_GRID,
    SVM_GAMMA_FACTORS,
    classifier_probabilities,
    fit_and_select,
    knn_probabilities,
    svm_scores,
)
from supcon.data import scan_image_folder
from tests.conftest import CLASS_COLOURS, write_image_folder
from tests.test_baseline_cli import assert_one_line_error, invoke, read_csv, snapshot

FAST = ["--num-workers", "0", "--quiet"]


def blobs(num_classes: int, per_class: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(0, 1.2, (num_classes, dim))
    x = np.concatenate([rng.normal(c, 1.0, (per_class, dim)) for c in centres])
    return x, np.repeat(np.arange(num_classes), per_class)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_svm_scores_from_tensors_equal_scikit_learn(num_classes):
    x, y = blobs(num_classes, 30, 6, seed=0)
    test_x, _ = blobs(num_classes, 20, 6, seed=1)
    svm = SVC(C=3.0, gamma=0.2).fit(x, y)
    params = {"support_vectors": torch.from_numpy(svm.support_vectors_), "dual_coef": torch.from_numpy(svm.dual_coef_),
              "intercept": torch.from_numpy(svm.intercept_), "n_support": torch.from_numpy(svm.n_support_),
              "gamma": 0.2}
    ours = svm_scores(torch.from_numpy(test_x), params).numpy()
    theirs = svm.decision_function(test_x)
    if num_classes == 2:
        np.testing.assert_allclose(ours[:, 1] - ours[:, 0], theirs, rtol=1e-9, atol=1e-9)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    assert (ours.argmax(1) == svm.predict(test_x)).mean() > 0.95  # predict breaks vote ties by class order


def test_knn_probabilities_equal_scikit_learn():
    x, y = blobs(4, 25, 5, seed=0)
    test_x, _ = blobs(4, 15, 5, seed=1)
    knn = KNeighborsClassifier(n_neighbors=7).fit(x, y)
    params = {"train_features": torch.from_numpy(x), "train_labels": torch.from_numpy(y), "k": 7, "num_classes": 4}
    np.testing.assert_allclose(knn_probabilities(torch.from_numpy(test_x), params).numpy(), knn.predict_proba(test_x))


def test_grid_choice_is_the_first_best_on_val_and_fit_on_train_only():
    x, y = blobs(3, 30, 6, seed=0)
    val_x, val_y = blobs(3, 20, 6, seed=1)
    selection = fit_and_select("svm", torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(val_x),
                               torch.from_numpy(val_y), 3, standardize=True)
    assert len(selection.grid) == len(SVM_C_GRID) * len(SVM_GAMMA_FACTORS)
    accuracies = [row["val_accuracy"] for row in selection.grid]
    first_best = selection.grid[accuracies.index(max(accuracies))]
    assert selection.hyperparameters == {"C": first_best["C"], "gamma": first_best["gamma"]}
    # The stored SVM is scikit-learn's fit on the standardised training features alone.
    mean, std = x.mean(0), x.std(0)
    reference = SVC(C=first_best["C"], gamma=first_best["gamma"]).fit((x - mean) / std, y)
    probabilities = classifier_probabilities(torch.from_numpy(val_x), selection.params).numpy()
    np.testing.assert_array_equal(probabilities.argmax(1), reference.decision_function((val_x - mean) / std).argmax(1))
    assert selection.val_accuracy == pytest.approx((probabilities.argmax(1) == val_y).mean())


# ------------------------------------------------------------------------------------- baseline-train runs


@pytest.fixture(scope="module")
def svm_run(image_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("classical") / "svm"
    result = invoke(["--model", "svm", "--size", "8", "--data-folder", image_root / "train", "--run-dir", run_dir,
                     *FAST])
    assert result.exit_code == 0, result.output
    assert "RBF SVM on 8 px pixels" in result.output
    return run_dir


def test_svm_run_directory_holds_what_it_promised(svm_run, image_root):
    config = yaml.safe_load((svm_run / "config.yaml").read_text())
    info = config["run_info"]
    assert info["kind"] == "baseline" and info["model_config"]["family"] == "classical"
    assert info["val_folder"] == str((image_root / "val").resolve())
    assert info["test_folder"] == str((image_root / "test").resolve())
    assert info["feature_dim"] == 3 * 8 * 8 and info["num_train_images"] == 36
    grid = read_csv(svm_run / "val_grid.csv")
    assert len(grid) == len(SVM_C_GRID) * len(SVM_GAMMA_FACTORS)
    assert max(float(r["val_accuracy"]) for r in grid) == pytest.approx(info["val_accuracy"])
    state = torch.load(svm_run / "best.pth", weights_only=True)  # tensors, numbers, strings only
    assert state["hyperparameters"] == info["hyperparameters"]
    assert state["classifier"]["support_vectors"].shape[1] == 192


def test_check_accuracies_scores_the_stored_svm_on_test(svm_run, image_root, tmp_path):
    result = CliRunner().invoke(check_accuracies_command, ["--run", str(svm_run), "--output", str(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    assert "| - / - / - |" in result.output and "RBF SVM on 8 px pixels (baseline, C " in result.output
    report = json.loads((svm_run / "test_metrics.json").read_text())

    # Independently: scikit-learn's SVC fit on the training pixels with the recorded C and gamma.
    state = load_classical_checkpoint(svm_run / "best.pth")
    extractor = extractor_from_state(state, svm_run / "best.pth")
    device = torch.device("cpu")
    train_x, train_y = extract(extractor, scan_image_folder(image_root / "train").samples, device, 64, 0, False, "")
    test_x, test_y = extract(extractor, scan_image_folder(image_root / "test").samples, device, 64, 0, False, "")
    hyper = state["hyperparameters"]
    svm = SVC(C=hyper["C"], gamma=hyper["gamma"]).fit(train_x.numpy(), train_y.numpy())
    expected = (svm.decision_function(test_x.numpy()).argmax(1) == test_y.numpy()).mean()
    assert report["metrics"]["accuracy"] == pytest.approx(expected)
    assert report["selection"]["rule"] == "hyper-parameters chosen on validation by baseline-train"


def test_resume_of_a_finished_run_does_nothing(svm_run, image_root):
    before = snapshot(svm_run)
    result = invoke(["--model", "svm", "--size", "8", "--data-folder", image_root / "train", "--run-dir", svm_run,
                     "--resume", *FAST])
    assert result.exit_code == 0, result.output
    assert snapshot(svm_run) == before


def test_existing_run_dir_is_refused_and_untouched(svm_run, image_root):
    before = snapshot(svm_run)
    result = invoke(["--model", "knn", "--size", "8", "--data-folder", image_root / "train", "--run-dir", svm_run,
                     *FAST])
    assert_one_line_error(result, "already exists")
    result = invoke(["--model", "knn", "--size", "8", "--data-folder", image_root / "train", "--run-dir", svm_run,
                     "--resume", *FAST])
    assert_one_line_error(result, "different configuration", "model")
    assert snapshot(svm_run) == before


@pytest.fixture(scope="module")
def binary_root(tmp_path_factory) -> Path:
    """Two classes, no val folder (the run holds out --val-split), a test folder."""
    root = tmp_path_factory.mktemp("binary")
    classes = {k: CLASS_COLOURS[k] for k in ("cat", "dog")}
    write_image_folder(root / "train", 15, classes=classes, seed=4)
    write_image_folder(root / "test", 6, classes=classes, seed=5)
    return root


def test_knn_without_val_folder_holds_out_a_split_and_gets_a_roc(binary_root, tmp_path):
    run_dir = tmp_path / "knn"
    result = invoke(["--model", "knn", "--size", "8", "--data-folder", binary_root / "train", "--run-dir", run_dir,
                     *FAST])
    assert result.exit_code == 0, result.output
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["val_split"]["num_val"] == 6 and info["num_train_images"] == 24
    assert set(info["hyperparameters"]) == {"k"}
    result = CliRunner().invoke(check_accuracies_command, ["--run", str(run_dir), "--output", str(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    assert (run_dir / "roc_curve.png").is_file()
    assert json.loads((run_dir / "test_metrics.json").read_text())["metrics"]["roc_auc"] is not None


def test_logreg_on_a_supcon_runs_encoder(trained_run, image_root, tmp_path):
    run_dir = tmp_path / "logreg"
    result = invoke(["--model", "logreg", "--features", f"run:{trained_run}", "--data-folder", image_root / "train",
                     "--run-dir", run_dir, *FAST])
    assert result.exit_code == 0, result.output
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["features_source"]["checkpoint"] == str((trained_run / "ckpt_epoch_4.pth").resolve())  # not probed
    assert info["size"] == 32 and info["model_config"]["encoder_config"]["model"] == "test_resnet"
    state = torch.load(run_dir / "best.pth", weights_only=True)
    own = torch.load(trained_run / "ckpt_epoch_4.pth", weights_only=True)["encoder"]
    assert all(torch.equal(state["features"]["encoder"][k], v) for k, v in own.items())
    result = CliRunner().invoke(check_accuracies_command, ["--run", str(run_dir), "--output", str(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    assert "logistic regression on SupCon test_resnet epoch 4 features (baseline, C " in result.output


def test_knn_on_a_timm_backbone_from_a_local_weights_file(image_root, tmp_path):
    import timm

    weights = tmp_path / "weights.pth"
    torch.manual_seed(3)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    run_dir = tmp_path / "knn_timm"
    result = invoke(["--model", "knn", "--features", "timm:test_resnet", "--pretrained-file", weights, "--size", "32",
                     "--data-folder", image_root / "train", "--run-dir", run_dir, *FAST])
    assert result.exit_code == 0, result.output
    state = torch.load(run_dir / "best.pth", weights_only=True)
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(state["features"]["encoder"][k], v) for k, v in saved.items())
    assert state["classifier"]["scaler_mean"] is not None  # network features are standardised
    result = CliRunner().invoke(check_accuracies_command, ["--run", str(run_dir), "--output", str(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    assert "kNN on test_resnet features (pretrained) (baseline, k " in result.output


@pytest.mark.parametrize("args, fragments", [
    (["--model", "svm", "--features", "pixel"], ["--features must be 'pixels'"]),
    (["--model", "svm", "--features", "timm:"], ["--features must be"]),
    (["--model", "svm"], ["--size 224", "small --size"]),
    (["--model", "resnet18", "--features", "timm:resnet18"], ["--features applies to the classical models"]),
    (["--model", "svm", "--size", "8", "--seeds", "3"], ["deterministic", "--seeds"]),
    (["--model", "knn", "--features", "timm:not_a_model_xyz", "--size", "32"], ["not_a_model_xyz"]),
    (["--model", "knn", "--features", "timm:test_resnet", "--pretrained-file", "/nope.pth"],
     ["--pretrained-file not found"]),
    (["--model", "logreg", "--features", "run:/no/such/run"], ["run:/no/such/run"]),
])
def test_bad_input_is_one_line_and_writes_nothing(args, fragments, image_root, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke([*args, "--data-folder", image_root / "train", "--run-dir", run_dir, *FAST])
    assert_one_line_error(result, *fragments)
    assert not run_dir.exists()


def test_logreg_on_a_probed_run_uses_the_checkpoint_probe_all_selected(trained_run, image_root, tmp_path,
                                                                        tmp_path_factory):
    from supcon.checkpoint import file_sha256
    from tests.probe_helpers import copy_run, probed_run

    run = copy_run(probed_run(trained_run, tmp_path_factory), tmp_path / "probed")
    args = ["--model", "logreg", "--features", f"run:{run}", "--data-folder", image_root / "train", *FAST]
    record = run / "probe" / "selection.json"
    selected = json.loads(record.read_text())["checkpoint"]
    result = invoke([*args, "--run-dir", tmp_path / "checked"])
    assert result.exit_code == 0, result.output
    info = yaml.safe_load((tmp_path / "checked" / "config.yaml").read_text())["run_info"]
    assert info["features_source"]["checkpoint"] == str((run / selected).resolve())

    # the recorded choice is what counts, not the newest checkpoint: name the other one
    data = json.loads(record.read_text())
    other = "ckpt_epoch_2.pth" if selected != "ckpt_epoch_2.pth" else "ckpt_epoch_4.pth"
    data.update(checkpoint=other, checkpoint_sha256=file_sha256(run / other))
    record.write_text(json.dumps(data))
    result = invoke([*args, "--run-dir", tmp_path / "other"])
    assert result.exit_code == 0, result.output
    info = yaml.safe_load((tmp_path / "other" / "config.yaml").read_text())["run_info"]
    assert info["features_source"]["checkpoint"] == str((run / other).resolve())

    # the selected checkpoint changed since probe-all chose it: refused, naming what to run
    data.update(checkpoint_sha256="0" * 64)
    record.write_text(json.dumps(data))
    assert_one_line_error(invoke([*args, "--run-dir", tmp_path / "stale"]), "has changed since", "probe-all --run")
    assert not (tmp_path / "stale").exists()
    # probed heads but no selection recorded (a run probed before probe-all wrote one): refused
    record.unlink()
    assert_one_line_error(invoke([*args, "--run-dir", tmp_path / "early"]), "never probed", "ckpt_epoch_N")
