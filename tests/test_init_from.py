"""``baseline-train --init-from``: the supervised fine-tune starts from a SupCon run's selected (or named) encoder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from linear_probe.cli import check_accuracies_main
from supcon.baseline.cli import main as baseline_main
from tests.probe_helpers import copy_run, invoke, one_line_error, probed_run, snapshot

FT_ARGS = ["--model", "test_resnet", "--small-input", "--size", "32", "--batch-size", "12", "--epochs", "1",
           "--num-workers", "0", "--augment", "none", "--quiet"]


@pytest.fixture(scope="module")
def supcon_run(trained_run, tmp_path_factory):
    return probed_run(trained_run, tmp_path_factory)


def backbone_weights(path):
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state["encoder"].items() if v.dtype.is_floating_point and "running" not in k}


def test_probe_all_records_the_selected_checkpoint_for_later_stages(supcon_run):
    selection = json.loads((supcon_run / "probe" / "selection.json").read_text())
    assert selection["rule"] == "trend"
    assert (supcon_run / selection["checkpoint"]).is_file()
    assert selection["backbone_epoch"] == torch.load(supcon_run / selection["checkpoint"],
                                                     weights_only=True)["epoch"]


def test_fine_tune_starts_from_the_selected_supcon_encoder(supcon_run, image_root, tmp_path):
    run_dir = tmp_path / "ft"
    result = invoke(baseline_main, ["--data-folder", image_root / "train", "--init-from", supcon_run,
                                    "--run-dir", run_dir, *FT_ARGS, "--learning-rate", "1e-12"])
    assert result.exit_code == 0, result.output
    selection = json.loads((supcon_run / "probe" / "selection.json").read_text())
    start = backbone_weights(supcon_run / selection["checkpoint"])
    after = backbone_weights(run_dir / "last.pth")
    assert start.keys() == after.keys()
    for name, tensor in start.items():  # one step at lr 1e-12 leaves the SupCon weights where they were
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6)
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["init_from"]["checkpoint"] == str(supcon_run / selection["checkpoint"])
    assert info["init_from"]["backbone_epoch"] == selection["backbone_epoch"]
    assert f"fine-tuned from SupCon {supcon_run.name} epoch {selection['backbone_epoch']}" in info["description"]

    scratch = tmp_path / "scratch"
    assert invoke(baseline_main, ["--data-folder", image_root / "train", "--run-dir", scratch, *FT_ARGS]).exit_code == 0
    table = invoke(check_accuracies_main, ["--run", supcon_run, "--run", run_dir, "--run", scratch, "--output",
                                           tmp_path, "--bootstrap", "0", "--quiet", "--num-workers", "0"])
    assert table.exit_code == 0, table.output
    assert f"fine-tuned from SupCon {supcon_run.name} epoch {selection['backbone_epoch']}" in table.stdout
    # one verdict per SupCon-based run, against the supervised run from scratch
    verdicts = [line for line in table.stdout.splitlines() if "the best supervised run scratch" in line]
    assert len(verdicts) == 2 and {line.split(" (")[0] for line in verdicts} == {"- tiny_run", "- ft"}
    assert all(any(w in line for w in ("beats", "ties with", "loses to"))
               and "McNemar's exact test on accuracy p=" in line for line in verdicts)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["verdict"]["rival"] == "scratch" and len(metrics["predictions"]) == len(metrics["labels"]) == 18


def test_a_named_checkpoint_is_used_as_named(supcon_run, image_root, tmp_path):
    named = supcon_run / "ckpt_epoch_2.pth"
    run_dir = tmp_path / "ft2"
    result = invoke(baseline_main, ["--data-folder", image_root / "train", "--init-from", named, "--run-dir", run_dir,
                                    *FT_ARGS, "--learning-rate", "1e-12"])
    assert result.exit_code == 0, result.output
    start, after = backbone_weights(named), backbone_weights(run_dir / "last.pth")
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in start.items())
    info = yaml.safe_load((run_dir / "config.yaml").read_text())["run_info"]
    assert info["init_from"]["backbone_epoch"] == 2 and info["init_from"]["chosen"] == "named"


def test_without_init_from_the_backbone_is_not_the_supcon_one(supcon_run, image_root, tmp_path):
    """The check above could pass by accident only if a fresh init equalled the SupCon weights: it does not."""
    run_dir = tmp_path / "scratch"
    assert invoke(baseline_main, ["--data-folder", image_root / "train", "--run-dir", run_dir, *FT_ARGS,
                                  "--learning-rate", "1e-12"]).exit_code == 0
    start, after = backbone_weights(supcon_run / "ckpt_epoch_2.pth"), backbone_weights(run_dir / "last.pth")
    assert not all(torch.allclose(after[k], v, atol=1e-3) for k, v in start.items())


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet18", "--size", "32"], "trained as model 'test_resnet' (pass --model test_resnet)"),
    (["--size", "24"], "32 px images (pass --size 32)"),
    (["--no-small-input"], "the small-input stem (pass --small-input)"),
])
def test_a_checkpoint_of_another_network_or_size_is_refused(supcon_run, image_root, tmp_path, args, message):
    run_dir = tmp_path / "refused"
    before = snapshot(supcon_run)
    result = invoke(baseline_main, ["--data-folder", image_root / "train", "--init-from", supcon_run,
                                    "--run-dir", run_dir, *FT_ARGS, *args])
    assert result.exit_code != 0
    assert message in one_line_error(result)
    assert not run_dir.exists() or not any(run_dir.glob("*.pth"))
    assert snapshot(supcon_run) == before


def test_a_run_never_probed_is_refused_with_what_to_run(trained_run, image_root, tmp_path):
    unprobed = copy_run(trained_run, tmp_path / "unprobed")
    result = invoke(baseline_main, ["--data-folder", image_root / "train", "--init-from", unprobed,
                                    "--run-dir", tmp_path / "ft", *FT_ARGS])
    assert result.exit_code != 0
    line = one_line_error(result)
    assert "never probed" in line and f"probe-all --run {unprobed}" in line


@pytest.mark.parametrize("args, message", [
    (["--init-from", "/no/such/run"], "--init-from not found: /no/such/run"),
    (["--init-from", "RUN", "--pretrained-file", "x.pth"], "cannot be combined with --pretrained-file"),
])
def test_bad_init_from_options(image_root, tmp_path, args, message):
    result = invoke(baseline_main, ["--data-folder", image_root / "train", "--run-dir", tmp_path / "ft", *FT_ARGS,
                                    *args])
    assert result.exit_code != 0
    assert message in one_line_error(result)
