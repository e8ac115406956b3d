"""baseline-train through click's CliRunner: every promised file, refusals, and each bad input.

Also holds the helpers the other ``test_baseline_*`` files import.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from supcon.baseline.cli import main
from supcon.baseline.models import build_classifier
from tests.conftest import write_image_folder

#: Seconds per run: the simple CNN at 32 px, no augmentation, 1 CPU worker.
TINY_ARGS = ["--model", "simple_cnn", "--size", "32", "--batch-size", "8", "--num-workers", "0", "--augment", "none",
             "--quiet"]


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and modification time (not the run lock: every start takes
    and releases it)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_one_line_error(result, *fragments: str) -> str:
    """A clean failure: non-zero exit through sys.exit, one 'Error: ...' line naming the problem.

    Timestamped log lines of the work done before the problem showed (e.g. the computed mean/std) may precede it.
    """
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d ", line)]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def solo_root(tmp_path_factory) -> Path:
    """``root/{train,test}``: no val folder, so the run holds out a stratified --val-split."""
    root = tmp_path_factory.mktemp("solo")
    write_image_folder(root / "train", 10, seed=4)
    write_image_folder(root / "test", 4, seed=5)
    return root


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, solo_root):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(["--data-folder", solo_root / "train", "--run-dir", run_dir, *TINY_ARGS, "--epochs", "2",
                     "--head", "mlp-dropout", "--optimizer", "sgd", "--learning-rate", "0.05", "--scheduler", "step",
                     "--lr-step-epochs", "1", "--lr-gamma", "0.5"])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


# --- the promised files -----------------------------------------------------------------------------------------


def test_run_writes_every_promised_file(cli_run):
    run_dir, output = cli_run
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "best.pth", "config.yaml", "last.pth",
                                                         "metrics.csv", "tensorboard", "train_images.txt"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert f"run directory: {run_dir}" in output


def test_config_yaml_records_what_check_accuracies_needs(cli_run, solo_root):
    run_dir, _ = cli_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["optimizer"], config["learning_rate"], config["head"], config["head_hidden"]) == (
        "sgd", 0.05, "mlp-dropout", 256)
    info = config["run_info"]
    assert info["kind"] == "baseline"
    assert info["class_names"] == ["cat", "dog", "fox"] and info["num_classes"] == 3
    assert info["data_folder"] == str((solo_root / "train").resolve())
    assert info["val_folder"] is None
    assert info["val_split"] == {"fraction": 0.2, "seed": 0, "num_train": 24, "num_val": 6}  # 2 of 10 per class
    assert info["test_folder"] == str((solo_root / "test").resolve())
    assert len(info["mean"]) == 3 and len(info["std"]) == 3 and info["size"] == 32
    assert info["model_config"]["model"] == "simple_cnn"
    assert info["description"] == "simple_cnn (baseline, mlp-dropout head)"


def test_best_checkpoint_is_weights_only_and_rebuilds_the_network(cli_run):
    run_dir, _ = cli_run
    rows = read_csv(run_dir / "metrics.csv")
    best_row = min(rows, key=lambda r: (float(r["val_loss"]), int(r["epoch"])))
    state = torch.load(run_dir / "best.pth", weights_only=True)
    assert state["best_epoch"] == int(best_row["epoch"])
    assert state["val_accuracy"] == pytest.approx(float(best_row["val_accuracy"]))
    assert state["class_names"] == ["cat", "dog", "fox"] and state["size"] == 32
    assert len(state["mean"]) == 3 and len(state["std"]) == 3
    net = build_classifier(state["model_config"])
    net.backbone.load_state_dict(state["encoder"])  # strict: every tensor present, no extras
    net.head.load_state_dict(state["head"])
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "early_stopping"} <= last.keys() and last["epoch"] == 2


def test_metrics_csv_and_tensorboard_have_one_entry_per_epoch(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = cli_run
    rows = read_csv(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["lr"]) for r in rows] == [0.05, 0.025]  # step decay by 0.5 every epoch
    for row in rows:
        assert 0 <= float(row["val_accuracy"]) <= 1 and 0 <= float(row["val_auc"]) <= 1
        assert float(row["train_loss"]) > 0 and float(row["val_f1"]) >= 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/auc", "val/f1", "lr"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag


def test_refuses_to_start_over_a_run_without_resume(cli_run, solo_root):
    run_dir, _ = cli_run
    before = snapshot(run_dir)
    result = invoke(["--data-folder", solo_root / "train", "--run-dir", run_dir, *TINY_ARGS, "--epochs", "2"])
    assert_one_line_error(result, "already exists", "--resume")
    assert snapshot(run_dir) == before


def test_a_run_recorded_before_sampler_and_class_weights_resumes_with_their_defaults(cli_run, solo_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[0], run_dir)
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (recorded["sampler"], recorded["class_weights"]) == ("random", "none")
    assert recorded["run_info"]["class_weights"] is None
    del recorded["sampler"], recorded["class_weights"]  # as an older version wrote it
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    args = ["--data-folder", solo_root / "train", "--run-dir", run_dir, "--resume", *TINY_ARGS, "--epochs", "2",
            "--head", "mlp-dropout", "--optimizer", "sgd", "--learning-rate", "0.05", "--scheduler", "step",
            "--lr-step-epochs", "1", "--lr-gamma", "0.5"]
    before = snapshot(run_dir)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "is finished" in result.output and "different configuration" not in result.output
    for option, value, fragment in (("--sampler", "balanced", "sampler: run has 'random', now 'balanced'"),
                                    ("--class-weights", "balanced", "class_weights: run has 'none', now 'balanced'")):
        assert_one_line_error(invoke([*args, option, value]), "different configuration", fragment)
    assert snapshot(run_dir) == before


def test_refuses_to_resume_with_a_different_configuration(cli_run, solo_root):
    run_dir, _ = cli_run
    before = snapshot(run_dir)
    result = invoke(["--data-folder", solo_root / "train", "--run-dir", run_dir, "--resume", *TINY_ARGS,
                     "--epochs", "2", "--head", "mlp-dropout", "--optimizer", "sgd", "--learning-rate", "0.5",
                     "--scheduler", "step", "--lr-step-epochs", "1", "--lr-gamma", "0.5"])
    assert_one_line_error(result, "different configuration", "learning_rate")
    assert snapshot(run_dir) == before


# --- bad input: one line, non-zero exit, nothing written ---------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run dir would appear under ./runs
    return tmp_path


def fails_cleanly(workdir: Path, args, *fragments: str, bad_list: bool = False) -> str:
    """The one-line error; nothing written (but the list of unreadable images, where there are some)."""
    run_dir = workdir / "run"
    line = assert_one_line_error(invoke([*TINY_ARGS, "--epochs", "1", "--run-dir", run_dir, *args]), *fragments)
    assert not (workdir / "runs").exists()
    if bad_list:
        assert [p.name for p in run_dir.iterdir()] == ["bad_images.txt"]
    else:
        assert not run_dir.exists()
    return line


def test_data_folder_missing(workdir):
    fails_cleanly(workdir, ["--data-folder", workdir / "nope"], "data folder not found", "nope")


def test_data_folder_empty(workdir):
    (workdir / "empty").mkdir()
    fails_cleanly(workdir, ["--data-folder", workdir / "empty"], "has no class subfolders")


def test_fewer_than_two_classes(workdir):
    write_image_folder(workdir / "one", 3, classes={"cat": (200, 0, 0)})
    fails_cleanly(workdir, ["--data-folder", workdir / "one"], "1 class folder", "at least 2")


def test_class_folder_without_images(workdir):
    write_image_folder(workdir / "data", 3)
    (workdir / "data" / "emu").mkdir()
    fails_cleanly(workdir, ["--data-folder", workdir / "data"], "emu", "has no images")


def test_corrupt_image_is_named(workdir):
    write_image_folder(workdir / "data", 4)
    (workdir / "data" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fails_cleanly(workdir, ["--data-folder", workdir / "data", "--val-split", "0.5"], "broken.png", "unreadable",
                  bad_list=True)
    listed = (workdir / "run" / "bad_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(workdir / "data" / "dog" / "broken.png")]


def test_val_folder_with_other_classes(workdir, image_root):
    write_image_folder(workdir / "val", 2, classes={"cat": (200, 0, 0), "emu": (0, 0, 200)})
    fails_cleanly(workdir, ["--data-folder", image_root / "train", "--val-folder", workdir / "val"],
                  "class names differ")


def test_single_image_class_cannot_be_split(workdir):
    write_image_folder(workdir / "data", 3)
    for extra in sorted((workdir / "data" / "fox").iterdir())[1:]:
        extra.unlink()
    fails_cleanly(workdir, ["--data-folder", workdir / "data"], "'fox' has a single image", "--val-folder")


def test_balanced_sampler_refuses_a_class_of_one_training_image_naming_it(workdir, image_root):
    write_image_folder(workdir / "data", 6)
    for extra in sorted((workdir / "data" / "fox").iterdir())[1:]:
        extra.unlink()
    before = snapshot(workdir)
    fails_cleanly(workdir, ["--data-folder", workdir / "data", "--val-folder", image_root / "val", "--sampler",
                            "balanced"], "class 'fox' of the training part has 1 image", "use --sampler random")
    assert snapshot(workdir) == before


@pytest.mark.parametrize("args, fragments", [
    (["--mean", "0.5,0.5"], ["--mean must have exactly 3 values"]),
    (["--std", "0.2,0,0.2"], ["--std values must be positive"]),
    (["--mean", "0.5,0.5,0.5"], ["give both --mean and --std"]),
    (["--model", "resnet_18"], ["unknown model 'resnet_18'"]),
    (["--learning-rate", "fast"], ["--learning-rate must be one or more comma-separated float values"]),
    (["--learning-rate", "-0.1"], ["--learning-rate must be positive"]),
    (["--optimizer", "rmsprop"], ["--optimizer must be one of sgd, adam, adamw"]),
    (["--head", "deep"], ["Invalid value for '--head'"]),
    (["--epochs", "x"], ["Invalid value for '--epochs'"]),
    (["--betas", "0.9"], ["--betas must be two numbers"]),
    (["--seeds", "three"], ["--seeds must be a count"]),
    (["--val-split", "1.5"], ["--val-split must be a fraction"]),
    (["--batch-size", "1"], ["--batch-size must be at least 2"]),
    (["--batch-size", "64"], ["fewer than one batch of 64"]),
    (["--loss", "bce"], ["--loss bce (one logit) needs exactly 2 classes"]),
    (["--freeze", "9"], ["--freeze 9", "has 3 blocks"]),
    (["--small-input"], ["--small-input applies to timm models only"]),
    (["--pretrained-file", "missing.pth"], ["--pretrained-file not found: missing.pth"]),
    (["--pretrained", "--pretrained-file", "w.pth"], ["not both"]),
    (["--test-folder", "nowhere"], ["test folder not found"]),
    (["--sampler", "per-class:4"], ["Invalid value for '--sampler': 'per-class:4' is not one of"]),
    (["--class-weights", "inverse"], ["Invalid value for '--class-weights': 'inverse' is not one of"]),
    (["--model", "svm", "--class-weights", "balanced"], ["--class-weights balanced applies to the networks",
                                                         "--model svm is a classical classifier"]),
    (["--model", "knn", "--sampler", "balanced"], ["--sampler balanced applies to the networks"]),
])
def test_bad_options(workdir, image_root, args, fragments):
    fails_cleanly(workdir, ["--data-folder", image_root / "train", *args], *fragments)


@pytest.mark.parametrize("content, fragment", [
    ("learning_rate: [0.1\n", "is not valid YAML"),
    ("lerning_rate: 0.1\n", "unknown option 'lerning_rate'"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("sampler: per-class:4\n", "--sampler must be one of random, balanced, got 'per-class:4'"),
    ("class_weights: inverse\n", "--class-weights must be one of none, balanced, got 'inverse'"),
])
def test_bad_config_file(workdir, image_root, content, fragment):
    (workdir / "bad.yaml").write_text(content)
    fails_cleanly(workdir, ["--data-folder", image_root / "train", "--config", workdir / "bad.yaml"], fragment)


def test_config_file_supplies_options_and_the_command_line_wins(workdir, image_root):
    (workdir / "c.yaml").write_text("baseline:\n  optimizer: sgd\n  learning_rate: 0.02\n  epochs: 7\n")
    result = invoke([*TINY_ARGS, "--data-folder", image_root / "train", "--run-dir", workdir / "run", "--config",
                     workdir / "c.yaml", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((workdir / "run" / "config.yaml").read_text())
    assert (config["optimizer"], config["learning_rate"], config["epochs"]) == ("sgd", 0.02, 1)
