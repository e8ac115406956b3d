"""Which checkpoints of a run to probe, their content hashes, and the frozen encoder they rebuild.

Every file is read with ``torch.load(weights_only=True)`` (``supcon.rundir.load_supcon_checkpoint``):
a file that would need arbitrary unpickling is refused and nothing in it runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supcon.errors import UserError
from supcon.models import build_encoder
from supcon.rundir import LAST, epoch_checkpoints, load_supcon_checkpoint

logger = logging.getLogger(__name__)

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time in this process)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


@dataclass(frozen=True)
class FileStamp:
    """A file's identity: content hash, plus size and mtime for a quick "unchanged" check."""

    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        stat = Path(path).stat()
        return cls(file_sha256(path), stat.st_size, stat.st_mtime_ns)

    def matches(self, path: str | os.PathLike) -> bool:
        """True when ``path`` still holds this content (same size and mtime, or else same hash)."""
        path = Path(path)
        if not path.is_file():
            return False
        stat = path.stat()
        if stat.st_size != self.size:
            return False
        return stat.st_mtime_ns == self.mtime_ns or file_sha256(path) == self.sha256

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "mtime_ns": self.mtime_ns}


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
        last_size = last_path.stat().st_size
        duplicate = any(
            p.stat().st_size == last_size and file_sha256(p) == file_sha256(last_path) for p in numbered.values()
        )
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


def build_frozen_encoder(state: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    """Rebuild the checkpoint's encoder (projection head dropped), frozen and in ``eval()``.

    Like MoCo-v3's linear evaluation, the load asserts exactly which keys were missing: none,
    since the encoder has no classifier (``num_classes=0``).

    Raises:
        UserError: the weights do not fit the recorded architecture (names the first keys or shapes).
    """
    model_config = state.get("model_config") or {}
    if "model" not in model_config or "encoder" not in state:
        raise UserError(f"checkpoint {path} has no model_config/encoder entry; it was not written by supcon-train")
    encoder = build_encoder(model_config["model"], small_input=bool(model_config.get("small_input", False)),
                            zero_init_last=bool(model_config.get("zero_init_last", False)))
    weights = state["encoder"]
    own = encoder.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit a {model_config['model']} encoder: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    wrong = [k for k in own if tuple(own[k].shape) != tuple(weights[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"checkpoint {path} does not fit a {model_config['model']} encoder: {k} has shape "
            f"{tuple(weights[k].shape)}, the model expects {tuple(own[k].shape)} ({len(wrong)} tensors differ)"
        )
    result = encoder.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    encoder.requires_grad_(False)
    return encoder.eval()


def assert_encoder_unchanged(encoder: nn.Module, reference: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Check the frozen encoder still equals the checkpoint's weights (MoCo-v3's sanity check).

    Raises:
        RuntimeError: a tensor changed (a bug: the probe must never train the encoder).
    """
    for key, value in encoder.state_dict().items():
        if not torch.equal(value.detach().cpu(), reference[key].cpu()):
            raise RuntimeError(f"the frozen encoder of {path} changed during probing ({key})")
