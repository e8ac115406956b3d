"""Probe results on disk: one head file per (checkpoint, probe settings) under ``RUN/probe/heads/``.

A head file holds the head's weights beside everything the table and the selection need (which
checkpoint, its content stamp, backbone epoch, best val accuracy and head epoch, the settings and
the per-epoch curves). Only tensors, numbers, strings, lists and dicts go in, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supcon.checkpoint import FileStamp, atomic_save, safe_load
from supcon.errors import UserError
from supcon.rundir import HEADS_DIR

logger = logging.getLogger(__name__)

HEAD_FORMAT = "linear-probe-head"
HEAD_VERSION = 1
#: The head file's key of the head at the last head epoch (files written before it existed lack it).
FINAL_STATE_DICT = "final_state_dict"


@dataclass
class HeadRecord:
    """One probed (checkpoint, head): the row of the probe table and a candidate for selection."""

    checkpoint: str
    checkpoint_stamp: FileStamp
    backbone_epoch: int
    steps_into_epoch: int
    best_val_accuracy: float
    best_head_epoch: int
    best_val_loss: float
    settings: dict[str, Any]
    settings_key: str
    class_names: list[str]
    val_folder: str
    train_folder: str
    num_train: int
    num_val: int
    feature_dim: int
    val_accuracy_per_epoch: list[float] = field(default_factory=list)
    val_loss_per_epoch: list[float] = field(default_factory=list)
    train_loss_per_epoch: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: L-BFGS heads: the C chosen on val; their per-epoch lists hold one value per C of the grid.
    regularization_c: float | None = None
    path: Path | None = None

    def to_state(self, state_dict: dict[str, torch.Tensor],
                 final_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        state = {k: v for k, v in vars(self).items() if k not in ("checkpoint_stamp", "path")}
        state.update(format=HEAD_FORMAT, version=HEAD_VERSION, checkpoint_stamp=self.checkpoint_stamp.to_dict(),
                     state_dict=state_dict)
        if final_state_dict:
            state[FINAL_STATE_DICT] = final_state_dict
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], path: Path) -> HeadRecord:
        fields = {k: v for k, v in state.items()
                  if k not in ("format", "version", "state_dict", FINAL_STATE_DICT, "checkpoint_stamp")}
        return cls(checkpoint_stamp=FileStamp(**state["checkpoint_stamp"]), path=path, **fields)


def head_file_name(checkpoint: str, settings_key: str) -> str:
    return f"{Path(checkpoint).stem}__{settings_key}.pth"


def save_head(probe_dir: str | os.PathLike, record: HeadRecord, state_dict: dict[str, torch.Tensor],
              final_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a head file atomically (the best head, and the final one if given); returns its path (also set on
    ``record.path``)."""
    path = Path(probe_dir) / HEADS_DIR / head_file_name(record.checkpoint, record.settings_key)
    atomic_save(record.to_state(state_dict, final_state_dict), path)
    record.path = path
    return path


def load_head_state(path: str | os.PathLike) -> dict[str, Any]:
    """A head file's contents (``weights_only``).

    Raises:
        UserError: unsafe, corrupt, or not a head file.
    """
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise UserError(f"{path} is not a probe-all head file")
    return state


def load_head_record(path: str | os.PathLike) -> HeadRecord:
    return HeadRecord.from_state(load_head_state(path), Path(path))


def load_head_records(probe_dir: str | os.PathLike, run_dir: str | os.PathLike) -> list[HeadRecord]:
    """Every head of a run whose checkpoint still holds the content it was probed on.

    Heads of a checkpoint that has since changed (a ``last.pth`` that training moved on) or been
    deleted are left out, with a log line.

    Raises:
        UserError: a head file that is unsafe or corrupt.
    """
    records = []
    for path in sorted((Path(probe_dir) / HEADS_DIR).glob("*.pth")):
        record = load_head_record(path)
        if not record.checkpoint_stamp.matches(Path(run_dir) / record.checkpoint):
            logger.info("ignoring head %s: its checkpoint %s has changed or gone since it was probed", path.name,
                        record.checkpoint)
            continue
        records.append(record)
    return records
