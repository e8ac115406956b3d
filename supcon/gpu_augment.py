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

import functools
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


@functools.lru_cache(maxsize=32)
def _channel_constants(values: tuple[float, float, float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a ``[1, 3, 1, 1]`` tensor on ``device``, made once (not one host-to-device copy per call)."""
    return torch.tensor(values, dtype=dtype).view(1, 3, 1, 1).to(device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` -> ``[n, 1, H, W]`` grayscale with torchvision's weights.

    Three passes over channel planes; (x * weights).sum(1) is one op fewer but moves 40% more
    memory (a full-size product, then a reduction over 3 channels), and measured 1.4x slower.
    """
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


#: ``n`` of the closed-form HSV-to-RGB map for R, G, B (see :func:`shift_hue`).
_HSV_OFFSETS = (5.0, 3.0, 1.0)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns per image (HSV, as torchvision does).

    Saturation and value are kept; the result is computed straight from the shifted hue with the
    closed-form HSV-to-RGB map ``c_n = v - chroma * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 h) mod 6`` for ``n = 5, 3, 1`` (R, G, B), all three channels in one pass.

    Args:
        x: ``[n, 3, H, W]`` float images in [0, 1].
        shift: ``[n]`` hue shifts in turns (torchvision's ``hue_factor``).
    """
    return _shift_hue_sextants(x, (6.0 * shift).to(device=x.device, dtype=x.dtype))


def _shift_hue_sextants(x: torch.Tensor, sextants: torch.Tensor) -> torch.Tensor:
    """:func:`shift_hue` with the shift already in sextants (``6 * shift``, on ``x``'s device)."""
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1, keepdim=True)
    chroma = maxc - minc
    # Where chroma is 0 every (maxc - c) is 0 too, so any positive divisor gives torchvision's 0.
    safe = chroma.clamp_min(torch.finfo(x.dtype).tiny)
    rc, gc, bc = ((maxc - x) / safe).unbind(1)
    maxc, chroma = maxc.squeeze(1), chroma.squeeze(1)
    # Hue in sextants (the colorsys convention): red is the max first, then green, then blue.
    sextant = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    sextant = sextant.add_(sextants.view(-1, 1, 1)).unsqueeze(1)
    k = torch.remainder(sextant + _channel_constants(_HSV_OFFSETS, x.device, x.dtype), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), weight, value=-1.0)


class DeviceAugment:
    """The device half of the fast path: flip, colour jitter, grayscale and normalise, batched.

    Called as ``augment(images, global_step)`` with ``images`` the uint8 ``[B, n_views, H, W, 3]``
    batch of :class:`CropDataset` (already on the device); returns normalised float32 views
    ``[B, n_views, 3, H, W]`` (channels-last strides when ``channels_last``).

    The parameters are drawn on the CPU from a generator seeded by ``(seed, rank, global_step)``,
    so a view's augmentation does not depend on the device. The host then turns them into one table
    of per-view coefficients (one transfer), and the batch is reordered so that the jittered views
    and the flipped views are one slice each: the device runs a fixed number of batched kernels per
    batch (83, pinned by ``tests/test_gpu_augment_ops.py``), none per view or per op order, and
    never waits for the host.
    """

    def __init__(self, spec: AugmentSpec, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0,
                 channels_last: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.channels_last = channels_last
        inv_std = 1.0 / torch.tensor(spec.std, dtype=torch.float64)
        self._inv_std_host = inv_std.float().view(1, 3)
        self._bias = (-torch.tensor(spec.mean, dtype=torch.float64) * inv_std).float().view(1, 3, 1, 1).to(self.device)

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
        """Augment uint8 ``[n, H, W, 3]`` pixels with the given per-view parameters -> ``[n, 3, H, W]``.

        The batch is reordered so that the jittered views are one slice (flipped last) and the
        flipped views another; each view's op order is split around its hue: up to three blends
        before it (three passes over the jittered slice, identity where a view has fewer), one hue
        pass, up to three blends after it. Every per-view coefficient is computed on the host and
        copied to the device in one transfer (plus one for the reordering indices); the device then
        runs about 60 kernels per batch whatever its size (``tests/test_gpu_augment_ops.py``).
        """
        n = pixels.shape[0]
        device = pixels.device
        table, indices, n_jittered, flipped, active = self._plan(params)
        table = table.to(device, non_blocking=True)
        perm, inverse = indices.to(device, non_blocking=True).unbind(0)
        blend_coefs, hue_sextants, gray_coefs = table[:, :18], table[:, 18], table[:, 19:25]

        x = pixels.index_select(0, perm)  # uint8 [n, H, W, 3]: jittered, then not; flipped views contiguous
        if flipped[1] > flipped[0]:
            x[flipped[0]:flipped[1]] = x[flipped[0]:flipped[1]].flip(2)
        # float [n, 3, H, W] in planes: the per-view, per-pixel ops below broadcast over contiguous
        # rows instead of striding over 3 interleaved channels
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)

        if n_jittered:
            jittered = x[:n_jittered]
            steps = blend_coefs[:n_jittered].view(n_jittered, 6, 3, 1, 1, 1).unbind(1)
            for step in range(3):  # the blends before each view's hue
                if active[step]:
                    jittered = _blend(jittered, *steps[step].unbind(1), contrast=active[step] > 1)
            jittered = _shift_hue_sextants(jittered, hue_sextants[:n_jittered])
            for step in range(3, 6):  # and after it
                if active[step]:
                    jittered = _blend(jittered, *steps[step].unbind(1), contrast=active[step] > 1)
            x[:n_jittered] = jittered

        # Grayscale and normalisation in one affine map: x' = a x + g luma + bias, with
        # a = (1 - gray) / std, g = gray / std, bias = -mean / std.
        a, g = gray_coefs.view(n, 2, 3, 1, 1).unbind(1)
        x = torch.addcmul(torch.addcmul(self._bias, g, _luma(x)), a, x)
        if self.channels_last:
            return x.permute(0, 2, 3, 1).index_select(0, inverse).permute(0, 3, 1, 2)
        return x.index_select(0, inverse).contiguous()

    def _plan(self, params: ViewParams) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int], list[int]]:
        """Host side of :meth:`apply`: the reordering and every per-view coefficient, in the new order.

        Returns ``(table [n, 25] float32, indices [2, n] (perm, inverse), jittered views, flipped slice,
        active steps)``: the table holds 6 blend steps x (s, t, u), the hue shift in sextants, and
        (a, g) x 3 channels; per blend step, 0 (no view), 1 (no contrast) or 2 (some contrast).
        """
        n = params.flip.shape[0]
        # jittered & not flipped, jittered & flipped, not jittered & flipped, neither
        group = torch.where(params.jittered, params.flip.long(), 3 - params.flip.long())
        perm = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=4).tolist()
        n_jittered = counts[0] + counts[1]
        flipped = (counts[0], counts[0] + counts[1] + counts[2])

        jit = params.jittered[perm]
        order = params.order[perm]
        factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)[perm]  # [n, 3]
        hue_position = (order == HUE).long().argmax(dim=1)
        # Blend step j < 3: the j-th op before the hue; step 3 + j: the j-th op after it.
        position = torch.cat([torch.arange(3).expand(n, 3), hue_position[:, None] + 1 + torch.arange(3)], dim=1)
        active = jit[:, None] & torch.cat([position[:, :3] < hue_position[:, None], position[:, 3:] <= 3], dim=1)
        op = order.gather(1, position.clamp(max=3))  # [n, 6]
        factor = factors.gather(1, op.clamp(max=SATURATION)).float()
        factor = torch.where(active, factor, torch.ones_like(factor))
        s = factor
        t = torch.where(active & (op == SATURATION), 1.0 - factor, 0.0)
        u = torch.where(active & (op == CONTRAST), 1.0 - factor, 0.0)
        active_steps = (active.any(0).long() + (active & (op == CONTRAST)).any(0).long()).tolist()

        gray = params.grayscale[perm].to(torch.float32)[:, None]
        inv_std = self._inv_std_host
        table = torch.cat([torch.stack([s, t, u], dim=2).flatten(1), (6.0 * params.hue[perm]).float()[:, None],
                           (1.0 - gray) * inv_std, gray * inv_std], dim=1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n)
        return table, torch.stack([perm, inverse]), n_jittered, flipped, active_steps


def _blend(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, u: torch.Tensor, contrast: bool) -> torch.Tensor:
    """One blend step of brightness/contrast/saturation for every view, with per-view coefficients.

    All three are torchvision blends ``clamp(f x + (1 - f) d, 0, 1)`` against a degenerate image
    ``d``: black (brightness), the mean of the luma (contrast), the luma (saturation); written as
    ``clamp(s x + t luma + u mean(luma), 0, 1)`` (identity: 1, 0, 0). ``contrast``: some ``u`` is not 0.
    """
    luma = _luma(x)
    degenerate = luma * t
    if contrast:
        degenerate = degenerate.addcmul_(luma.mean(dim=(2, 3), keepdim=True), u)
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
