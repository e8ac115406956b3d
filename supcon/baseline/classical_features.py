"""What the classical baselines are fit on: the feature sources of ``baseline-train --features``.

- ``pixels`` (default): the images through the evaluation transform (resize the short side to
  ``--size``, centre crop, normalise with the per-channel mean/std), flattened. ``--size`` must be
  small (at most :data:`MAX_PIXEL_SIZE`): 8 for scikit-learn's 8x8 digits.
- ``timm:NAME``: the pooled features of a frozen timm backbone at ``--size`` (weights from
  ``--pretrained-file``, or ``--pretrained`` to download them).
- ``run:RUN``: the frozen encoder of one of our SupCon runs, at the size and mean/std that run
  recorded: the checkpoint probe-all selected on val (``RUN/probe/selection.json``), or, for a run
  never probed, its newest ``ckpt_epoch_N.pth``; or ``run:FILE.pth``, that checkpoint.

Network features are standardised per dimension with the training set's mean and std; pixels
are not (they share one unit, and per-pixel scaling blows up the near-constant border pixels:
on the demo's 8 px digits it lowered the best val accuracy of the SVM from 100% to 99.4%, of kNN
from 99.2% to 97.2%).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supcon.baseline.config import BaselineConfig
from supcon.checkpoint import file_sha256
from supcon.data import eval_transform
from supcon.errors import UserError
from supcon.frozen import build_frozen_encoder, encode_samples
from supcon.models import build_encoder
from supcon.rundir import (
    CONFIG_FILE,
    HEADS_DIR,
    PROBE_DIR,
    SELECTION_FILE,
    epoch_checkpoints,
    load_supcon_checkpoint,
    read_config,
    selected_checkpoint,
)

logger = logging.getLogger(__name__)

PIXELS = "pixels"
#: Largest ``--size`` for pixel features (64 x 64 x 3 = 12,288 numbers per image).
MAX_PIXEL_SIZE = 64


@dataclass
class Extractor:
    """What turns images into feature vectors: an encoder (``nn.Flatten`` for pixels) and its preprocessing."""

    encoder: nn.Module
    size: int
    mean: list[float]
    std: list[float]
    encoder_config: dict[str, Any] | None  # None: pixels
    description: str  # e.g. "8 px pixels", "resnet50 features (pretrained)"
    source: dict[str, Any]

    @property
    def standardize(self) -> bool:
        return self.encoder_config is not None

    def to_state(self) -> dict[str, Any]:
        state = {"encoder_config": self.encoder_config, "size": self.size, "mean": self.mean, "std": self.std,
                 "source": self.source}
        if self.encoder_config is not None:
            state["encoder"] = {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}
        return state


def parse_features(text: str) -> tuple[str, str | None]:
    """``pixels`` -> ``("pixels", None)``; ``timm:NAME`` / ``run:PATH`` -> ``(kind, NAME or PATH)``.

    Raises:
        UserError: anything else.
    """
    text = (text or PIXELS).strip()
    if text == PIXELS:
        return PIXELS, None
    kind, _, value = text.partition(":")
    if kind in ("timm", "run") and value.strip():
        return kind, value.strip()
    raise UserError(f"--features must be 'pixels', 'timm:MODEL' (e.g. timm:resnet50) or 'run:RUN' (a supcon-train "
                    f"run directory or checkpoint), got {text!r}")


def check_features(config: BaselineConfig) -> tuple[str, str | None]:
    """The parsed ``--features``, checked before any image is read.

    Raises:
        UserError: a malformed value, pixels at a large ``--size``, or a missing ``--pretrained-file``.
    """
    kind, value = parse_features(config.features)
    if kind == PIXELS and config.size > MAX_PIXEL_SIZE:
        raise UserError(f"--features pixels at --size {config.size} gives {3 * config.size ** 2:,} numbers per "
                        f"image; give a small --size (at most {MAX_PIXEL_SIZE}, e.g. 8 for 8x8 digits)")
    if config.pretrained_file and not Path(config.pretrained_file).is_file():
        raise UserError(f"--pretrained-file not found: {config.pretrained_file}")
    return kind, value


def build_extractor(config: BaselineConfig, mean: list[float] | None, std: list[float] | None) -> Extractor:
    """The feature extractor ``config.features`` names (frozen, in ``eval()``).

    ``mean``/``std``: the training folder's (used by pixels and timm features; a SupCon run brings its own).

    Raises:
        UserError: a too-large ``--size`` for pixels, an unknown timm model, a missing weights file, or a
            run/checkpoint that cannot be read.
    """
    kind, value = check_features(config)
    if kind == PIXELS:
        return Extractor(nn.Flatten(), config.size, list(mean), list(std), None, f"{config.size} px pixels",
                         {"features": PIXELS})
    if kind == "timm":
        encoder = build_encoder(value, pretrained=config.pretrained, small_input=config.small_input,
                                pretrained_file=config.pretrained_file)
        weights = "pretrained" if config.pretrained or config.pretrained_file else "random init"
        if weights == "random init":
            logger.warning("timm:%s has no weights (give --pretrained-file or --pretrained): its features are "
                           "those of a randomly initialised network", value)
        encoder_config = {"model": value, "small_input": bool(config.small_input), "zero_init_last": False}
        source = {"features": f"timm:{value}", "pretrained": bool(config.pretrained),
                  "pretrained_file": str(Path(config.pretrained_file).resolve()) if config.pretrained_file else None}
        return Extractor(_frozen(encoder), config.size, list(mean), list(std), encoder_config,
                         f"{value} features ({weights})", source)
    return _run_extractor(value)


def _frozen(encoder: nn.Module) -> nn.Module:
    encoder.requires_grad_(False)
    return encoder.eval()


def _run_checkpoint(path: Path) -> Path:
    """A SupCon run's checkpoint to take features from (a checkpoint file is taken as given).

    A probed run gives the checkpoint probe-all selected on val (``RUN/probe/selection.json``); a run
    never probed gives its newest ``ckpt_epoch_N.pth``.

    Raises:
        UserError: not a run nor a checkpoint; a probed run whose selected checkpoint changed since; a
            run without checkpoints.
    """
    if path.is_file():
        return path
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"--features run:{path}: not a run directory nor a checkpoint file")
    if (path / PROBE_DIR / SELECTION_FILE).is_file() or any((path / PROBE_DIR / HEADS_DIR).glob("*.pth")):
        checkpoint, selection = selected_checkpoint(path, f"--features run:{path}")
        logger.info("run:%s: using %s, the checkpoint probe-all selected on val (%s, val %.2f%%)", path,
                    checkpoint.name, selection.get("rule"), 100 * float(selection.get("val_accuracy") or 0.0))
        return checkpoint
    numbered = epoch_checkpoints(path)
    if not numbered:
        raise UserError(f"--features run:{path}: the run has no ckpt_epoch_N.pth checkpoint")
    chosen = list(numbered.values())[-1]
    logger.info("run:%s: not probed; using its newest checkpoint %s", path, chosen.name)
    return chosen


def _run_extractor(value: str) -> Extractor:
    path = _run_checkpoint(Path(value).expanduser())
    state = load_supcon_checkpoint(path)
    encoder = build_frozen_encoder(state, path)
    model_config = state["model_config"]
    encoder_config = {"model": model_config["model"], "small_input": bool(model_config.get("small_input", False)),
                      "zero_init_last": bool(model_config.get("zero_init_last", False))}
    size = int((state.get("config") or {}).get("size") or read_config(path.parent).get("size"))
    epoch = int(state.get("epoch", 0))
    source = {"features": f"run:{value}", "checkpoint": str(path.resolve()),
              "checkpoint_sha256": file_sha256(path), "backbone_epoch": epoch}
    return Extractor(encoder, size, list(state["mean"]), list(state["std"]), encoder_config,
                     f"SupCon {encoder_config['model']} epoch {epoch} features", source)


def extractor_from_state(state: dict[str, Any], path: Path) -> Extractor:
    """Rebuild the extractor a classical ``best.pth`` recorded."""
    features = state["features"]
    if features["encoder_config"] is None:
        encoder: nn.Module = nn.Flatten()
    else:
        encoder = build_frozen_encoder({"model_config": features["encoder_config"], "encoder": features["encoder"]},
                                       path)
    return Extractor(encoder, int(features["size"]), list(features["mean"]), list(features["std"]),
                     features["encoder_config"], state.get("description", ""), dict(features["source"]))


def extract(extractor: Extractor, samples: list[tuple[str, int]], device: torch.device, batch_size: int,
            num_workers: int, progress: bool, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D] float64 on the CPU, labels [N])`` of ``samples``."""
    encoder = extractor.encoder.to(device)
    features, labels = encode_samples(encoder, samples, eval_transform(extractor.size, extractor.mean, extractor.std),
                                      device, batch_size, num_workers, progress, desc=f"features of {what}")
    return features.double(), labels
