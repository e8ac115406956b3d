"""A dataset root given where one split was meant is refused by every command (the test set would leak)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from linear_probe.cli import check_accuracies_command, probe_all_command
from supcon.baseline.cli import main as baseline_command
from supcon.cli import train_command
from supcon.data import scan_image_folder
from supcon.errors import UserError
from tests.conftest import write_image_folder
from tests.probe_helpers import copy_run, invoke, one_line_error, probed_run, snapshot

TINY = ["--model", "test_resnet", "--small-input", "--size", "8", "--batch-size", "4", "--num-workers", "0",
        "--knn-every", "0", "--quiet", "--epochs", "1"]


def dataset_root(root: Path, splits=("train", "val", "test")) -> Path:
    """``root/{train,val,test}/{cat,dog}``: a dataset root, not an image folder."""
    for seed, split in enumerate(splits):
        write_image_folder(root / split, 4, classes={"cat": (200, 0, 0), "dog": (0, 0, 200)}, size=12, seed=seed)
    return root


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("names,what,meant", [
    (("train", "val", "test"), "data folder", "train"),
    (("Train", "VALID", "Test"), "data folder", "Train"),
    (("training", "validation", "testing"), "val folder", "validation"),
    (("train", "val", "test"), "test folder", "test"),
    (("train", "test"), "val folder", None),
])
def test_scan_refuses_split_named_class_folders_and_names_the_folder_meant(tmp_path, names, what, meant):
    root = dataset_root(tmp_path / "data", names)
    with pytest.raises(UserError) as error:
        scan_image_folder(root, what)
    message = str(error.value)
    assert f"{what} {root} looks like a dataset root" in message
    assert "--allow-split-class-names" in message
    if meant:
        assert f"at {root / meant}," in message
    else:
        assert "at one split, not the dataset root" in message


def test_scan_allows_split_names_when_asked_and_leaves_other_names_alone(tmp_path):
    root = dataset_root(tmp_path / "data")
    assert scan_image_folder(root, allow_split_names=True).classes == ["test", "train", "val"]
    # names that merely contain a split word are class names
    other = write_image_folder(tmp_path / "other", 2, classes={"pretest": (0, 0, 0), "trainee": (9, 9, 9)}, size=12)
    assert scan_image_folder(other).classes == ["pretest", "trainee"]


def test_supcon_train_on_a_dataset_root_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = dataset_root(tmp_path / "digits")
    before = files_under(tmp_path)
    result = CliRunner().invoke(train_command, ["--data-folder", str(root), *TINY])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: data folder")
    assert f"point --data-folder at {root / 'train'}" in lines[0]
    assert files_under(tmp_path) == before and not (tmp_path / "runs").exists()


def test_supcon_train_with_the_flag_trains_on_classes_named_like_splits(tmp_path):
    root = dataset_root(tmp_path / "odd", ("test", "train"))  # a dataset whose classes really are so named
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(train_command, ["--data-folder", str(root), "--run-dir", str(run_dir), *TINY,
                                                "--allow-split-class-names"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run_info"]["class_names"] == ["test", "train"]
    assert config["allow_split_class_names"] is True


def test_baseline_train_on_a_dataset_root_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = dataset_root(tmp_path / "data")
    result = CliRunner().invoke(baseline_command, ["--data-folder", str(root), "--model", "simple_cnn", "--size", "32",
                                                   "--num-workers", "0", "--epochs", "1", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"point --data-folder at {root / 'train'}" in result.output
    assert not (tmp_path / "runs").exists()


def test_baseline_val_folder_given_as_the_root_is_refused(tmp_path, monkeypatch, image_root):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(baseline_command, ["--data-folder", str(image_root / "train"), "--val-folder",
                                                   str(image_root), "--model", "simple_cnn", "--size", "32",
                                                   "--num-workers", "0", "--epochs", "1", "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"val folder {image_root} looks like a dataset root" in result.output
    assert f"point --val-folder at {image_root / 'val'}" in result.output


@pytest.fixture(scope="module")
def probed(trained_run, tmp_path_factory):
    return probed_run(trained_run, tmp_path_factory)


def test_probe_all_val_folder_given_as_the_root_is_refused(probed, image_root, tmp_path):
    run = copy_run(probed, tmp_path / "run")
    before = snapshot(run)
    result = invoke(probe_all_command, ["--run", run, "--val-folder", image_root, "--num-workers", "0", "--quiet",
                                        "--force"])
    assert result.exit_code != 0
    message = one_line_error(result)
    assert f"val folder {image_root} looks like a dataset root" in message
    assert f"point --val-folder at {image_root / 'val'}" in message
    assert snapshot(run) == before


def test_check_accuracies_test_folder_given_as_the_root_is_refused(probed, image_root, tmp_path):
    run = copy_run(probed, tmp_path / "runs" / "run")
    before = snapshot(run)
    result = invoke(check_accuracies_command, ["--run", run, "--test-folder", image_root, "--num-workers", "0",
                                               "--quiet"])
    assert result.exit_code != 0
    message = one_line_error(result)
    assert f"test folder {image_root} looks like a dataset root" in message
    assert f"point --test-folder at {image_root / 'test'}" in message
    assert snapshot(run) == before
