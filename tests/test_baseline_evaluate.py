"""predict_run: the contract with check-accuracies, on a tiny trained baseline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from supcon.baseline.config import BaselineConfig
from supcon.baseline.evaluate import predict_run
from supcon.baseline.models import build_classifier
from supcon.baseline.train import train
from supcon.data import eval_transform, load_rgb
from supcon.errors import UserError
from supcon.rundir import RunKind, run_kind
from tests.conftest import write_image_folder
from tests.test_baseline_cli import read_csv


def tiny(data_folder, run_dir, **overrides) -> BaselineConfig:
    values = dict(data_folder=str(data_folder), run_dir=str(run_dir), model="simple_cnn", size=32, batch_size=12,
                  epochs=2, num_workers=0, augment="none", seed=0)
    return BaselineConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_root):
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    train(tiny(image_root / "train", run_dir), progress=False)
    return run_dir


def test_predict_run_on_a_tiny_trained_baseline(tiny_run, image_root):
    prediction = predict_run(tiny_run)
    probabilities, labels = prediction["probabilities"], prediction["labels"]
    assert probabilities.shape == (18, 3) and labels.shape == (18,)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # the test folder, in its sorted order
    assert prediction["class_names"] == ["cat", "dog", "fox"]
    assert prediction["network"] == "simple_cnn (baseline, mlp head)"
    assert prediction["batch_size"] == 12
    assert prediction["test_folder"] == str((image_root / "test").resolve())
    rows = read_csv(tiny_run / "metrics.csv")
    best_row = min(rows, key=lambda r: (float(r["val_loss"]), int(r["epoch"])))  # best by val, earliest on ties
    assert prediction["selected_epoch"] == int(best_row["epoch"])
    assert prediction["val_accuracy"] == pytest.approx(float(best_row["val_accuracy"]))
    assert (probabilities.argmax(1) == labels).mean() > 0.5  # an easily separable toy set, 3 classes

    # The probabilities are those of best.pth's network on the eval transform.
    state = torch.load(tiny_run / "best.pth", weights_only=True)
    net = build_classifier(state["model_config"])
    net.backbone.load_state_dict(state["encoder"])
    net.head.load_state_dict(state["head"])
    net.eval()
    image = eval_transform(32, state["mean"], state["std"])(load_rgb(prediction["paths"][7]))
    with torch.no_grad():
        expected = torch.softmax(net(image[None])["logits"], 1)[0].numpy()
    assert np.allclose(probabilities[7], expected, atol=1e-5)
    assert run_kind(tiny_run) is RunKind.BASELINE


def test_predict_run_reads_best_not_last(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    last = torch.load(copy / "last.pth", weights_only=True)
    last["head"] = {k: torch.zeros_like(v) for k, v in last["head"].items()}  # a last state unlike best
    torch.save(last, copy / "last.pth")
    assert np.array_equal(predict_run(copy)["probabilities"], predict_run(tiny_run)["probabilities"])


def test_predict_run_on_a_given_test_folder_and_the_errors(tiny_run, tmp_path):
    write_image_folder(tmp_path / "other", 2, seed=9)
    assert predict_run(tiny_run, test_folder=tmp_path / "other", batch_size=4)["probabilities"].shape == (6, 3)

    write_image_folder(tmp_path / "emus", 2, classes={"cat": (200, 0, 0), "emu": (0, 0, 200)})
    with pytest.raises(UserError, match="class names differ"):
        predict_run(tiny_run, test_folder=tmp_path / "emus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no class subfolders"):
        predict_run(tiny_run, test_folder=tmp_path / "empty")

    moved = tmp_path / "moved"  # a run whose data folder has no sibling test and that recorded none
    shutil.copytree(tiny_run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["run_info"].update(test_folder=None, data_folder=str(tmp_path / "gone" / "train"))
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="no test folder"):
        predict_run(moved)
    (moved / "best.pth").unlink()
    with pytest.raises(UserError, match="has no best.pth"):
        predict_run(moved, test_folder=tmp_path / "other")
    config["run_info"]["kind"] = "supcon"
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="not a baseline run"):
        predict_run(moved)
    assert run_kind(moved) is RunKind.SUPCON


def test_single_logit_bce_gives_two_probability_columns(tmp_path):
    classes = {"cat": (210, 40, 40), "dog": (40, 40, 210)}
    write_image_folder(tmp_path / "data" / "train", 12, classes=classes, seed=1)
    write_image_folder(tmp_path / "data" / "val", 4, classes=classes, seed=2)
    write_image_folder(tmp_path / "data" / "test", 5, classes=classes, seed=3)
    run_dir = tmp_path / "run"
    train(tiny(tmp_path / "data" / "train", run_dir, loss="bce", epochs=1), progress=False)
    state = torch.load(run_dir / "best.pth", weights_only=True)
    assert state["model_config"]["num_outputs"] == 1
    prediction = predict_run(run_dir)
    assert prediction["probabilities"].shape == (10, 2)
    assert np.allclose(prediction["probabilities"].sum(1), 1, atol=1e-6)


def test_a_baseline_run_appears_in_check_accuracies_table(tiny_run, tmp_path):
    from click.testing import CliRunner

    from linear_probe.cli import check_accuracies_main

    result = CliRunner().invoke(check_accuracies_main, ["--run", str(tiny_run), "--output", str(tmp_path),
                                                        "--num-workers", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    prediction = predict_run(tiny_run)
    accuracy = (prediction["probabilities"].argmax(1) == prediction["labels"]).mean()
    rows = read_csv(tmp_path / "comparison.csv")
    assert len(rows) == 1 and "simple_cnn (baseline, mlp head)" in rows[0].values()
    table = (tmp_path / "comparison.md").read_text()
    assert f"| 12 / {prediction['selected_epoch']} / - | {100 * accuracy:.2f}% [" in table  # with its interval
