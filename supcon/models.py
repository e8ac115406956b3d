"""The SupCon network: a timm encoder (classifier removed) and an MLP projection head.

A checkpoint stores ``model_config`` (a plain dict) beside the weights, so
``build_model(**model_config)`` or ``build_encoder(...)`` alone rebuilds the network for probing.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from supcon.errors import UserError

logger = logging.getLogger(__name__)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def adapt_small_input(encoder: nn.Module, model_name: str) -> None:
    """Make a stem suited to tiny (e.g. 32 px) images: 3x3 stride-1 first conv, no max-pool.

    This is the well-known CIFAR variant of ResNet. It needs the model's first conv (named by
    timm's ``first_conv`` config) to be a plain ``Conv2d``.

    Raises:
        UserError: the model's stem cannot be adapted.
    """
    first_conv_path = encoder.pretrained_cfg.get("first_conv") if hasattr(encoder, "pretrained_cfg") else None
    conv = _get_submodule(encoder, first_conv_path) if first_conv_path else None
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"--small-input is not supported for model {model_name!r} (no plain first convolution)")
    _set_submodule(
        encoder,
        first_conv_path,
        nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=conv.bias is not None),
    )
    if isinstance(getattr(encoder, "maxpool", None), nn.Module):
        encoder.maxpool = nn.Identity()


def _spelling(name: str) -> str:
    """A model name without case, dashes, underscores or dots: ``ResNet-18`` and ``resnet18`` spell alike."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def similar_model_names(name: str, known: Iterable[str] | None = None, limit: int = 5) -> list[str]:
    """Known model names close to ``name``: the same spelling first, then close matches (difflib).

    Args:
        name: what the user typed.
        known: the names to search [default: every timm model].
        limit: at most this many.
    """
    by_spelling: dict[str, str] = {}
    for candidate in (timm.list_models() if known is None else known):
        by_spelling.setdefault(_spelling(candidate), candidate)
    target = _spelling(name)
    if target in by_spelling:
        return [by_spelling[target]]
    extended = sorted((s for s in by_spelling if s.startswith(target)), key=len)  # seresnext50 -> ..._32x4d
    close = difflib.get_close_matches(target, list(by_spelling), n=limit, cutoff=0.8)
    return [by_spelling[s] for s in dict.fromkeys([*extended, *close])][:limit]


def check_model_name(model_name: str) -> None:
    """Refuse a name timm does not know, suggesting similar ones (cheap: nothing is built).

    Raises:
        UserError: unknown model name.
    """
    if not timm.is_model(model_name):
        close = similar_model_names(model_name)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"unknown model {model_name!r} (not a timm model name){hint}")


def build_encoder(
    model_name: str, pretrained: bool = False, small_input: bool = False, zero_init_last: bool = False,
    pretrained_file: str | None = None, sync_bn: bool = False,
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``), returning pooled features.

    Args:
        model_name: any name from ``timm.list_models()``.
        pretrained: load timm's ImageNet weights (downloads them; needs network).
        small_input: 3x3 stride-1 stem without max-pool, for tiny images.
        zero_init_last: timm's default for ResNets zero-initialises the last BatchNorm of each
            residual block. From scratch under SupCon this makes the embedding collapse in the
            first steps (see docs/concepts/training-health.md); we default it to False.
        pretrained_file: a local weights file to load into the encoder instead of downloading.
        sync_bn: convert BatchNorm layers to SyncBatchNorm (multi-GPU).

    Raises:
        UserError: unknown model name, or weights that cannot be fetched.
    """
    check_model_name(model_name)
    try:
        try:
            encoder = timm.create_model(model_name, pretrained=pretrained, num_classes=0, zero_init_last=zero_init_last)
        except TypeError as exc:
            if "zero_init_last" not in str(exc):
                raise
            # Only ResNet-style models have the option; others keep their own init.
            encoder = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise UserError(f"could not load ImageNet weights for {model_name!r}: {str(exc).splitlines()[0]}")
        raise
    if pretrained_file:
        load_encoder_weights(encoder, pretrained_file)
    if small_input:
        adapt_small_input(encoder, model_name)
    if sync_bn:
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    return encoder


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """Load a local state dict (``weights_only``) into an encoder, ignoring classifier keys."""
    from supcon.checkpoint import safe_load

    state = safe_load(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "encoder" in state:
        state = state["encoder"]
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"weights file {path} has no tensors matching this model's layers")
    missing = [k for k in own if k not in usable]
    encoder.load_state_dict(usable, strict=False)
    if missing:
        logger.info("loaded %d tensors from %s; %d left at their initial values", len(usable), path, len(missing))


class ProjectionHead(nn.Module):
    """MLP ``dim -> dim -> feat_dim``: Linear, BatchNorm, ReLU, Linear.

    ``batch_norm=False`` gives the SupCon reference head (Linear, ReLU, Linear). The BatchNorm (as in
    SimCLR v2 / MoCo v3 heads) keeps every hidden unit spread over the batch, which stops the
    projections collapsing to one point early in training from scratch (measured:
    docs/benchmarks/training-health.md). The head is dropped for probing, so this changes nothing downstream.
    """

    def __init__(self, dim_in: int, feat_dim: int = 128, batch_norm: bool = True):
        super().__init__()
        hidden = [nn.Linear(dim_in, dim_in)] + ([nn.BatchNorm1d(dim_in)] if batch_norm else [])
        self.net = nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(dim_in, feat_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SupConModel(nn.Module):
    """Encoder + projection head; ``forward`` returns ``{"features": h, "projection": z}``.

    ``features`` are the encoder's pooled features (what probes use); ``projection`` is the
    L2-normalised head output (what the loss uses).
    """

    def __init__(self, encoder: nn.Module, feat_dim: int = 128, head_bn: bool = True):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.num_features, feat_dim, batch_norm=head_bn)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(images)
        projection = F.normalize(self.head(features).float(), dim=1)
        return {"features": features, "projection": projection}


def model_config_from(config) -> dict[str, Any]:
    """The few settings that rebuild the network; stored in every checkpoint."""
    return {
        "model": config.model,
        "small_input": bool(config.small_input),
        "zero_init_last": bool(config.zero_init_last),
        "feat_dim": int(config.feat_dim),
        "head_bn": bool(config.head_bn),
    }


def build_model(model: str, small_input: bool = False, zero_init_last: bool = False, feat_dim: int = 128,
                head_bn: bool = True,
                pretrained: bool = False, sync_bn: bool = False) -> SupConModel:
    """Build the full SupCon network from a ``model_config`` dict's fields."""
    encoder = build_encoder(model, pretrained=pretrained, small_input=small_input, zero_init_last=zero_init_last,
                            sync_bn=sync_bn)
    return SupConModel(encoder, feat_dim, head_bn=head_bn)
