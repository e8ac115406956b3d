"""A frozen encoder: rebuilt from a checkpoint, run over images on a device.

The layer below both ``linear_probe`` (probes, check-accuracies, reports) and the classical baselines
(``supcon.baseline.classical_features``), which take features of the same frozen encoders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from supcon.data import EvalDataset, make_loader
from supcon.errors import UserError
from supcon.models import build_encoder


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


@torch.no_grad()
def encode_samples(encoder: nn.Module, samples: Sequence[tuple[str, int]], transform, device: torch.device,
                   batch_size: int = 256, num_workers: int = 0, progress: bool = False,
                   desc: str = "encoding") -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` of ``samples`` through the frozen encoder."""
    from tqdm.auto import tqdm

    encoder.eval()
    loader = make_loader(EvalDataset(samples, transform), num_workers, device.type == "cuda",
                         batch_size=batch_size, shuffle=False)
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        features.append(encoder(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels).long()
