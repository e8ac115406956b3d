"""The fast data path: workers decode and crop in uint8; flip and colour ops run batched on the device.

The plain path (:func:`supcon.data.two_view_augmentation`) does everything per image in PIL in the
loader workers, and its colour jitter dominates their time. Here the work is split:

* **Workers** (:class:`CropDataset`) decode each image and draw its two ``RandomResizedCrop`` views
  with torchvision's own transform (so crop boxes and resampling are those of the plain path), and
  return them as uint8 ``[n_views, size, size, 3]``: a quarter of the bytes of float views to pin
  and copy to the device.
* **The training device** (:class:`DeviceAugment`) applies horizontal flip, colour jitter (with
  probability ``p``, the four ops in a random order drawn per view, as torchvision draws it per
  call), random grayscale and normalisation to the whole batch at once, with per-view random
  parameters. The device may be a GPU or the CPU; on the CPU it is mainly for tests.

The colour ops are torchvision's tensor formulas (``transforms.v2.functional``: brightness, contrast
and saturation are blends clamped to [0, 1], contrast blends with the mean of the grayscale image,
hue shifts in HSV), vectorised over per-view factors. Kornia was measured as the alternative (see
``benchmarks/README.md``): its ``ColorJitter`` draws one op order per batch rather than per image,
and its ``ColorJiggle`` uses other formulas (additive brightness, contrast without the mean), so
neither gives torchvision's distribution; and torchvision's own functional ops take one scalar
factor per call.

Both paths are built from one :class:`supcon.data.AugmentSpec`: the plain path's torchvision
pipeline (:meth:`AugmentSpec.torchvision_pipeline`) and this one's crop and device ops, so the two
cannot drift apart.

Randomness stays a pure function of ``(seed, epoch, index)`` for the crops (as in the plain path)
and of ``(seed, process index, global step)`` for the device ops, so a resumed run sees exactly what
an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import transforms

from supcon.data import AugmentSpec, MultiViewDataset
from supcon.distributed import rank as process_rank

__all__ = ["AugmentSpec", "CropDataset", "DeviceAugment", "ViewParams", "build_gpu_pipeline", "shift_hue"]

logger = logging.getLogger(__name__)

#: ITU-R 601-2 luma weights, as torchvision's ``rgb_to_grayscale`` uses them.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: Colour-jitter op indices, in torchvision's numbering (``ColorJitter.get_params``'s ``fn_idx``).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_NO_HUE = 4  # "hue position" of a view whose jitter is not applied


def _uint8_hwc(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8))


class CropDataset(MultiViewDataset):
    """The worker half of the fast path: ``(uint8 views [n_views, size, size, 3], label)`` per key.

    The plain dataset with only the crop as its transform: each view is torchvision's
    ``RandomResizedCrop`` of the decoded image, seeded by ``(seed, epoch, index)`` exactly as the plain
    path seeds it. Pixels stay channels-last (as decoded), so neither the worker nor the copy to the
    device reorders them.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], spec: AugmentSpec, n_views: int = 2, seed: int = 0):
        super().__init__(samples, transforms.Compose([spec.crop(), _uint8_hwc]), n_views, seed)


@dataclass
class ViewParams:
    """Per-view random parameters of one batch, drawn on the CPU (see :meth:`DeviceAugment.draw`)."""

    flip: torch.Tensor       # bool [n]
    jittered: torch.Tensor   # bool [n]: colour jitter applied (probability jitter_p)
    order: torch.Tensor      # long [n, 4]: op index at each position, a uniform permutation per view
    brightness: torch.Tensor  # float [n] factors (1 = identity), identity where not jittered
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor        # float [n] shift in turns (0 = identity)
    grayscale: torch.Tensor  # bool [n]


def _uniform(n: int, bounds: tuple[float, float] | None, identity: float, generator: torch.Generator) -> torch.Tensor:
    if bounds is None:
        return torch.full((n,), identity, dtype=torch.float64)
    return torch.empty(n, dtype=torch.float64).uniform_(bounds[0], bounds[1], generator=generator)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` -> ``[n, 1, H, W]`` grayscale with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns per image (HSV, as torchvision does).

    Saturation and value are kept; the result is computed straight from the shifted hue with the
    closed-form HSV-to-RGB map ``c_n = v - chroma * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 h) mod 6`` for ``n = 5, 3, 1`` (R, G, B).

    Args:
        x: ``[n, 3, H, W]`` float images in [0, 1].
        shift: ``[n]`` hue shifts in turns (torchvision's ``hue_factor``).
    """
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    # Hue in sextants (the colorsys convention): red is the max first, then green, then blue.
    sextant = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    sextant = sextant + (6.0 * shift).to(x.dtype).view(-1, 1, 1)
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(sextant + n, 6.0)
        weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.addcmul(maxc, chroma, weight, value=-1.0, out=out[:, channel])
    return out


class DeviceAugment:
    """The device half of the fast path: flip, colour jitter, grayscale and normalise, batched.

    Called as ``augment(images, global_step)`` with ``images`` the uint8 ``[B, n_views, H, W, 3]``
    batch of :class:`CropDataset` (already on the device); returns normalised float32 views
    ``[B, n_views, 3, H, W]`` (channels-last strides when ``channels_last``).

    The parameters are drawn on the CPU from a generator seeded by ``(seed, rank, global_step)``,
    so a view's augmentation does not depend on the device, and the batch is then reordered so that
    views needing the same work (hue at the same position of their op order, flip) are contiguous:
    every op then runs once over a slice instead of over the whole batch under a mask.
    """

    def __init__(self, spec: AugmentSpec, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0,
                 channels_last: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.channels_last = channels_last
        self._inv_std = (1.0 / torch.tensor(spec.std, dtype=torch.float64)).float().view(1, 3, 1, 1).to(self.device)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)

    def generator(self, global_step: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.rank, global_step, 0x6A17]).generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> 1))

    def draw(self, n: int, global_step: int) -> ViewParams:
        """Per-view parameters for ``n`` views, a pure function of ``(seed, rank, global_step, n)``.

        Each view's draws follow the plain pipeline: flip with ``flip_p``; jitter with ``jitter_p``,
        then a uniform random order of the four ops and uniform factors in their ranges; grayscale
        with ``grayscale_p``.
        """
        spec = self.spec
        gen = self.generator(global_step)
        flip = torch.rand(n, generator=gen, dtype=torch.float64) < spec.flip_p
        jittered = torch.rand(n, generator=gen, dtype=torch.float64) < spec.jitter_p
        order = torch.rand(n, 4, generator=gen, dtype=torch.float64).argsort(dim=1)
        brightness = _uniform(n, spec.brightness, 1.0, gen)
        contrast = _uniform(n, spec.contrast, 1.0, gen)
        saturation = _uniform(n, spec.saturation, 1.0, gen)
        hue = _uniform(n, spec.hue, 0.0, gen)
        grayscale = torch.rand(n, generator=gen, dtype=torch.float64) < spec.grayscale_p
        off = ~jittered
        for factor, identity in ((brightness, 1.0), (contrast, 1.0), (saturation, 1.0), (hue, 0.0)):
            factor[off] = identity
        return ViewParams(flip, jittered, order, brightness, contrast, saturation, hue, grayscale)

    def __call__(self, images: torch.Tensor, global_step: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, n_views, H, W, 3], got {images.dtype} {list(images.shape)}")
        batch, n_views = images.shape[:2]
        params = self.draw(batch * n_views, global_step)
        return self.apply(images.flatten(0, 1), params).unflatten(0, (batch, n_views))

    def apply(self, pixels: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Augment uint8 ``[n, H, W, 3]`` pixels with the given per-view parameters -> ``[n, 3, H, W]``."""
        n = pixels.shape[0]
        device = pixels.device
        hue_position = torch.full((n,), _NO_HUE, dtype=torch.long)
        jittered = params.jittered.nonzero().squeeze(1)
        hue_position[jittered] = (params.order[jittered] == HUE).long().argmax(dim=1)
        group = hue_position * 2 + params.flip.long()
        perm = torch.argsort(group, stable=True)
        bounds = torch.bincount(group, minlength=2 * (_NO_HUE + 1)).cumsum(0).tolist()
        bounds = [0] + bounds

        perm_device = perm.to(device, non_blocking=True)
        x = pixels.index_select(0, perm_device)  # uint8, [n, H, W, 3], grouped
        for g in range(1, len(bounds) - 1, 2):  # odd groups are the flipped ones
            start, end = bounds[g], bounds[g + 1]
            if end > start:
                x[start:end] = x[start:end].flip(2)
        x = x.permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)  # [n, 3, H, W], channels-last strides

        order = params.order[perm]
        factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)[perm]  # [n, 3]
        jit = params.jittered[perm]
        hue = params.hue[perm]
        for position in range(4):
            op = order[:, position]
            linear = jit & (op != HUE)
            if bool(linear.any()):
                x = self._blend_step(x, op, factors, linear)
            start, end = bounds[2 * position], bounds[2 * position + 2]  # views whose hue is here
            if end > start:
                x[start:end] = shift_hue(x[start:end], hue[start:end].to(device, non_blocking=True))

        # Grayscale and normalisation in one affine map: x' = (a x + g luma - mean) / std.
        gray = params.grayscale[perm].to(torch.float32)
        coefs = torch.stack([1.0 - gray, gray], dim=1).to(device, non_blocking=True)
        a = coefs[:, 0].view(n, 1, 1, 1) * self._inv_std
        g = coefs[:, 1].view(n, 1, 1, 1) * self._inv_std
        bias = -self._mean * self._inv_std
        x = torch.addcmul(torch.addcmul(bias, g, _luma(x)), a, x)

        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n)
        inverse = inverse.to(device, non_blocking=True)
        if self.channels_last:
            return x.permute(0, 2, 3, 1).index_select(0, inverse).permute(0, 3, 1, 2)
        return x.index_select(0, inverse).contiguous()

    def _blend_step(self, x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, active: torch.Tensor):
        """One position of the op order for every view whose op there is brightness/contrast/saturation.

        All three are torchvision blends ``clamp(f x + (1 - f) d, 0, 1)`` against a degenerate image
        ``d``: black (brightness), the mean of the luma (contrast), the luma (saturation); written as
        ``clamp(s x + t luma + u mean(luma), 0, 1)`` with per-view coefficients (identity: 1, 0, 0).
        """
        n = x.shape[0]
        index = op.clamp(max=SATURATION)
        factor = factors.gather(1, index.unsqueeze(1)).squeeze(1).to(torch.float32)
        factor = torch.where(active, factor, torch.ones_like(factor))
        s = factor
        t = torch.where(active & (op == SATURATION), 1.0 - factor, torch.zeros_like(factor))
        u = torch.where(active & (op == CONTRAST), 1.0 - factor, torch.zeros_like(factor))
        coefs = torch.stack([s, t, u], dim=1).to(x.device, non_blocking=True)
        s, t, u = (c.view(n, 1, 1, 1) for c in coefs.unbind(1))
        luma = _luma(x)
        degenerate = luma * t
        if bool((op[active] == CONTRAST).any()):
            degenerate = degenerate.add_(luma.mean(dim=(2, 3), keepdim=True) * u)
        return torch.addcmul(degenerate, s, x).clamp_(0.0, 1.0)


def build_gpu_pipeline(samples: Sequence[tuple[str, int]], config, device: torch.device | str, n_views: int = 2,
                       rank: int | None = None) -> tuple[CropDataset, DeviceAugment]:
    """The fast data path for a training run: the dataset for the loader and the device augmentation.

    Args:
        samples: ``(path, label)`` pairs.
        config: a :class:`supcon.config.TrainConfig` (uses size, mean, std, seed, channels_last).
        device: where the augmentation runs (the training device; the CPU works too).
        n_views: views per image.
        rank: this process's index, so processes draw different parameters [default: from
            ``torch.distributed``, 0 with one process].
    """
    spec = AugmentSpec.supcon(config.size, config.mean, config.std, crop_min=config.crop_min, flip=config.flip)
    dataset = CropDataset(samples, spec, n_views, seed=config.seed)
    augment = DeviceAugment(spec, device, seed=config.seed, rank=process_rank() if rank is None else rank,
                            channels_last=bool(config.channels_last))
    return dataset, augment
