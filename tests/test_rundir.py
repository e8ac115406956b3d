"""The run kind (``supcon.rundir.RunKind``): written as the plain string, read back by one function, the legacy
default for runs that recorded none, and one line for a kind this version does not know."""

from __future__ import annotations

import pytest
import torch
import yaml

from supcon.errors import UserError
from supcon.rundir import (
    CONFIG_FILE,
    RunKind,
    baseline_checkpoint,
    kind_from_run_info,
    make_run_info,
    read_config,
    run_kind,
    split_config,
    write_config,
)


def _run_info(kind: RunKind) -> dict:
    return make_run_info(kind, class_names=["cat", "dog"], data_folder="data/train", val_folder=None,
                         model_config={"model": "resnet18"}, num_processes=1, global_batch=4, steps_per_epoch=2,
                         bad_images_skipped=0, device="cpu")


@pytest.mark.parametrize("kind", list(RunKind))
def test_a_kind_is_written_as_its_plain_string_and_read_back_as_the_member(kind, tmp_path):
    write_config(tmp_path, {"epochs": 1}, _run_info(kind))
    text = (tmp_path / CONFIG_FILE).read_text()
    assert f"kind: {kind.value}\n" in text  # what runs written before the type hold, unchanged
    _, run_info = split_config(read_config(tmp_path))
    assert type(run_info["kind"]) is str
    assert kind_from_run_info(run_info) is kind and run_kind(tmp_path) is kind
    assert str(kind) == f"{kind}" == kind.value  # messages name the recorded string


def test_a_run_that_recorded_no_kind_is_a_supcon_run(tmp_path):
    run_info = {k: v for k, v in _run_info(RunKind.SUPCON).items() if k != "kind"}
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({"epochs": 1, "run_info": run_info}))
    assert kind_from_run_info(run_info) is RunKind.SUPCON
    assert run_kind(tmp_path) is RunKind.SUPCON


def test_an_unknown_kind_is_one_line_that_names_the_file_and_scans_skip_it(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({"run_info": {"kind": "simclr"}}))
    with pytest.raises(UserError, match=r"config.yaml records kind 'simclr', which this version does not know "
                                        r"\(supcon or baseline\)"):
        kind_from_run_info({"kind": "simclr"}, tmp_path)
    assert run_kind(tmp_path) is None
    assert run_kind(tmp_path / "missing") is None


def test_a_baseline_checkpoint_records_its_kind_as_a_plain_string(tmp_path):
    state = baseline_checkpoint(model_config={"model": "resnet18"}, description="d", encoder={}, head={}, epoch=1,
                                config={}, class_names=["a", "b"], mean=[0.5] * 3, std=[0.2] * 3, size=32,
                                best={"best_epoch": 1})
    torch.save(state, tmp_path / "best.pth")
    loaded = torch.load(tmp_path / "best.pth", weights_only=True)  # an enum member would not load here
    assert type(loaded["kind"]) is str and loaded["kind"] == RunKind.BASELINE
