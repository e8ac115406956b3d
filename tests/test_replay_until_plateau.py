"""scripts/replay_until_plateau.py: the rule replayed on a fixed WSD run decides as a real --until plateau run does,
because both train identically until the rule fires (the benchmark's until-plateau figures rely on it)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import write_image_folder
from tests.test_bench_scripts import load_script
from tests.test_resume import invoke

COMMON = ["--model", "test_resnet", "--small-input", "--size", "16", "--batch-size", "4", "--num-workers", "0",
          "--knn-every", "0", "--quiet", "--epochs", "24", "--save-freq", "1", "--seed", "3", "--probe-every", "1"]
TOLERANCE = "0.2"  # 12 val images: half an image is 4 points (see test_until_plateau)


def test_the_replay_on_a_fixed_wsd_run_finds_the_epoch_a_real_until_plateau_run_chose(tmp_path):
    data = write_image_folder(tmp_path / "train", 6, size=20, seed=4)
    write_image_folder(tmp_path / "val", 4, size=20, seed=5)
    fixed, until = tmp_path / "wsd", tmp_path / "until"
    assert invoke(["--data-folder", data, "--run-dir", fixed, *COMMON, "--schedule", "wsd"]).exit_code == 0
    result = invoke(["--data-folder", data, "--run-dir", until, *COMMON, "--until", "plateau",
                     "--plateau-tolerance", TOLERANCE])
    assert result.exit_code == 0, result.output
    decided = torch.load(until / "last.pth", weights_only=True)["plateau"]["decision"]
    assert decided["epoch"] < 24 - 5  # before the fixed run's cool-down (epochs 20-24)

    script = load_script("replay_until_plateau")
    rows = script.main([str(fixed), "--patience", "0.5", "--tolerance", TOLERANCE])
    assert [row[4] for row in rows] == [decided["epoch"]] and rows[0][1] == "yes"
    assert rows[0][6] == decided["reason"]
    # the same weights at the decision: the rule only watches
    at = f"ckpt_epoch_{decided['epoch']}.pth"
    a, b = (torch.load(Path(d) / at, weights_only=True)["encoder"] for d in (fixed, until))
    assert all(torch.equal(a[k], b[k]) for k in a)
