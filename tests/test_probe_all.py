"""probe-all end to end through its CLI: files, table, skipping, ranges, --augment, --from auto, bad input."""

import csv
import json
import shutil

import pytest
import torch

from linear_probe.cli import probe_all_command
from linear_probe.config import ProbeConfig
from linear_probe.heads import load_head_state
from linear_probe.probe_all import probe_all
from supcon.checkpoint import safe_load
from tests.probe_helpers import (
    copy_run,
    edit_checkpoint,
    edit_run_config,
    invoke,
    one_line_error,
    probed_run,
    snapshot,
    write_malicious,
)


@pytest.fixture(scope="module")
def probed(trained_run, tmp_path_factory):
    return probed_run(trained_run, tmp_path_factory)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return copy_run(trained_run, tmp_path / "run")


@pytest.fixture
def probed_copy(probed, tmp_path):
    return copy_run(probed, tmp_path / "run")


def write_baseline_config(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: resnet18\nrun_info:\n  kind: baseline\n")
    return run_dir


def read_table(run):
    with open(run / "probe" / "probe_results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_probes_every_checkpoint_and_writes_every_file(run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --run defaults to the most recent run under ./runs
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.move(run_copy, runs / "tiny")
    run = runs / "tiny"
    write_baseline_config(runs / "newer_baseline")  # the newest run, but not a SupCon one: not picked
    result = invoke(probe_all_command, ["--num-workers", "0", "--quiet", "--head-solver", "sgd", "--epochs", "30"])
    assert result.exit_code == 0, result.stderr
    assert "| ckpt_epoch_2.pth | 2 |" in result.stdout and "| ckpt_epoch_4.pth | 4 |" in result.stdout
    assert "probed 2, skipped 0" in result.stdout
    assert "selection on val (check-accuracies --select trend): 2 probed checkpoints span" in result.stdout
    probe = run / "probe"
    rows = read_table(run)
    assert [(r["checkpoint"], r["backbone_epoch"]) for r in rows] == [("ckpt_epoch_2.pth", "2"),
                                                                      ("ckpt_epoch_4.pth", "4")]
    assert all(float(r["best_val_accuracy"]) >= 0.9 and 1 <= int(r["head_epoch"]) <= 30 for r in rows)
    markdown = (probe / "probe_results.md").read_text()
    assert ("| checkpoint | backbone epoch | best val accuracy [95% interval] | head epoch | settled val accuracy |"
            in markdown)
    # 18 val images all right: Wilson 95% interval [82.41%, 100%] (scipy; by hand 1 - 1.96^2 / (18 + 1.96^2))
    perfect = [line for line in markdown.splitlines() if line.startswith("| ckpt_epoch_") and "| 100.00% [" in line]
    assert all("| 100.00% [82.41, 100.00] |" in line for line in perfect)
    assert (probe / "probe_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((probe / "selection.json").read_text())["checkpoint"] in {"ckpt_epoch_2.pth", "ckpt_epoch_4.pth"}
    heads = sorted((probe / "heads").glob("*.pth"))
    assert [h.name.split("__")[0] for h in heads] == ["ckpt_epoch_2", "ckpt_epoch_4"]
    for head, row in zip(heads, rows, strict=True):
        state = safe_load(head)  # weights_only
        assert state["state_dict"]["weight"].shape == (3, state["feature_dim"])
        assert state["final_state_dict"]["weight"].shape == (3, state["feature_dim"])  # the last head epoch's
        assert state["best_val_accuracy"] == pytest.approx(float(row["best_val_accuracy"]), abs=1e-6)
        assert state["best_head_epoch"] == int(row["head_epoch"])
        assert len(state["val_accuracy_per_epoch"]) == 30
        assert state["settings"]["learning_rate"] == 0.25 and state["settings"]["batch_size"] == 256
    # train and val features of each checkpoint: four cache files
    assert len(list((probe / "cache").glob("features_*.pt"))) == 4


def test_rerun_skips_and_force_reprobes(probed_copy):
    heads = {p: p.stat().st_mtime_ns for p in (probed_copy / "probe" / "heads").glob("*.pth")}
    table = read_table(probed_copy)
    again = invoke(probe_all_command, ["--run", probed_copy, "--num-workers", "0", "--quiet"])
    assert again.exit_code == 0 and "probed 0, skipped 2" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in heads} == heads
    assert read_table(probed_copy) == table
    forced = invoke(probe_all_command, ["--run", probed_copy, "--num-workers", "0", "--quiet", "--force",
                                        "--from", "3"])
    assert forced.exit_code == 0 and "probed 1, skipped 0" in forced.stdout
    changed = [p.name for p in heads if p.stat().st_mtime_ns != heads[p]]
    assert len(changed) == 1 and changed[0].startswith("ckpt_epoch_4")


def test_new_head_settings_reuse_the_cached_features(probed_copy, monkeypatch):
    import linear_probe.features as features

    def no_encoding(*args, **kwargs):
        raise AssertionError("features were re-encoded")

    monkeypatch.setattr(features, "encode_samples", no_encoding)
    result = probe_all(ProbeConfig(run=str(probed_copy), num_workers=0, learning_rate=0.1, epochs=5, head_solver="sgd"))
    assert sorted(result.probed) == ["ckpt_epoch_2.pth", "ckpt_epoch_4.pth"]
    # both settings now in the table, told apart by a probe column
    assert len(read_table(probed_copy)) == 4
    assert "| probe |" in result.table_markdown and "lr 0.1, 5 ep" in result.table_markdown


def test_mid_epoch_last_pth_is_probed_as_its_own_state(run_copy):
    def mid_epoch(state):
        state["epoch_state"]["steps_done"] = 3
        state["encoder"]["bn1.bias"] += 0.01

    edit_checkpoint(run_copy / "last.pth", mid_epoch)
    result = probe_all(ProbeConfig(run=str(run_copy), num_workers=0, epochs=5, from_epoch=3, head_solver="sgd"))
    assert result.probed == ["ckpt_epoch_4.pth", "last.pth"]
    assert "| last.pth | 4 + 3 steps |" in result.table_markdown


def test_cached_and_augment_reach_similar_accuracy(run_copy):
    common = dict(run=str(run_copy), num_workers=0, from_epoch=4, epochs=6)
    cached = probe_all(ProbeConfig(**common, head_solver="sgd")).records
    augmented = [r for r in probe_all(ProbeConfig(**common, augment=True)).records if r.settings["augment"]]
    assert len(cached) == 1 and len(augmented) == 1
    assert cached[0].best_val_accuracy >= 0.9 and augmented[0].best_val_accuracy >= 0.9
    assert abs(cached[0].best_val_accuracy - augmented[0].best_val_accuracy) <= 0.12


def test_augment_checks_the_encoder_did_not_change(run_copy, monkeypatch):
    import linear_probe.features as module

    original = module.build_frozen_encoder

    def drift(module, inputs, output):  # a bug that changes the frozen encoder while probing
        module.bn1.running_mean.add_(0.1)

    def drifting_encoder(state, path):
        encoder = original(state, path)
        encoder.register_forward_hook(drift)
        return encoder

    monkeypatch.setattr(module, "build_frozen_encoder", drifting_encoder)
    with pytest.raises(RuntimeError, match="changed during probing"):
        probe_all(ProbeConfig(run=str(run_copy), num_workers=0, from_epoch=4, epochs=1, augment=True))


def test_from_auto_prints_the_choice_and_why(probed_copy):
    result = invoke(probe_all_command, ["--run", probed_copy, "--from", "auto", "--num-workers", "0", "--quiet"])
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("--from auto: backbone epoch"))
    assert "because the smoothed training loss" in line


# --- bad input: one line, non-zero exit, nothing written -------------------------------------------------


def assert_refused(args, expected, *folders):
    before = snapshot(*folders)
    result = invoke(probe_all_command, [*args, "--num-workers", "0", "--quiet", "--force"])
    assert result.exit_code != 0
    message = one_line_error(result)
    assert expected in message, message
    assert snapshot(*folders) == before
    return message


def test_no_run_found(tmp_path):
    (tmp_path / "runs").mkdir()
    assert_refused(["--runs-root", tmp_path / "runs"], "no run found under", tmp_path)


def test_not_a_run_directory(tmp_path):
    assert_refused(["--run", tmp_path], "is not a run directory", tmp_path)


def test_baseline_run_is_not_probed(tmp_path):
    baseline = write_baseline_config(tmp_path / "baseline")
    assert_refused(["--run", baseline], "is a 'baseline' run; probe-all works on SupCon runs", tmp_path)


def test_no_checkpoint_in_range_lists_the_epochs(probed_copy):
    message = assert_refused(["--run", probed_copy, "--from", "10"], "epochs with checkpoints: 2, 4", probed_copy)
    assert "[10, end]" in message


def test_checkpoint_of_other_architecture(probed_copy):
    edit_checkpoint(probed_copy / "ckpt_epoch_4.pth",
                    lambda s: s.update(model_config={**s["model_config"], "model": "resnet18"}))
    assert_refused(["--run", probed_copy], "is of a different architecture than its run", probed_copy)


def test_checkpoint_of_other_shape(probed_copy):
    edit_checkpoint(probed_copy / "ckpt_epoch_4.pth", lambda s: s["encoder"].update({"bn1.weight": torch.ones(5)}))
    assert_refused(["--run", probed_copy], "bn1.weight has shape (5,)", probed_copy)


def test_class_names_differ_in_val_folder(probed_copy, tmp_path):
    from tests.conftest import write_image_folder

    other = write_image_folder(tmp_path / "other_val", 2, classes={"ant": (0, 0, 0), "bee": (9, 9, 9),
                                                                   "cow": (90, 90, 90)})
    message = assert_refused(["--run", probed_copy, "--val-folder", other], "class names differ", probed_copy)
    assert "['cat', 'dog', 'fox']" in message and "['ant', 'bee', 'cow']" in message


def test_empty_val_folder(probed_copy, tmp_path):
    (tmp_path / "empty_val").mkdir()
    assert_refused(["--run", probed_copy, "--val-folder", tmp_path / "empty_val"], "has no class subfolders",
                   probed_copy)
    for name in ("cat", "dog", "fox"):
        (tmp_path / "empty_val" / name).mkdir()
    assert_refused(["--run", probed_copy, "--val-folder", tmp_path / "empty_val"], "has no images", probed_copy)


def test_missing_val_folder_asks_for_the_option(probed_copy, image_root, tmp_path):
    lonely = shutil.copytree(image_root / "train", tmp_path / "alone" / "train")

    def elsewhere(data):
        data["run_info"].update(data_folder=str(lonely), val_folder=None)

    edit_run_config(probed_copy, elsewhere)
    assert_refused(["--run", probed_copy], "pass --val-folder DIR", probed_copy)


def test_malicious_pickle_is_refused_and_never_runs(probed_copy, tmp_path):
    marker = tmp_path / "pwned"
    write_malicious(probed_copy / "ckpt_epoch_6.pth", marker)
    message = assert_refused(["--run", probed_copy], "needs arbitrary unpickling", probed_copy)
    assert "ckpt_epoch_6.pth" in message and "nothing in it was run" in message
    assert not marker.exists()
    # the head files are read the same way
    write_malicious(probed_copy / "probe" / "heads" / "ckpt_epoch_2__0000000000000000.pth", marker)
    with pytest.raises(Exception, match="needs arbitrary unpickling"):
        load_head_state(probed_copy / "probe" / "heads" / "ckpt_epoch_2__0000000000000000.pth")
    assert not marker.exists()


def test_bad_option_values(probed_copy):
    assert_refused(["--run", probed_copy, "--from", "soon"], "--from must be a backbone epoch", probed_copy)
    assert_refused(["--run", probed_copy, "--from", "4", "--to", "2"], "--to 2 is below --from 4", probed_copy)
    assert_refused(["--run", probed_copy, "--learning-rate", "0"], "--learning-rate must be positive", probed_copy)


# --- faults: corrupt checkpoints, two probe-all at once ---------------------------------------------------


def test_truncated_checkpoint_is_listed_left_alone_and_the_others_probed(run_copy):
    bad = run_copy / "ckpt_epoch_2.pth"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])  # cut short, as by a full disk
    damaged = bad.read_bytes()
    result = invoke(probe_all_command, [
        "--run", run_copy, "--num-workers", "0", "--quiet", "--head-solver", "sgd", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "not probed, unreadable (corrupt or truncated; left as they are): ckpt_epoch_2.pth" in result.stdout
    assert "skipping ckpt_epoch_2.pth: checkpoint" in result.stderr and "corrupt or truncated" in result.stderr
    assert [row["checkpoint"] for row in read_table(run_copy)] == ["ckpt_epoch_4.pth"]
    assert bad.read_bytes() == damaged  # never overwritten or deleted


@pytest.mark.parametrize("deleted", ["after listing", "after checking"])
def test_a_checkpoint_deleted_by_keep_last_while_probe_all_runs_is_skipped_with_a_note(run_copy, monkeypatch,
                                                                                      deleted):
    """--keep-last of a running training deletes ckpt_epoch_2.pth between two reads of probe-all."""
    import linear_probe.probe_all as probe_all_module

    victim = run_copy / "ckpt_epoch_2.pth"
    hooked = "find_checkpoints" if deleted == "after listing" else "probe_checkpoint"
    original = getattr(probe_all_module, hooked)

    def deleting(*args, **kwargs):
        if deleted == "after listing":
            listed = original(*args, **kwargs)
            victim.unlink()  # what the training's --keep-last does at that moment
            return listed
        victim.unlink(missing_ok=True)  # probe_checkpoint is called per checkpoint, the deleted one first
        return original(*args, **kwargs)

    monkeypatch.setattr(probe_all_module, hooked, deleting)
    result = invoke(probe_all_command, [
        "--run", run_copy, "--num-workers", "0", "--quiet", "--head-solver", "sgd", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert ("skipping ckpt_epoch_2.pth: it was deleted after probe-all listed it (a running training's --keep-last "
            "deletes older checkpoints)") in result.stderr
    assert "not probed, deleted while probe-all ran (a training's --keep-last): ckpt_epoch_2.pth" in result.stdout
    assert "Traceback" not in result.output and "corrupt" not in result.output
    assert [row["checkpoint"] for row in read_table(run_copy)] == ["ckpt_epoch_4.pth"]


def test_every_checkpoint_corrupt_is_one_line_error(run_copy):
    for path in run_copy.glob("*.pth"):
        path.write_bytes(b"PK\x03\x04 not a zip any more")
    assert_refused(["--run", run_copy], "every checkpoint in range is corrupt or truncated", run_copy)


def test_second_probe_all_on_a_run_in_use_is_refused_naming_the_first(run_copy):
    from tests.test_runlock import hold_in_another_process

    holder = hold_in_another_process(run_copy / "probe")  # as a probe-all that is running on this run
    try:
        message = assert_refused(["--run", run_copy], f"is in use by process {holder.pid}", run_copy)
        assert "the probe results of run" in message
    finally:
        holder.kill()
        holder.wait()


def test_two_probe_all_at_once_leave_complete_results(run_copy, tmp_path):
    """A real race: the second is refused while the first runs; the first's results and cache are whole."""
    import os
    import subprocess
    import sys
    import time

    log = tmp_path / "first.log"
    args = ["--run", str(run_copy), "--num-workers", "0", "--head-solver", "sgd", "--epochs", "800"]
    with open(log, "w") as stderr:
        first = subprocess.Popen([sys.executable, "-c", "from linear_probe.cli import probe_all_main; probe_all_main()",
                                  *args], stdout=subprocess.DEVNULL, stderr=stderr,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock = run_copy / "probe" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = invoke(probe_all_command, [*args, "--quiet"])
    first_running = first.poll() is None
    assert first.wait(timeout=600) == 0, log.read_text()
    if first_running:  # the usual case; on a very fast machine the first may have finished already
        assert second.exit_code != 0
        assert f"is in use by process {first.pid}" in one_line_error(second)
    assert [row["checkpoint"] for row in read_table(run_copy)] == ["ckpt_epoch_2.pth", "ckpt_epoch_4.pth"]
    for cache_file in (run_copy / "probe" / "cache").glob("*.pt"):
        assert safe_load(cache_file)["features"].ndim == 2  # every cache file loads whole
    rerun = invoke(probe_all_command, [*args, "--quiet"])
    assert rerun.exit_code == 0 and "skipped 2 already probed" in rerun.stdout
