"""Baseline data: augmentation presets, the stratified validation split, a seeded single-view dataset.

Folder scanning, image checks, mean/std, the deterministic eval transform and the epoch sampler
are :mod:`supcon.data`'s; as there, each sample's augmentation is a function of
``(seed, epoch, index)``, so a resumed run sees what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torchvision import transforms

from supcon.data import MultiViewDataset, eval_transform
from supcon.errors import UserError


def train_transform(preset: str, size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The training augmentation of a preset.

    - ``none``: the eval transform (resize the short side, centre crop).
    - ``flip``: that plus a random horizontal flip.
    - ``standard``, the experiments' recipe: random resized crop (scale 0.8-1), horizontal flip,
      rotation up to 15 degrees, colour jitter (brightness/contrast/saturation 0.2, hue 0.05),
      then, on the normalised tensor, random erasing (p 0.25).
    """
    if preset == "none":
        return eval_transform(size, mean, std)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
    if preset == "flip":
        return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                   transforms.RandomHorizontalFlip(), *normalize])
    if preset == "standard":
        return transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.8, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(15),
            transforms.ColorJitter(0.2, 0.2, 0.2, 0.05),
            *normalize,
            transforms.RandomErasing(p=0.25),
        ])
    raise UserError(f"--augment must be none, flip or standard, got {preset!r}")


def stratified_split(samples: Sequence[tuple[str, int]], fraction: float, seed: int,
                     class_names: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split ``(path, label)`` samples into train and val, ``fraction`` of each class to val.

    Each class gives ``round(fraction * n)`` images to val, at least 1 and at most ``n - 1``; which
    ones depends only on ``seed`` and the sorted file list. Both parts keep the input order.

    Raises:
        UserError: a class with a single image (it cannot be in both parts).
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(position)
    val_positions: set[int] = set()
    for label, positions in sorted(by_class.items()):
        if len(positions) < 2:
            name = class_names[label] if class_names else str(label)
            raise UserError(
                f"class {name!r} has a single image ({samples[positions[0]][0]}): it cannot be split into train "
                "and val; add images or give --val-folder"
            )
        count = min(max(1, round(fraction * len(positions))), len(positions) - 1)
        val_positions.update(rng.permutation(positions)[:count].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_positions]
    val = [s for i, s in enumerate(samples) if i in val_positions]
    return train, val


class AugmentedDataset(MultiViewDataset):
    """``(image [C, H, W], label)`` with one augmented view, keyed by ``(index, epoch)`` like its parent."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, seed: int = 0):
        super().__init__(samples, transform, n_views=1, seed=seed)

    def __getitem__(self, key):
        views, label = super().__getitem__(key)
        return views[0], label
