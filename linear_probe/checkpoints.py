"""Which checkpoints of a run to probe, and whether a checkpoint fits its run.

Content hashes (``FileStamp``) are :mod:`supcon.checkpoint`'s; the frozen encoder a checkpoint rebuilds is
:class:`linear_probe.features.FrozenCheckpoint`.

Every file is read with ``torch.load(weights_only=True)`` (``supcon.rundir.load_supcon_checkpoint``):
a file that would need arbitrary unpickling is refused and nothing in it runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supcon.checkpoint import file_sha256
from supcon.errors import UserError
from supcon.rundir import LAST, epoch_checkpoints, load_supcon_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to probe: its file, backbone epoch (completed epochs) and steps into the next."""

    name: str
    path: Path
    backbone_epoch: int
    steps_into_epoch: int = 0

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return self.backbone_epoch, self.steps_into_epoch, self.name


def format_backbone_epoch(backbone_epoch: int, steps_into_epoch: int = 0) -> str:
    """``"700"``, or ``"700 + 12 steps"`` for a mid-epoch ``last.pth``."""
    return f"{backbone_epoch} + {steps_into_epoch} steps" if steps_into_epoch else str(backbone_epoch)


def _state_position(state: dict[str, Any]) -> tuple[int, int]:
    epoch_state = state.get("epoch_state") or {}
    return int(state.get("epoch", 0)), int(epoch_state.get("steps_done", 0) or 0)


def _same_bytes(path: Path, other: Path) -> bool:
    """True when both files hold the same bytes; False when ``path`` is gone (e.g. deleted by ``--keep-last``)."""
    try:
        return path.stat().st_size == other.stat().st_size and file_sha256(path) == file_sha256(other)
    except FileNotFoundError:
        return False


def find_checkpoints(run_dir: str | os.PathLike, from_epoch: int = 0,
                     to_epoch: int | None = None) -> list[CheckpointRef]:
    """The run's checkpoints with ``from_epoch <= backbone epoch <= to_epoch``, oldest first.

    ``ckpt_epoch_<N>.pth`` files count by their ``N``; ``last.pth`` is added when it holds a state
    no numbered checkpoint holds (same bytes means same state), by the epochs it completed.

    Raises:
        UserError: no checkpoint at all, or none in the range (lists the epochs that exist);
            an unsafe or corrupt ``last.pth``.
    """
    run_dir = Path(run_dir)
    numbered = epoch_checkpoints(run_dir)
    refs = [CheckpointRef(path.name, path, epoch) for epoch, path in numbered.items()]
    last_path = run_dir / LAST
    last_note = ""
    if last_path.is_file():
        duplicate = any(_same_bytes(p, last_path) for p in numbered.values())
        if not duplicate:
            epoch, steps = _state_position(load_supcon_checkpoint(last_path))
            refs.append(CheckpointRef(LAST, last_path, epoch, steps))
            last_note = f" (last.pth: {format_backbone_epoch(epoch, steps)})"
    if not refs:
        raise UserError(f"run {run_dir} has no checkpoints (no ckpt_epoch_<N>.pth, no last.pth)")
    upper = float("inf") if to_epoch is None else to_epoch
    chosen = sorted((r for r in refs if from_epoch <= r.backbone_epoch <= upper), key=lambda r: r.sort_key)
    if not chosen:
        existing = ", ".join(str(e) for e in numbered) or "none"
        bound = f"[{from_epoch}, {to_epoch if to_epoch is not None else 'end'}]"
        raise UserError(
            f"run {run_dir} has no checkpoint with backbone epoch in {bound}; epochs with checkpoints: "
            f"{existing}{last_note}"
        )
    return chosen


def check_checkpoint(state: dict[str, Any], path: str | os.PathLike, model_config: dict[str, Any],
                     class_names: list[str]) -> None:
    """Refuse a checkpoint of another architecture or class list than the run's.

    Raises:
        UserError: the checkpoint's model config or class names differ from the run's.
    """
    own_config = state.get("model_config") or {}
    if model_config and own_config != model_config:
        diffs = ", ".join(
            f"{k}: {own_config.get(k)!r} vs run {model_config.get(k)!r}"
            for k in sorted(set(own_config) | set(model_config)) if own_config.get(k) != model_config.get(k)
        )
        raise UserError(f"checkpoint {path} is of a different architecture than its run ({diffs})")
    own_classes = list(state.get("class_names") or [])
    if class_names and own_classes and own_classes != class_names:
        raise UserError(f"checkpoint {path} was trained on classes {own_classes}, the run records {class_names}")


def assert_encoder_unchanged(encoder: nn.Module, reference: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Check the frozen encoder still equals the checkpoint's weights (MoCo-v3's sanity check).

    Raises:
        RuntimeError: a tensor changed (a bug: the probe must never train the encoder).
    """
    for key, value in encoder.state_dict().items():
        if not torch.equal(value.detach().cpu(), reference[key].cpu()):
            raise RuntimeError(f"the frozen encoder of {path} changed during probing ({key})")
