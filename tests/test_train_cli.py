"""supcon-train through click's CliRunner: every promised file, refusals, each bad input, a non-finite loss."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from supcon.cli import train_command
from supcon.losses import SupConLoss
from supcon.models import build_encoder, build_model
from tests.conftest import TINY_TRAIN_ARGS, write_image_folder
from tests.test_resume import ctrl_c_at_loss_call

RUN_ARGS = [*TINY_TRAIN_ARGS, "--epochs", "3", "--save-freq", "2", "--seed", "0"]
#: A faster set-up for the runs of this file that do not inspect the result closely.
SMALL_ARGS = ["--model", "test_resnet", "--small-input", "--size", "8", "--batch-size", "4", "--num-workers", "0",
              "--knn-every", "0", "--quiet"]




def invoke(args):
    return CliRunner().invoke(train_command, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and modification time (not the run lock: every start takes
    and releases it)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_one_line_error(result, *fragments: str) -> str:
    """A clean failure: non-zero exit through sys.exit, one 'Error: ...' line naming the problem."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, train_folder):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


# --- the promised files ---------------------------------------------------------------------------------------


def test_run_writes_every_promised_file(cli_run):
    run_dir, output = cli_run
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",  # released (empty) when the run ended
        "ckpt_epoch_2.pth",  # --save-freq 2
        "ckpt_epoch_3.pth",  # the final epoch
        "config.yaml", "last.pth", "metrics.csv", "tensorboard", "train_images.txt",
    ]
    assert (run_dir / ".lock").read_text() == ""
    assert len((run_dir / "train_images.txt").read_text().splitlines()) == 36  # 3 classes x 12 images
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert f"run directory: {run_dir}" in output
    assert "learning rate 0.00390625 = 0.5 x 8 (global batch) / 1024" in output  # printed, 0.5 * 8 / 1024


def test_config_yaml_records_the_resolved_options(cli_run, train_folder):
    run_dir, _ = cli_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["learning_rate"] == pytest.approx(0.5 * 8 / 1024)
    assert (config["model"], config["small_input"], config["size"], config["batch_size"]) == ("test_resnet", True,
                                                                                              32, 8)
    assert (config["epochs"], config["save_freq"], config["seed"], config["temp"]) == (3, 2, 0, 0.07)
    # the precision default depends on the host (this suite also runs on GPU hosts)
    on_gpu = torch.cuda.is_available()
    expected_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    assert config["warm"] is False and config["cosine"] is True and config["precision"] == expected_precision
    assert config["data_folder"] == str(train_folder)
    assert config["val_folder"] == str((train_folder.parent / "val").resolve())

    # mean/std: computed from the training folder (checked here with numpy) and recorded
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
                             for p in sorted(train_folder.rglob("*.png"))])
    assert config["mean"] == pytest.approx(pixels.mean(0).tolist(), abs=1e-6)
    assert config["std"] == pytest.approx(pixels.std(0).tolist(), abs=1e-6)

    info = config["run_info"]
    assert info["class_names"] == ["cat", "dog", "fox"]
    assert info["num_classes"] == 3 and info["num_images"] == 36
    assert info["data_folder"] == str(train_folder.resolve())
    assert info["num_processes"] == 1 and info["global_batch"] == 8 and info["steps_per_epoch"] == 36 // 8
    assert info["model_config"] == {"model": "test_resnet", "small_input": True, "zero_init_last": False,
                                    "feat_dim": 128, "head_bn": True}
    import timm
    import torchvision

    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["torchvision"] == torchvision.__version__
    assert info["versions"]["timm"] == timm.__version__
    assert {"supcon", "accelerate"} <= set(info["versions"])


def test_checkpoints_load_weights_only_and_rebuild_the_encoder(cli_run, train_folder):
    run_dir, _ = cli_run
    states = {name: torch.load(run_dir / name, weights_only=True, map_location="cpu")
              for name in ("ckpt_epoch_2.pth", "ckpt_epoch_3.pth", "last.pth")}
    assert states["ckpt_epoch_2.pth"]["epoch"] == 2
    assert states["ckpt_epoch_3.pth"]["epoch"] == 3
    assert (run_dir / "last.pth").read_bytes() == (run_dir / "ckpt_epoch_3.pth").read_bytes()
    state = states["last.pth"]
    for key in ("model_config", "encoder", "head", "optimizer", "scaler", "rng", "epoch", "global_step",
                "class_names", "mean", "std", "config"):
        assert key in state
    assert state["global_step"] == 3 * 4
    assert state["class_names"] == ["cat", "dog", "fox"]
    assert state["optimizer"]["state"]  # momentum buffers
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4

    # The checkpoint alone rebuilds the encoder for probing.
    model_config = state["model_config"]
    encoder = build_encoder(model_config["model"], small_input=model_config["small_input"],
                            zero_init_last=model_config["zero_init_last"])
    encoder.load_state_dict(state["encoder"])  # strict
    full = build_model(**model_config)
    full.encoder.load_state_dict(state["encoder"])
    full.head.load_state_dict(state["head"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(images), full.eval()(images)["features"])
    # ...and training changed it between the two saved epochs
    assert not torch.equal(states["ckpt_epoch_2.pth"]["encoder"]["conv1.0.weight"], state["encoder"]["conv1.0.weight"])


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_has_one_row_per_epoch(cli_run):
    run_dir, _ = cli_run
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(float(row["loss"])) and float(row["images_per_s"]) > 0
        assert 0 <= float(row["knn_accuracy"]) <= 1
        assert float(row["collapsed_loss"]) == pytest.approx(math.log(2 * 8 - 1), abs=1e-5)
    # cosine over 3 epochs from 0.00390625 to eta_min = 0.00390625 * 0.1**3 = 3.90625e-6:
    # epoch e: 3.90625e-6 + 0.00390234375 * (1 + cos(pi * e / 3)) / 2, with cos(pi/3) = 0.5, cos(2pi/3) = -0.5
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.0029306640625, 0.0009794921875, 3.90625e-6])


def test_tensorboard_events_hold_the_scalars(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = cli_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/spread", "train/collapsed_loss",
            "monitor/knn_accuracy"} <= tags
    rows = read_metrics(run_dir)
    for tag, column in (("train/loss", "loss"), ("train/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-5)


# --- refusing to overwrite -------------------------------------------------------------------------------------


def test_refuses_to_start_over_a_run_without_resume(cli_run, train_folder):
    run_dir, _ = cli_run
    before = snapshot(run_dir)
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS])
    assert_one_line_error(result, f"run dir {run_dir} already exists", "--resume")
    assert snapshot(run_dir) == before


def test_refuses_to_resume_with_a_different_configuration(cli_run, train_folder):
    run_dir, _ = cli_run
    before = snapshot(run_dir)
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS, "--resume", "--temp", "0.1"])
    assert_one_line_error(result, "different configuration", "temp: run has 0.07, now 0.1")
    assert snapshot(run_dir) == before


def test_resuming_on_another_number_of_processes_keeps_the_global_batch_and_says_so(cli_run, train_folder,
                                                                                 tmp_path):
    # the same run as if it had been trained by 2 processes of 8, resumed here on 1
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[0], run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_info"].update(num_processes=2, global_batch=16)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # --dist-timeout is a runtime option: it may differ on a resume
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS, "--resume",
                     "--dist-timeout", "60"])
    assert result.exit_code == 0, result.output
    assert (f"resuming {run_dir} on 1 process (it trained on 2): its global batch of 16 is kept, 16 per process (was "
            "8); the learning rate, the steps per epoch and the place in the epoch are unchanged") in result.output
    assert "different configuration" not in result.output and "is finished" in result.output


def test_resuming_with_another_global_batch_is_refused_naming_both(cli_run, train_folder, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[0], run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_info"]["global_batch"] = 16  # recorded by 1 process of 8: not a state a run reaches by itself
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(run_dir)
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS, "--resume"])
    assert_one_line_error(result, "global batch of 16, now 8 (8 x 1 processes)", "resume it with --batch-size 8")
    assert snapshot(run_dir) == before


def test_a_split_of_the_global_batch_over_processes_that_do_not_divide_it_is_refused(tmp_path):
    from supcon.errors import UserError
    from supcon.resume import split_global_batch

    assert split_global_batch(16, 2, 4, tmp_path) == 4 and split_global_batch(16, 2, 1, tmp_path) == 16
    with pytest.raises(UserError) as refused:
        split_global_batch(16, 2, 3, tmp_path)
    assert str(refused.value) == (f"run dir {tmp_path} trains a global batch of 16 (8 x 2 processes), which 3 "
                                  "processes cannot split evenly; resume it on a number of processes that divides 16 "
                                  "(e.g. 1, 2, 4, 8, 16)")


def test_dist_timeout_must_be_at_least_a_second(train_folder, tmp_path):
    result = invoke(["--data-folder", train_folder, "--run-dir", tmp_path / "run", *RUN_ARGS, "--dist-timeout", "0"])
    assert_one_line_error(result, "--dist-timeout must be at least 1 (seconds), got 0.0")
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_finished_run_says_so_and_how_to_train_longer(cli_run, train_folder):
    run_dir, _ = cli_run
    before = snapshot(run_dir)
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"run {run_dir} is finished: 3 of 3 epochs done, nothing to train" in result.output
    assert "start a new run" in result.output and "cosine schedule is set by --epochs" in result.output
    assert "resuming" not in result.output
    assert snapshot(run_dir) == before


def test_a_cosine_run_cannot_be_extended(cli_run, train_folder):
    run_dir, _ = cli_run
    before = snapshot(run_dir)
    result = invoke(["--data-folder", train_folder, "--run-dir", run_dir, *RUN_ARGS, "--resume", "--epochs", "5"])
    assert_one_line_error(result, "started with --epochs 3, now 5", "cosine schedule is set by --epochs",
                          "start a new run")
    assert snapshot(run_dir) == before


def test_a_step_schedule_run_extended_with_resume_equals_a_longer_run(train_folder, tmp_path):
    """--no-cosine: the learning rate of an epoch does not depend on --epochs, so 2 + 1 epochs equal 3."""
    args = [*SMALL_ARGS, "--data-folder", train_folder, "--no-cosine", "--lr-decay-epochs", "2", "--seed", "1"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    assert invoke([*args, "--run-dir", straight, "--epochs", "3"]).exit_code == 0
    assert invoke([*args, "--run-dir", extended, "--epochs", "2"]).exit_code == 0
    finished = invoke([*args, "--run-dir", extended, "--epochs", "2", "--resume"])
    assert "resume it with a larger --epochs" in finished.output
    result = invoke([*args, "--run-dir", extended, "--epochs", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {extended} at epoch 3 (2 of 3 epochs done)" in result.output
    got, expected = (torch.load(d / "last.pth", weights_only=True) for d in (extended, straight))
    assert got["epoch"] == expected["epoch"] == 3
    assert all(torch.equal(got["encoder"][k], expected["encoder"][k]) for k in expected["encoder"])
    assert yaml.safe_load((extended / "config.yaml").read_text())["epochs"] == 3
    assert [r["epoch"] for r in read_metrics(extended)] == ["1", "2", "3"]
    assert sorted(p.name for p in extended.glob("ckpt_epoch_*.pth")) == ["ckpt_epoch_2.pth", "ckpt_epoch_3.pth"]
    shorter = invoke([*args, "--run-dir", extended, "--epochs", "2", "--resume"])
    assert_one_line_error(shorter, "started with --epochs 3, now 2", "cannot be shortened")


@pytest.mark.parametrize("started_with, resumed_with", [(12, 5), (5, 10)])
def test_a_wsd_run_at_its_stable_rate_takes_a_new_epochs_on_resume(train_folder, tmp_path, monkeypatch, started_with,
                                                                   resumed_with):
    """WSD's rate before the cool-down does not depend on --epochs: a run stopped in epoch 3 (its stable phase) and
    resumed with another --epochs, shorter or longer, ends with the weights of a run started with it."""
    args = [*SMALL_ARGS, "--data-folder", train_folder, "--schedule", "wsd", "--seed", "1"]
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    assert invoke([*args, "--run-dir", straight, "--epochs", str(resumed_with)]).exit_code == 0
    steps_per_epoch = int(torch.load(straight / "last.pth", weights_only=True)["global_step"]) // resumed_with
    ctrl_c_at_loss_call(monkeypatch, 2 * steps_per_epoch + 2)  # mid-epoch 3: before either cool-down (from 4)
    assert invoke([*args, "--run-dir", changed, "--epochs", str(started_with)]).exit_code == 130
    monkeypatch.undo()
    result = invoke([*args, "--run-dir", changed, "--epochs", str(resumed_with), "--resume"])
    assert result.exit_code == 0, result.output
    got, expected = (torch.load(d / "last.pth", weights_only=True) for d in (changed, straight))
    assert got["epoch"] == expected["epoch"] == resumed_with
    assert all(torch.equal(got["encoder"][k], expected["encoder"][k]) for k in expected["encoder"])
    assert yaml.safe_load((changed / "config.yaml").read_text())["epochs"] == resumed_with
    assert [float(r["lr"]) for r in read_metrics(changed)] == [float(r["lr"]) for r in read_metrics(straight)]


def test_a_wsd_run_in_its_cool_down_refuses_a_new_epochs(train_folder, tmp_path, monkeypatch):
    args = [*SMALL_ARGS, "--data-folder", train_folder, "--schedule", "wsd", "--seed", "1"]
    run_dir = tmp_path / "run"
    assert invoke([*args, "--run-dir", run_dir, "--epochs", "5"]).exit_code == 0  # cool-down: epoch 5
    before = (run_dir / "last.pth").read_bytes()
    result = invoke([*args, "--run-dir", run_dir, "--epochs", "8", "--resume"])
    assert_one_line_error(result, "started with --epochs 5, now 8", "cool-down began after epoch 4")
    assert (run_dir / "last.pth").read_bytes() == before
    # a run at its stable rate (stopped in epoch 6 of 20), but a new cool-down that would begin after epoch 4
    short = tmp_path / "short"
    steps_per_epoch = int(torch.load(run_dir / "last.pth", weights_only=True)["global_step"]) // 5
    ctrl_c_at_loss_call(monkeypatch, 5 * steps_per_epoch + 2)
    assert invoke([*args, "--run-dir", short, "--epochs", "20"]).exit_code == 130
    monkeypatch.undo()
    before = (short / "last.pth").read_bytes()
    result = invoke([*args, "--run-dir", short, "--epochs", "5", "--resume"])
    assert_one_line_error(result, "would begin after epoch 4", "6 epochs are trained", "--epochs of at least 8")
    assert (short / "last.pth").read_bytes() == before


# --- bad input: one line, non-zero exit, nothing written -----------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run from an empty folder, so a default run directory (runs/...) would show up here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_nothing_written(workdir: Path, *inputs: Path):
    assert not (workdir / "runs").exists()
    assert sorted(p.name for p in workdir.iterdir()) == sorted(p.name for p in inputs)


def folder(workdir: Path, per_class: int = 4, **kwargs) -> Path:
    return write_image_folder(workdir / "data", per_class, size=12, **kwargs)


def test_data_folder_missing(workdir):
    assert_one_line_error(invoke(["--data-folder", workdir / "nowhere", *SMALL_ARGS]),
                          f"data folder not found: {workdir / 'nowhere'}")
    assert_nothing_written(workdir)


def test_data_folder_empty(workdir):
    (workdir / "data").mkdir()
    assert_one_line_error(invoke(["--data-folder", workdir / "data", *SMALL_ARGS]), "has no class subfolders")
    assert_nothing_written(workdir, workdir / "data")


def test_fewer_than_two_classes(workdir):
    data = folder(workdir, classes={"cat": (200, 10, 10)})
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS]), "1 class folder (cat)", "at least 2")
    assert_nothing_written(workdir, data)


def test_class_folder_without_images(workdir):
    data = folder(workdir)
    (data / "emu").mkdir()
    (data / "emu" / "readme.txt").write_text("no images here")
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS]), f"class folder {data / 'emu'} has no images")
    assert_nothing_written(workdir, data)


def test_corrupt_image_is_named(workdir):
    data = folder(workdir)
    corrupt = data / "dog" / "dog_002.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS]), f"unreadable image {corrupt}",
                          "--skip-bad-images")
    # nothing but the list of unreadable images (in the run dir it would have used)
    assert sorted(p.name for p in workdir.iterdir()) == ["data", "runs"]
    assert [p.name for p in (workdir / "runs").rglob("*") if p.is_file()] == ["bad_images.txt"]


def test_every_corrupt_image_is_listed_and_a_fixed_folder_then_starts(workdir):
    data = folder(workdir)
    corrupt = [data / "dog" / "dog_002.png", data / "fox" / "fox_001.png", data / "fox" / "fox_003.png"]
    for path in corrupt:
        path.write_bytes(b"garbage")
    run_dir = workdir / "run"
    args = ["--data-folder", data, "--run-dir", run_dir, *SMALL_ARGS, "--epochs", "1"]
    assert_one_line_error(invoke(args), f"unreadable image {corrupt[0]}", "(and 2 more)",
                          f"all 3 are listed in {run_dir / 'bad_images.txt'}")
    listed = [line.split("\t") for line in (run_dir / "bad_images.txt").read_text().splitlines()]
    assert [path for path, _ in listed] == [str(p) for p in corrupt]
    assert all(reason for _, reason in listed)
    assert [p.name for p in run_dir.iterdir()] == ["bad_images.txt"]  # no run content: no --resume needed
    folder(workdir)  # the user fixes the images and runs the same command again
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert (run_dir / "last.pth").is_file() and not (run_dir / "bad_images.txt").exists()


def test_skip_bad_images_skips_and_counts_them(workdir):
    data = folder(workdir)
    (data / "dog" / "dog_002.png").write_bytes(b"garbage")
    truncated = data / "fox" / "fox_001.png"
    truncated.write_bytes(truncated.read_bytes()[:50])
    result = invoke(["--data-folder", data, "--run-dir", workdir / "run", *SMALL_ARGS, "--epochs", "1",
                     "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert "skipping 2 unreadable image(s)" in result.output
    listed = [line.split("\t")[0] for line in (workdir / "run" / "bad_images.txt").read_text().splitlines()]
    assert listed == [str(data / "dog" / "dog_002.png"), str(truncated)]
    info = yaml.safe_load((workdir / "run" / "config.yaml").read_text())["run_info"]
    assert info["bad_images_skipped"] == 2
    assert info["num_images"] == 3 * 4 - 2


@pytest.mark.parametrize("option,value,fragment", [
    ("--mean", "0.5,0.5", "--mean must have exactly 3 values"),
    ("--mean", "red,green,blue", "--mean must be three comma-separated numbers"),
    ("--std", "0.2,0,0.2", "--std values must be positive"),
    ("--std", "0.2;0.2;0.2", "--std must"),
])
def test_malformed_mean_or_std(workdir, option, value, fragment):
    data = folder(workdir)
    other = "--std" if option == "--mean" else "--mean"
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, option, value, other, "0.5,0.5,0.5"]),
                          fragment)
    assert_nothing_written(workdir, data)


def test_mean_without_std(workdir):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--mean", "0.5,0.5,0.5"]),
                          "give both --mean and --std")
    assert_nothing_written(workdir, data)


def test_unknown_model(workdir):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--model", "resnet_nonexistent"]),
                          "unknown model 'resnet_nonexistent'")
    assert_nothing_written(workdir, data)


def test_misspelt_model_gets_the_timm_name(workdir):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--model", "resnet-18"]),
                          "unknown model 'resnet-18'", "did you mean resnet18?")
    assert_nothing_written(workdir, data)


def test_batch_size_below_two(workdir):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--batch-size", "1"]),
                          "--batch-size must be at least 2")
    assert_nothing_written(workdir, data)


def test_batch_larger_than_the_folder(workdir):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--batch-size", "64", "--mean", "0.5,0.5,0.5",
                                  "--std", "0.2,0.2,0.2"]), "12 usable images", "lower --batch-size")
    assert_nothing_written(workdir, data)


@pytest.mark.parametrize("args,fragment", [
    (["--batch-size", "abc"], "'abc' is not a valid integer"),
    (["--learning-rate", "fast"], "'fast' is not a valid float"),
    (["--precision", "fp64"], "'fp64' is not one of"),
    (["--no-such-option"], "No such option '--no-such-option'"),
])
def test_malformed_option_values(workdir, args, fragment):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, *args]), fragment)
    assert_nothing_written(workdir, data)


@pytest.mark.parametrize("content,fragment", [
    ({"epochs": 2, "bogus_option": 1}, "unknown option 'bogus_option'"),
    ({"batch_size": "abc"}, "batch_size"),
    ({"epochs": 2.5}, "epochs"),
    ({"temp": "warm"}, "temp"),
    ({"cosine": "maybe"}, "cosine"),
    ("epochs: [1, 2", "not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_bad_config_file(workdir, content, fragment):
    data = folder(workdir)
    config_file = workdir / "recipe.yaml"
    config_file.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--config", config_file]), fragment,
                          str(config_file))
    assert_nothing_written(workdir, data, config_file)


def test_balanced_sampler_refuses_a_class_of_one_image_naming_it(workdir):
    data = folder(workdir)
    for extra in sorted((data / "fox").iterdir())[1:]:
        extra.unlink()
    before = snapshot(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--sampler", "balanced"]),
                          "--sampler balanced needs at least 2 images in every class",
                          "class 'fox' of the data folder has 1 image", "use --sampler random")
    assert snapshot(workdir) == before
    assert_nothing_written(workdir, data)


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_an_unknown_sampler_is_refused(workdir, where):
    data = folder(workdir)
    inputs = [data]
    if where == "command line":
        args, fragment = ["--sampler", "per-class:4"], "Invalid value for '--sampler': 'per-class:4' is not one of"
    else:
        inputs.append(workdir / "recipe.yaml")
        inputs[-1].write_text("sampler: per-class:4\n")
        args, fragment = ["--config", inputs[-1]], "--sampler must be one of random, balanced, got 'per-class:4'"
    before = snapshot(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, *args]), fragment)
    assert snapshot(workdir) == before
    assert_nothing_written(workdir, *inputs)


def test_missing_config_file(workdir):
    data = folder(workdir)
    assert_one_line_error(invoke(["--data-folder", data, *SMALL_ARGS, "--config", workdir / "none.yaml"]),
                          "config file not found")
    assert_nothing_written(workdir, data)


# --- non-finite loss -------------------------------------------------------------------------------------------


def _poison_loss(monkeypatch, at_call: int, run_dir: Path, seen: dict, also_signal: int | None = None):
    """Make the loss NaN at the ``at_call``-th step (recording the run dir as it was then)."""
    original = SupConLoss.forward
    calls = []

    def forward(self, features, labels=None):
        calls.append(1)
        loss = original(self, features, labels)
        if len(calls) == at_call:
            seen.update(snapshot(run_dir))
            if also_signal is not None:
                os.kill(os.getpid(), also_signal)
            return loss * float("nan")
        return loss

    monkeypatch.setattr(SupConLoss, "forward", forward)


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    data = folder(workdir)  # 12 images, batch 4: 3 steps per epoch
    run_dir = workdir / "run"
    before = {}
    _poison_loss(monkeypatch, at_call=2 * 3 + 2, run_dir=run_dir, seen=before)
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *SMALL_ARGS, "--epochs", "4", "--save-freq", "1"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert errors == ["Error: loss became non-finite at epoch 3, step 2 of 3 (global step 7); the last good "
                      "checkpoint is kept. Try a lower --learning-rate or --precision fp32"]
    assert "Traceback" not in result.output
    assert set(before) >= {"last.pth", "ckpt_epoch_1.pth", "ckpt_epoch_2.pth", "config.yaml"}
    after = snapshot(run_dir)
    assert {k: after.get(k) for k in before} == before  # nothing written since the last good epoch
    assert not (run_dir / "ckpt_epoch_3.pth").exists()
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 2
    assert all(torch.isfinite(t).all() for t in state["encoder"].values() if t.is_floating_point())


def test_non_finite_loss_is_not_saved_when_a_signal_arrives_in_the_same_step(workdir, monkeypatch):
    data = folder(workdir)
    run_dir = workdir / "run"
    before = {}
    _poison_loss(monkeypatch, at_call=2 * 3 + 2, run_dir=run_dir, seen=before, also_signal=signal.SIGTERM)
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *SMALL_ARGS, "--epochs", "4", "--save-freq", "1"])
    assert any(line.startswith("Error: loss became non-finite at epoch 3, step 2 of 3")
               for line in result.output.splitlines()), result.output
    after = snapshot(run_dir)
    assert {k: after.get(k) for k in before} == before
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 2


def test_a_fixed_length_run_resumes_whatever_the_plateau_rule_settings_it_recorded(train_folder, tmp_path,
                                                                                  monkeypatch):
    """--plateau-patience/--plateau-tolerance only steer --until plateau: a fixed-length run recorded with other
    values (an older version's defaults) resumes; an --until plateau run does not."""
    args = [*SMALL_ARGS, "--data-folder", train_folder, "--seed", "1", "--epochs", "3"]
    run_dir = tmp_path / "run"
    ctrl_c_at_loss_call(monkeypatch, 2)
    assert invoke([*args, "--run-dir", run_dir]).exit_code == 130
    monkeypatch.undo()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["plateau_patience"], config["plateau_tolerance"] = 0.4, 0.02
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = invoke([*args, "--run-dir", run_dir, "--resume"])
    assert result.exit_code == 0, result.output
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 3
    plateau_dir = tmp_path / "plateau"
    plateau_args = [*args, "--until", "plateau", "--probe-every", "1"]
    ctrl_c_at_loss_call(monkeypatch, 2)
    assert invoke([*plateau_args, "--run-dir", plateau_dir]).exit_code == 130
    monkeypatch.undo()
    config = yaml.safe_load((plateau_dir / "config.yaml").read_text())
    config["plateau_patience"] = 0.4
    (plateau_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    refused = invoke([*plateau_args, "--run-dir", plateau_dir, "--resume"])
    assert_one_line_error(refused, "plateau_patience: run has 0.4, now 0.5")


def test_a_run_far_shorter_than_where_supcon_settled_gets_a_note(train_folder, tmp_path, monkeypatch):
    import supcon.train as train_module

    args = [*SMALL_ARGS, "--data-folder", train_folder, "--seed", "1", "--epochs", "2"]
    result = invoke([*args, "--run-dir", tmp_path / "short"])
    assert result.exit_code == 0, result.output
    steps = int(torch.load(tmp_path / "short" / "last.pth", weights_only=True)["global_step"])
    assert f"note: {steps} optimizer steps in all (2 epochs of {steps // 2})" in result.output
    monkeypatch.setattr(train_module, "SETTLED_STEPS", steps)  # as long as where it settled: no note
    result = invoke([*args, "--run-dir", tmp_path / "long"])
    assert result.exit_code == 0 and "optimizer steps in all" not in result.output
