"""Atomic checkpoint writes, safe loading, RNG state round trips."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from supcon import checkpoint
from supcon.checkpoint import atomic_save, atomic_write_bytes, rng_state, safe_load, set_rng_state
from supcon.errors import UserError
from supcon.rundir import load_supcon_checkpoint


@pytest.fixture
def previous(tmp_path):
    """A good checkpoint already on disk, and its bytes."""
    path = tmp_path / "last.pth"
    torch.save({"epoch": 1, "weight": torch.arange(4.0)}, path)
    return path, path.read_bytes()


def test_crash_inside_torch_save_leaves_the_previous_file_and_no_temp_file(previous, monkeypatch):
    path, before = previous

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"epoch": 2, "weight": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert safe_load(path)["epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_crash_after_writing_bytes_leaves_the_previous_file(previous, monkeypatch, failing):
    path, before = previous

    def fail(*args, **kwargs):
        raise OSError(f"{failing} failed")

    monkeypatch.setattr(checkpoint.os, failing, fail)
    with pytest.raises(OSError, match=f"{failing} failed"):
        atomic_write_bytes(b"new checkpoint bytes", path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]


def test_atomic_save_replaces_the_file(previous):
    path, _ = previous
    atomic_save({"epoch": 2, "weight": torch.ones(4)}, path)
    state = safe_load(path)
    assert state["epoch"] == 2 and torch.equal(state["weight"], torch.ones(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]


def test_safe_load_refuses_truncated_and_missing_files(previous, tmp_path):
    path, before = previous
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(before[: len(before) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        safe_load(truncated)
    with pytest.raises(UserError, match="checkpoint not found"):
        safe_load(tmp_path / "nothing.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_safe_load_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(UserError, match="needs arbitrary unpickling"):
        safe_load(path)


def test_load_checkpoint_refuses_other_files(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not a supcon-train checkpoint"):
        load_supcon_checkpoint(path)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pth"
    torch.save({"rng": rng_state()}, path)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])
