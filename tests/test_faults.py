"""Faults a multi-day run meets (issue 14, trainer side): each is injected, then the run is checked.

Two processes on one run directory, a damaged ``last.pth``, a full disk (a real one: a size-limited
tmpfs), training images changed under a run, and (in :mod:`tests.test_faults_distributed`) one failing
process of several. The probe side (probe-all's lock, damaged checkpoints, a checkpoint deleted by
``--keep-last`` while it is probed, the feature cache's hash) is tested in ``tests/test_probe_all.py``
and ``tests/test_runlock.py``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import supcon.engine
from supcon.baseline.cli import baseline_command
from supcon.cli import train_command
from tests.conftest import write_image_folder
from tests.test_resume import start_pausing_run

STEPS_PER_EPOCH = 4  # 18 images // batch 4
ARGS = ["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--num-workers", "0",
        "--knn-every", "0", "--quiet", "--epochs", "4", "--save-freq", "1", "--seed", "3"]


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def train(args):
    return invoke(train_command, args)


def errors_of(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run (not the lock, which every start takes and releases) and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 4
    return {f"{part}.{k}": v for part in ("encoder", "head") for k, v in state[part].items()}


def assert_same_weights(path: Path, reference: Path) -> None:
    got, expected = weights(path), weights(reference)
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("faults") / "train", 6, size=20, seed=4)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """4 epochs, uninterrupted, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert result.exit_code == 0, result.output
    return run_dir


# --- 1. two processes on one run directory ----------------------------------------------------------------------


def test_a_running_run_refuses_a_second_trainer_naming_it_and_a_killed_ones_lock_is_taken_over(data, straight,
                                                                                               tmp_path):
    run_dir = tmp_path / "run"
    holder = start_pausing_run(["--data-folder", data, "--run-dir", run_dir, *ARGS], tmp_path,
                               pause_at_step=STEPS_PER_EPOCH + 2, pause_seconds=120)
    try:
        before = files_of(run_dir)
        for command, extra in ((train_command, ARGS), (baseline_command, ["--model", "resnet18", "--epochs", "1"])):
            result = invoke(command, ["--data-folder", data, "--run-dir", run_dir, *extra, "--resume"])
            assert result.exit_code == 2
            assert errors_of(result) == [line for line in result.output.splitlines() if line.strip()]
            message = errors_of(result)[0]
            assert f"run dir {run_dir} is in use by process {holder.pid}" in message, message
            assert "supcon-train" in message
        assert files_of(run_dir) == before  # the refused processes wrote nothing
        assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()

    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of {run_dir} left by process {holder.pid}" in result.output
    assert "no longer running" in result.output
    assert (run_dir / ".lock").read_text() == ""  # released at the end
    assert_same_weights(run_dir / "last.pth", straight / "last.pth")


def test_a_refused_start_leaves_no_folder_or_lock(data, tmp_path):
    run_dir = tmp_path / "new" / "run"
    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--model", "no_such_model"])
    assert result.exit_code == 2 and "no_such_model" in errors_of(result)[0]
    assert list(tmp_path.iterdir()) == []


# --- 2. a truncated or damaged checkpoint --------------------------------------------------------------------------


def damage(path: Path) -> bytes:
    """Flip a block of bytes in the middle of ``path`` (bit rot); returns the damaged bytes."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = bytes(b ^ 0xFF for b in raw[middle:middle + 4096])
    path.write_bytes(bytes(raw))
    return bytes(raw)


def test_resume_skips_bad_checkpoints_to_the_newest_good_one_and_keeps_the_bad_files(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    last = (run_dir / "last.pth").read_bytes()
    truncated = last[: len(last) // 3]
    (run_dir / "last.pth").write_bytes(truncated)  # cut short
    damaged = damage(run_dir / "ckpt_epoch_4.pth")  # damaged bytes
    # loads, but is not what its name says (a copy made by hand): fails the content check
    shutil.copy(run_dir / "ckpt_epoch_2.pth", run_dir / "ckpt_epoch_3.pth")
    # the newest good state is ckpt_epoch_2: redoing epochs 3 and 4 must give the uninterrupted weights

    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"checkpoint {run_dir / 'last.pth'} is corrupt or truncated" in out
    assert f"checkpoint {run_dir / 'ckpt_epoch_4.pth'} is corrupt" in out
    assert f"{run_dir / 'ckpt_epoch_3.pth'} cannot be resumed: it holds epoch 2, not the end of epoch 3" in out
    assert f"resuming from {run_dir / 'ckpt_epoch_2.pth'} instead of {run_dir / 'last.pth'}" in out
    assert f"resuming {run_dir} at epoch 3 (2 of 4 epochs done)" in out
    assert_same_weights(run_dir / "last.pth", straight / "last.pth")
    assert_same_weights(run_dir / "ckpt_epoch_4.pth", straight / "ckpt_epoch_4.pth")
    # the bad files were set aside before their names were written again, byte for byte
    aside = {p.name.split(".corrupt-")[0]: p.read_bytes() for p in run_dir.glob("*.corrupt-*")}
    assert aside == {"last.pth": truncated, "ckpt_epoch_4.pth": damaged,
                     "ckpt_epoch_3.pth": (straight / "ckpt_epoch_2.pth").read_bytes()}


def test_resume_with_no_loadable_checkpoint_is_one_line_and_changes_nothing(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    for path in run_dir.glob("*.pth"):
        path.write_bytes(path.read_bytes()[:1000])
    before = files_of(run_dir)
    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 2
    assert errors_of(result) == [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors_of(result)[0].startswith(f"Error: cannot resume {run_dir}: none of its 5 checkpoints loads")
    assert "Traceback" not in result.output
    assert files_of(run_dir) == before


# --- 3. a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs at ``tmp_path/disk`` and a function that resizes it; unmounted afterwards.

    Mounting needs root (as here and in CI); elsewhere the test is skipped, saying why.
    """
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def mount(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", *options, str(mount_point)], capture_output=True, text=True, timeout=30)

    try:
        mounted = mount("-t", "tmpfs", "-o", "size=1m", "tmpfs")
    except FileNotFoundError:
        pytest.skip("no mount command: the disk-full test needs a size-limited tmpfs")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the disk-full test needs root")

    def resize(size: int) -> None:
        assert mount("-o", f"remount,size={size}").returncode == 0

    yield mount_point, resize
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_the_run_resumes(data, straight, small_disk):
    disk, resize = small_disk
    run_dir = disk / "run"
    size = (straight / "last.pth").stat().st_size
    # Room for ckpt_epoch_1, last.pth, ckpt_epoch_2 and the small files, not for last.pth's temporary copy after
    # epoch 2 (an atomic write holds the old file and the new one at once).
    resize(int(3.5 * size) + 512 * 1024)
    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert result.exit_code == 2, result.output
    error = errors_of(result)[0]
    assert error.startswith(f"Error: disk full writing to {run_dir} (") and " free; one checkpoint needs " in error
    assert f"continue with --resume --run-dir {run_dir}" in error and "Traceback" not in result.output
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["ckpt_epoch_1.pth", "ckpt_epoch_2.pth", "last.pth"]
    assert (run_dir / "last.pth").read_bytes() == (run_dir / "ckpt_epoch_1.pth").read_bytes()  # epoch 1, whole
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 1
    assert list(run_dir.glob(".*.tmp")) == []  # the half-written temporary file is gone
    resize(8 * size)  # space freed

    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {run_dir} at epoch 2 (1 of 4 epochs done)" in result.output
    assert_same_weights(run_dir / "last.pth", straight / "last.pth")


def test_disk_space_is_estimated_before_training_and_a_short_disk_warned(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(supcon.engine, "free_bytes", lambda folder: 1000)
    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    size = (run_dir / "ckpt_epoch_2.pth").stat().st_size
    assert size == (run_dir / "last.pth").stat().st_size
    estimated = supcon.engine.format_bytes(size)  # the estimate before the first step, to the shown digit
    assert f"one checkpoint is {estimated}; the 2 still to write need about " in result.output
    warning = re.search(rf"the disk of {re.escape(str(run_dir))} has 1.0 KB free, the run's checkpoints need about "
                        rf"([0-9.]+) MB \(2 x {estimated}, plus one for writing\)", result.output)
    assert warning, result.output
    assert float(warning.group(1)) == pytest.approx(3 * size / 1e6, rel=0.02)  # 2 checkpoints + 1 temporary
    assert "--keep-last N" in result.output


def test_keep_last_keeps_the_newest_periodic_checkpoints(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    result = train(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--keep-last", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["ckpt_epoch_3.pth", "ckpt_epoch_4.pth", "last.pth"]
    assert "--keep-last 2: deleted ckpt_epoch_1.pth" in result.output
    # deleting old files changed nothing else
    assert_same_weights(run_dir / "last.pth", straight / "last.pth")


def test_keep_last_must_not_be_negative(data, tmp_path):
    result = train(["--data-folder", data, "--run-dir", tmp_path / "run", *ARGS, "--keep-last", "-1"])
    assert errors_of(result) == ["Error: --keep-last must be >= 0 (0 keeps every checkpoint), got -1"]
    assert list(tmp_path.iterdir()) == []


# --- 4. training images changed under a run ------------------------------------------------------------------------

STEP_ARGS = [*ARGS[:ARGS.index("--epochs")], "--no-cosine", "--seed", "3"]  # extendable with --resume --epochs


def change_images(folder: Path) -> None:
    """3 images added to dog, 1 removed from cat, 1 renamed in fox."""
    for i in range(3):
        shutil.copy(folder / "dog" / "dog_000.png", folder / "dog" / f"extra_{i}.png")
    (folder / "cat" / "cat_001.png").unlink()
    (folder / "fox" / "fox_002.png").rename(folder / "fox" / "fox_renamed.png")


@pytest.fixture
def one_epoch_run(data, tmp_path) -> tuple[Path, Path]:
    """A private copy of the images and a 1-epoch --no-cosine run on them (extendable)."""
    images = tmp_path / "images"
    shutil.copytree(data, images)
    run_dir = tmp_path / "run"
    result = train(["--data-folder", images, "--run-dir", run_dir, *STEP_ARGS, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    return images, run_dir


def test_changed_images_refuse_the_resume_with_a_summary(one_epoch_run):
    images, run_dir = one_epoch_run
    change_images(images)
    before = files_of(run_dir)
    result = train(["--data-folder", images, "--run-dir", run_dir, *STEP_ARGS, "--epochs", "2", "--resume"])
    assert result.exit_code == 2
    assert errors_of(result) == [
        f"Error: the training images changed since {run_dir} started (1 removed in class cat; 3 added in class dog; "
        "1 added, 1 removed in class fox); the batches are drawn by image index, so the run would not continue as "
        "it began. Restore the folder, or pass --allow-data-change to continue with the images as they are now"]
    assert files_of(run_dir) == before


def test_allow_data_change_continues_logged_and_recorded(one_epoch_run):
    images, run_dir = one_epoch_run
    listing_before = (run_dir / "train_images.txt").read_text()
    change_images(images)
    result = train(["--data-folder", images, "--run-dir", run_dir, *STEP_ARGS, "--epochs", "2", "--resume",
                    "--allow-data-change"])
    assert result.exit_code == 0, result.output
    assert "--allow-data-change: continuing" in result.output and "3 added in class dog" in result.output
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["allow_data_change"] is True
    assert config["run_info"]["data_changes"] == [
        {"epoch": 1, "change": "1 removed in class cat; 3 added in class dog; 1 added, 1 removed in class fox",
         "images_before": 18, "images_now": 20}]
    assert (run_dir / "train_images.before-epoch-2.txt").read_text() == listing_before
    listing = (run_dir / "train_images.txt").read_text().splitlines()
    assert len(listing) == 20 and "fox/fox_renamed.png" in listing and "cat/cat_001.png" not in listing
    # the next resume compares with the images as they are now
    result = train(["--data-folder", images, "--run-dir", run_dir, *STEP_ARGS, "--epochs", "3", "--resume"])
    assert result.exit_code == 0, result.output


def test_an_older_run_without_a_listing_resumes_and_says_the_check_is_skipped(one_epoch_run, caplog):
    images, run_dir = one_epoch_run
    (run_dir / "train_images.txt").unlink()
    with caplog.at_level(logging.INFO):
        result = train(["--data-folder", images, "--run-dir", run_dir, *STEP_ARGS, "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "records no list of its training images (an older run): the check that they are unchanged is skipped" \
        in result.output
    assert len((run_dir / "train_images.txt").read_text().splitlines()) == 18  # recorded from now on


def test_baseline_refuses_changed_images_too(data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data, images)
    run_dir = tmp_path / "run"
    args = ["--data-folder", images, "--run-dir", run_dir, "--model", "test_resnet", "--small-input", "--size", "16",
            "--batch-size", "4", "--num-workers", "0", "--quiet", "--epochs", "2", "--val-split", "0.3"]
    original = supcon.engine.RunEngine.run_epochs

    def one_epoch_then_sigterm(self, trainer, start_epoch, epochs, **kwargs):
        self.stop.signal = signal.SIGTERM  # as if SIGTERM came during epoch 1: the epoch ends, is saved, stops
        return original(self, trainer, start_epoch, epochs, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(supcon.engine.RunEngine, "run_epochs", one_epoch_then_sigterm)
        result = invoke(baseline_command, args)
    assert result.exit_code == 143 and (run_dir / "train_images.txt").is_file(), result.output
    change_images(images)
    result = invoke(baseline_command, [*args, "--resume"])
    assert result.exit_code == 2
    assert errors_of(result)[0].startswith(f"Error: the training images changed since {run_dir} started (")


# --- 5. (see also tests/test_faults_distributed.py) non-finite weights are never saved -------------------------------


def test_a_save_of_non_finite_weights_is_refused_and_the_last_good_file_stays(tmp_path):
    from supcon.engine import RunEngine
    from supcon.errors import UserError

    engine = RunEngine("fp32", progress=False)
    engine.choose_run_dir(str(tmp_path / "run"), resume=False, default_name="x", batch_size=2)
    try:
        good = {"encoder": {"w": torch.ones(3)}, "head": {"w": torch.ones(2)}, "epoch": 1}
        engine.save({"last.pth": good})
        before = (tmp_path / "run" / "last.pth").read_bytes()
        bad = {"encoder": {"w": torch.tensor([1.0, float("nan"), 1.0])}, "head": {"w": torch.ones(2)}, "epoch": 2}
        with pytest.raises(UserError, match="last.pth: its encoder weights are not finite; the last good checkpoint"):
            engine.save({"last.pth": bad})
        assert (tmp_path / "run" / "last.pth").read_bytes() == before
    finally:
        engine.close()
