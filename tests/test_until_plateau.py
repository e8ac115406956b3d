"""``supcon-train --until plateau``: the live probe, the decision to cool down, and resuming through every phase."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_image_folder
from tests.probe_helpers import one_line_error
from tests.test_resume import ctrl_c_at_loss_call, invoke, start_pausing_run

STEPS_PER_EPOCH = 4  # 18 images // batch 4
# 12 val images: half an image is 4 points, the floor of the trend's error, so the tolerance is wide for the run to
# settle within its 24 epochs (its probe is 100% from the start)
ARGS = ["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--num-workers", "0",
        "--knn-every", "1", "--quiet", "--epochs", "24", "--save-freq", "2", "--seed", "3", "--until", "plateau",
        "--probe-every", "1", "--plateau-tolerance", "0.2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plateau")
    write_image_folder(root / "train", 6, size=20, seed=4)
    write_image_folder(root / "val", 4, size=20, seed=5)
    return root / "train"


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("plateau_straight") / "run"
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert result.exit_code == 0, result.output
    return run_dir


def decision_epoch(run_dir: Path) -> int:
    decided = [r for r in rows(run_dir) if r["stop_decision"]]
    assert len(decided) == 1
    return int(decided[0]["epoch"])


def test_the_run_cools_down_and_stops_when_the_live_probe_stops_improving(straight):
    table = rows(straight)
    decided = decision_epoch(straight)
    state = torch.load(straight / "last.pth", weights_only=True)
    decision = state["plateau"]["decision"]
    assert decision["epoch"] == decided >= 3
    last = decided + decision["cooldown_epochs"]
    assert [int(r["epoch"]) for r in table] == list(range(1, last + 1)) and last < 24  # --epochs is only the ceiling
    assert state["epoch"] == last and (straight / f"ckpt_epoch_{last}.pth").is_file()
    # the live probe of every epoch: val accuracy inside its 95% interval, in the CSV and in each saved checkpoint
    assert all(float(r["probe_low"]) <= float(r["probe_accuracy"]) <= float(r["probe_high"]) for r in table)
    saved = torch.load(straight / "ckpt_epoch_2.pth", weights_only=True)["live_probe"]
    assert saved["epoch"] == 2 and saved["val_accuracy"] == pytest.approx(float(table[1]["probe_accuracy"]), abs=1e-6)
    assert saved["num_val"] == 12 and saved["num_train"] == 18
    # stable learning rate until the decision, then it falls to lr x 0.001 at the last step
    lrs = [float(r["lr"]) for r in table]
    assert len(set(lrs[:decided])) == 1 and lrs[decided] < lrs[0]


def test_a_finished_plateau_run_says_so_on_resume(data, straight, tmp_path):
    import shutil

    run_dir = shutil.copytree(straight, tmp_path / "run")
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert "is finished: --until plateau cooled down and stopped" in result.output


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, expected = (torch.load(d / "last.pth", weights_only=True) for d in (run_dir, reference))
    assert got["epoch"] == expected["epoch"] and got["plateau"] == expected["plateau"]
    for part in ("encoder", "head"):
        assert [k for k in expected[part] if not torch.equal(got[part][k], expected[part][k])] == []
    for column in ("loss", "lr", "probe_accuracy", "probe_loss"):
        assert [float(r[column]) for r in rows(run_dir)] == pytest.approx(
            [float(r[column]) for r in rows(reference)], abs=2e-6)
    assert [r["stop_decision"] for r in rows(run_dir)] == [r["stop_decision"] for r in rows(reference)]


@pytest.mark.parametrize("phase", ["before the decision", "at the decision", "in the cool-down"])
def test_ctrl_c_in_any_phase_then_resume_gives_the_uninterrupted_run(data, straight, tmp_path, monkeypatch, phase):
    decided = decision_epoch(straight)
    call = {"before the decision": (decided - 2) * STEPS_PER_EPOCH + 2,
            "at the decision": decided * STEPS_PER_EPOCH,  # the last step of the epoch that decides
            "in the cool-down": decided * STEPS_PER_EPOCH + 2}[phase]
    run_dir = tmp_path / "run"
    ctrl_c_at_loss_call(monkeypatch, call)
    interrupted = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert interrupted.exit_code == 130, interrupted.output
    monkeypatch.undo()
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_run(run_dir, straight)


def test_kill_9_in_the_cooldown_then_resume_gives_the_uninterrupted_run(data, straight, tmp_path):
    decided = decision_epoch(straight)
    run_dir = tmp_path / "run"
    process = start_pausing_run(["--data-folder", data, "--run-dir", run_dir, *ARGS], tmp_path,
                                pause_at_step=decided * STEPS_PER_EPOCH + 2, pause_seconds=120)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert torch.load(run_dir / "last.pth", weights_only=True)["plateau"]["decision"]["epoch"] == decided
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_run(run_dir, straight)


@pytest.mark.parametrize("extra, message", [
    (["--schedule", "cosine"], "--until plateau needs a schedule that can end at any time"),
    (["--probe-every", "0"], "--probe-every must be positive"),
    (["--cooldown-fraction", "1.5"], "--cooldown-fraction must be in (0, 1)"),
    (["--plateau-patience", "0"], "--plateau-patience must be in (0, 1)"),
])
def test_bad_plateau_options_are_refused_before_anything_is_written(data, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS, *extra])
    assert result.exit_code != 0 and message in one_line_error(result)
    assert not run_dir.exists()


def test_until_plateau_without_a_val_folder_is_refused(tmp_path):
    data = write_image_folder(tmp_path / "only" / "train", 6, size=20, seed=4)
    run_dir = tmp_path / "run"
    result = invoke(["--data-folder", data, "--run-dir", run_dir, *ARGS])
    assert result.exit_code != 0 and "it needs a val folder" in one_line_error(result)
    assert not any(run_dir.glob("*.pth")) if run_dir.exists() else True


def test_recorded_config_keeps_the_choice(straight):
    options = yaml.safe_load((straight / "config.yaml").read_text())
    assert options["until"] == "plateau" and options["probe_every"] == 1 and options["schedule"] is None


def test_a_run_that_ends_while_its_live_probe_still_rises_says_so(data, tmp_path, monkeypatch):
    """The end-of-run warning, with the rule's verdict forced (a tiny run's probe is 100% from the start): what
    it reports is the trend still_rising found on the run's own probes."""
    import supcon.train as train_module
    from supcon.stopping import Trend

    seen = []

    def rising(probes, last_epoch):
        seen.append((len(probes), last_epoch))
        return Trend(first_epoch=3, last_epoch=6, probes=4, slope=0.01, standard_error=0.002, kind="residual")

    monkeypatch.setattr(train_module, "still_rising", rising)
    args = [a for a in ARGS if a not in ("--until", "plateau")]
    args[args.index("--epochs") + 1] = "6"
    result = invoke(["--data-folder", data, "--run-dir", tmp_path / "run", *args])
    assert result.exit_code == 0, result.output
    assert seen == [(6, 6)]  # every epoch's live probe, at the run's end
    warning = [line[9:] for line in result.output.splitlines() if "still rising" in line]  # after the time stamp
    assert warning == ["the live probe was still rising when the run ended: +3.0 points over epochs 3-6 (4 probes; "
                       "as long again at that pace: +6.0, one standard error 1.2), so the encoder had probably not "
                       "settled; to train longer, train a new run with a larger --epochs (a --schedule wsd run takes a "
                       "larger --epochs on --resume until its cool-down begins)"]
