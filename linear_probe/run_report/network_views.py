"""What the network sees: 2-D maps of embeddings, per-stage feature maps, class-activation maps.

* :func:`embedding_map`: t-SNE (scikit-learn) of L2-normalised features, or UMAP when ``umap-learn``
  is installed.
* :func:`stage_activations`: the output of each stage of a timm encoder (``forward_intermediates``).
* :func:`class_activation_maps`: Grad-CAM (the ``grad-cam`` package) of the classifier's predicted
  class at the encoder's deepest stage that still has a spatial map.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from linear_probe.classifier import Classifier

logger = logging.getLogger(__name__)


def embedding_method() -> str:
    """``"UMAP"`` when umap-learn is installed, else ``"t-SNE"``."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return "t-SNE"
    return "UMAP"


def embedding_map(features: np.ndarray, seed: int = 0, method: str | None = None) -> np.ndarray:
    """2-D coordinates ``[N, 2]`` of ``features`` ``[N, D]`` (L2-normalised first: SupCon's cosine geometry)."""
    method = method or embedding_method()
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "UMAP":
        import umap

        return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def has_stages(encoder: nn.Module) -> bool:
    """True for timm encoders, whose stages :func:`stage_activations` can read."""
    return hasattr(encoder, "forward_intermediates") and hasattr(encoder, "feature_info")


@torch.no_grad()
def stage_activations(encoder: nn.Module, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``[(stage name, activations [B, C, H, W]), ...]`` of a timm encoder, first stage first."""
    encoder.eval()
    outputs = encoder.forward_intermediates(images, intermediates_only=True)
    names = [info.get("module", f"stage {i}") for i, info in enumerate(encoder.feature_info)]
    if len(names) != len(outputs):
        names = [f"stage {i + 1}" for i in range(len(outputs))]
    return [(name, out.float().cpu()) for name, out in zip(names, outputs, strict=True)]


#: Grad-CAM needs a spatial map: the deepest stage whose output is at least this many pixels on a side.
MIN_CAM_SIDE = 4


def cam_target_layer(encoder: nn.Module, size: int) -> tuple[str, nn.Module]:
    """``(name, module)`` whose output Grad-CAM weighs: the deepest timm stage with at least
    :data:`MIN_CAM_SIDE` pixels per side at ``size`` (e.g. ``layer4`` at 224 px, ``layer2`` at 32 px for a
    ResNet, whose last stage is 1x1 there), else the encoder's last convolution.
    """
    stages = [info for info in getattr(encoder, "feature_info", None) or [] if isinstance(info, dict)]
    usable = [info for info in stages if size // int(info.get("reduction", 1)) >= MIN_CAM_SIDE] or stages[:1]
    if usable:
        try:
            return usable[-1]["module"], encoder.get_submodule(usable[-1]["module"])
        except (AttributeError, KeyError):
            pass
    convs = [(name, m) for name, m in encoder.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the encoder has no convolution to compute class-activation maps on")
    return convs[-1]


def class_activation_maps(network: Classifier, images: torch.Tensor, classes: Sequence[int]
                          ) -> tuple[str, np.ndarray]:
    """``(layer name, Grad-CAM heat maps [B, H, W] in [0, 1])`` for ``classes`` (one per image), at the images' size.

    The network is copied with gradients on (the run's network stays frozen and untouched).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

    model = copy.deepcopy(network).cpu().float().eval().requires_grad_(True)
    single_logit = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features == 1
    targets = [BinaryClassifierOutputTarget(int(c)) if single_logit else ClassifierOutputTarget(int(c))
               for c in classes]
    name, layer = cam_target_layer(model.encoder, images.shape[-1])
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return name, cam(input_tensor=images.cpu().float(), targets=targets)


def to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised tensors ``[B, 3, H, W]`` back to RGB ``[B, H, W, 3]`` floats in [0, 1]."""
    mean_t = torch.tensor(list(mean)).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std)).view(1, 3, 1, 1)
    return (images.cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()
