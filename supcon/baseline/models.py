"""Baseline classifiers: a backbone (timm, torchvision or a custom net), a head, and ``--freeze``.

A checkpoint stores ``model_config`` (a plain dict from :func:`make_model_config`) beside the
weights, so ``build_classifier(model_config)`` alone rebuilds the network.

What ``--freeze N`` counts as a *block* (the stem always belongs to block 1; heads, including
auxiliary classifiers, are never frozen):

- timm models: timm's own fine-grained parameter groups (``model.group_matcher(coarse=False)``,
  the grouping timm uses for layer-wise LR decay): one residual block of a ResNet/SE-ResNeXt, one
  MBConv block of an EfficientNet (efficientnet_b3 has 26), one ConvNeXt/ViT block; timm puts the
  final backbone layers (e.g. EfficientNet's ``conv_head``) with the last block.
- torchvision alexnet: each of the 5 conv layers, then fc6 and fc7 (7 blocks); squeezenet1_0: the
  8 Fire modules; googlenet: the 9 Inception modules.
- custom nets: their blocks (see :mod:`supcon.baseline.nets`).

Frozen parameters get ``requires_grad=False`` and are left out of the optimizer; their modules stay
in training mode, so BatchNorm running statistics keep updating (as the experiments required).
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import nn

from supcon.baseline.config import HEADS
from supcon.baseline.nets import CUSTOM_NETS
from supcon.errors import UserError
from supcon.models import build_encoder, load_encoder_weights, similar_model_names

logger = logging.getLogger(__name__)

TORCHVISION_MODELS = ("alexnet", "squeezenet1_0", "googlenet")
#: Hidden width of the ``mlp`` / ``mlp-dropout`` heads on timm and torchvision backbones.
DEFAULT_HEAD_HIDDEN = 512


def model_family(name: str) -> str:
    """``"custom"``, ``"torchvision"`` or ``"timm"``.

    Raises:
        UserError: the name is none of them (with similar timm names as a hint).
    """
    if name in CUSTOM_NETS:
        return "custom"
    if name in TORCHVISION_MODELS:
        return "torchvision"
    if timm.is_model(name):
        return "timm"
    close = similar_model_names(name, [*CUSTOM_NETS, *TORCHVISION_MODELS, *timm.list_models()])
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model {name!r}: not a timm model name, nor one of torchvision's {', '.join(TORCHVISION_MODELS)}, "
        f"nor a custom net ({', '.join(CUSTOM_NETS)}){hint}"
    )


def make_classifier_head(kind: str, in_features: int, num_outputs: int, hidden: int) -> nn.Module:
    """``linear``: Linear; ``mlp``: Linear-ReLU-Linear; ``mlp-dropout``: Linear-LeakyReLU-Dropout(0.5)-Linear."""
    if kind == "linear":
        return nn.Linear(in_features, num_outputs)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_outputs))
    if kind == "mlp-dropout":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(inplace=True), nn.Dropout(0.5),
                             nn.Linear(hidden, num_outputs))
    raise UserError(f"--head must be one of {', '.join(HEADS)}, got {kind!r}")


def make_model_config(model: str, num_classes: int, loss: str = "ce", head: str | None = None,
                      head_hidden: int | None = None, small_input: bool = False) -> dict[str, Any]:
    """The plain dict that rebuilds the network; ``None`` head settings take the model's own.

    Raises:
        UserError: unknown model or head, or ``small_input`` on a model that is not from timm.
    """
    family = model_family(model)
    if head is not None and head not in HEADS:
        raise UserError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if small_input and family != "timm":
        raise UserError(f"--small-input applies to timm models only ({model!r} is a {family} model)")
    net = CUSTOM_NETS.get(model)
    return {
        "model": model,
        "family": family,
        "num_classes": int(num_classes),
        # Binary cross-entropy uses one logit (the second class is the positive one).
        "num_outputs": 1 if loss == "bce" else int(num_classes),
        "head": head or (net.default_head if net else "linear"),
        "head_hidden": int(head_hidden or (net.default_head_hidden if net else DEFAULT_HEAD_HIDDEN)),
        "small_input": bool(small_input),
    }


def describe_model(model_config: dict[str, Any], pretrained: bool = False, freeze: int = 0,
                   started_from: str | None = None) -> str:
    """E.g. ``"resnet18 (baseline, mlp head)"``; the network column of the comparison tables.

    ``started_from``: where the backbone's weights came from, when not ImageNet or random (e.g. a SupCon run).
    """
    extras = [f"{model_config['head']} head"]
    if started_from:
        extras.append(started_from)
    elif pretrained:
        extras.append("pretrained")
    if freeze:
        extras.append(f"{freeze} blocks frozen")
    return f"{model_config['model']} (baseline, {', '.join(extras)})"


class BaselineModel(nn.Module):
    """Backbone + classification head; ``forward`` returns named outputs.

    ``{"features": [B, F], "logits": [B, num_outputs]}``, plus ``"aux_logits"`` (a list) in
    training mode for nets with auxiliary classifiers (googlenet, inception_net).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, model_config: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.model_config = dict(model_config)

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        out = self.backbone(images)
        aux = None
        if isinstance(out, dict):  # custom nets
            features, aux = out["features"], out.get("aux_logits")
        elif isinstance(out, tuple):  # torchvision GoogLeNetOutputs in training mode (fc is the identity)
            features, aux = out.logits, [out.aux_logits1, out.aux_logits2]
        else:
            features = out
        result = {"features": features, "logits": self.head(features)}
        if aux and self.training:
            result["aux_logits"] = aux
        return result


def _torchvision_backbone(name: str, num_outputs: int, pretrained: bool) -> tuple[nn.Module, int]:
    """A torchvision model with its classifier removed; returns it and its feature width."""
    from torchvision import models

    weights = "DEFAULT" if pretrained else None
    try:
        if name == "alexnet":
            net = models.alexnet(weights=weights)
            net.classifier[6] = nn.Identity()
            return net, 4096
        if name == "squeezenet1_0":
            net = models.squeezenet1_0(weights=weights)
            net.classifier = nn.AdaptiveAvgPool2d(1)  # its forward flattens the result
            return net, 512
        # GoogLeNet keeps its two auxiliary classifiers (new last layers for our classes). We
        # normalise inputs ourselves, so transform_input (ImageNet re-normalisation) is off.
        extra = {} if pretrained else {"init_weights": True}
        net = models.googlenet(weights=weights, aux_logits=True, transform_input=False, **extra)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise UserError(f"could not load ImageNet weights for {name!r}: {str(exc).splitlines()[0]}") from None
        raise
    net.fc = nn.Identity()
    net.aux1.fc2 = nn.Linear(net.aux1.fc2.in_features, num_outputs)
    net.aux2.fc2 = nn.Linear(net.aux2.fc2.in_features, num_outputs)
    return net, 1024


def build_classifier(model_config: dict[str, Any], pretrained: bool = False, pretrained_file: str | None = None
                ) -> BaselineModel:
    """Build the classifier described by ``model_config`` (see :func:`make_model_config`).

    Args:
        model_config: the dict stored in checkpoints.
        pretrained: start the backbone from ImageNet weights (timm or torchvision; needs network).
        pretrained_file: a local weights file for the backbone instead: a timm/torchvision
            state dict, a supcon-train checkpoint (its encoder) or a baseline checkpoint. Tensors
            whose name and shape match are loaded; the classifier is left out.

    Raises:
        UserError: unknown model, weights that cannot be fetched or do not match.
    """
    name = model_config["model"]
    family = model_family(name)
    num_outputs = int(model_config["num_outputs"])
    if family == "custom":
        if pretrained:
            raise UserError(f"there are no ImageNet weights for the custom net {name!r}; use --pretrained-file")
        net_class = CUSTOM_NETS[name]
        backbone = net_class(num_outputs) if name == "inception_net" else net_class()
        num_features = backbone.num_features
    elif family == "torchvision":
        backbone, num_features = _torchvision_backbone(name, num_outputs, pretrained)
    else:
        # timm's default zero_init_last (residual branches start at zero) suits supervised training.
        backbone = build_encoder(name, pretrained=pretrained, small_input=bool(model_config.get("small_input")),
                                 zero_init_last=True)
        num_features = backbone.num_features
    if pretrained_file:
        load_encoder_weights(backbone, pretrained_file)
    head = make_classifier_head(model_config["head"], num_features, num_outputs, int(model_config["head_hidden"]))
    return BaselineModel(backbone, head, model_config)


def check_input_size(model: BaselineModel, size: int) -> None:
    """Run one ``size`` x ``size`` image through the model (eval mode, CPU) to catch a too-small input.

    Raises:
        UserError: the network cannot take images of this size (e.g. alexnet below 63 px, a ViT at
            other than its own size).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:  # timm's fixed-size models assert on the size
        raise UserError(
            f"model {model.model_config['model']!r} cannot take {size} px images "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); choose a --size it accepts"
        ) from None
    finally:
        model.train(was_training)


def _module_groups(model: BaselineModel) -> list[tuple[str, list[nn.Module]]]:
    """Blocks of a custom or torchvision backbone, in forward order, stem in block 1."""
    backbone = model.backbone
    name = model.model_config["model"]
    if model.model_config["family"] == "custom":
        return backbone.freeze_groups()
    if name == "alexnet":
        convs = [("conv1", 0), ("conv2", 3), ("conv3", 6), ("conv4", 8), ("conv5", 10)]
        return ([(label, [backbone.features[i]]) for label, i in convs]
                + [("fc6", [backbone.classifier[1]]), ("fc7", [backbone.classifier[4]])])
    if name == "squeezenet1_0":
        fires = [3, 4, 5, 7, 8, 9, 10, 12]
        groups = [(f"fire{n + 2}", [backbone.features[i]]) for n, i in enumerate(fires)]
        groups[0] = ("conv1+fire2", [backbone.features[0], backbone.features[3]])
        return groups
    inceptions = ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c", "inception4d",
                  "inception4e", "inception5a", "inception5b"]
    groups = [(label, [getattr(backbone, label)]) for label in inceptions]
    groups[0] = ("conv1-3+inception3a", [backbone.conv1, backbone.conv2, backbone.conv3, backbone.inception3a])
    return groups


def _unit_name(param_names: list[str]) -> str:
    """A readable name for a block: the deepest module holding all its parameters, per top-level module.

    E.g. ``layer1.0`` for a residual block, ``conv1+bn1`` for a stem, ``blocks.6.1+conv_head+bn2``.
    """
    by_top: dict[str, list[list[str]]] = {}
    for name in param_names:
        path = name.split(".")[:-1] or [name]
        by_top.setdefault(path[0], []).append(path)
    parts = []
    for paths in by_top.values():
        common = []
        for level in zip(*paths, strict=False):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        parts.append(".".join(common))
    return "+".join(parts)


def freeze_units(model: BaselineModel) -> list[tuple[str, list[str]]]:
    """The blocks ``--freeze`` counts, in order: ``(name, [parameter names in model])``.

    Raises:
        UserError: a timm model that defines no parameter grouping.
    """
    if model.model_config["family"] == "timm":
        from timm.models import group_parameters

        backbone = model.backbone
        try:
            groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
        except (AttributeError, NotImplementedError):
            raise UserError(
                f"--freeze is not supported for {model.model_config['model']!r} (timm defines no blocks)") from None
        units = [(_unit_name(names), [f"backbone.{n}" for n in names]) for _, names in sorted(groups.items())]
        if len(units) > 1:  # the stem belongs to block 1
            units = [(f"{units[0][0]}+{units[1][0]}", units[0][1] + units[1][1])] + units[2:]
        return units
    names_by_param = {id(p): n for n, p in model.named_parameters()}
    return [(label, [names_by_param[id(p)] for module in modules for p in module.parameters()])
            for label, modules in _module_groups(model)]


def freeze_blocks(model: BaselineModel, count: int) -> list[str]:
    """Freeze the first ``count`` blocks (``requires_grad=False``); returns their names.

    Modules are left in training mode, so BatchNorm running statistics still update.

    Raises:
        UserError: ``count`` is negative or more than the model's blocks.
    """
    if count == 0:
        return []
    units = freeze_units(model)
    if not 0 < count <= len(units):
        raise UserError(
            f"--freeze {count}: model {model.model_config['model']!r} has {len(units)} blocks "
            f"({units[0][0]} ... {units[-1][0]}); use 0 to {len(units)}"
        )
    frozen = {name for _, names in units[:count] for name in names}
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return [label for label, _ in units[:count]]
