"""Baseline data: a run's checked images (:func:`prepare_data`), augmentation presets, the stratified validation
split, a seeded single-view dataset.

Folder scanning, image checks, mean/std, the deterministic eval transform and the epoch sampler
are :mod:`supcon.data`'s; as there, each sample's augmentation is a function of
``(seed, epoch, index)``, so a resumed run sees what an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchvision import transforms

from supcon.baseline.config import AUGMENTATIONS, BaselineConfig
from supcon.data import (
    MultiViewDataset,
    check_images,
    eval_transform,
    report_bad_images,
    scan_image_folder,
    two_view_augmentation,
)
from supcon.engine import RunEngine
from supcon.errors import UserError
from supcon.rundir import BAD_IMAGES_FILE, find_split_folder

logger = logging.getLogger(__name__)


def train_transform(preset: str, size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The training augmentation of a preset.

    - ``none``: the eval transform (resize the short side, centre crop).
    - ``flip``: that plus a random horizontal flip.
    - ``standard``, the experiments' recipe: random resized crop (scale 0.8-1), horizontal flip,
      rotation up to 15 degrees, colour jitter (brightness/contrast/saturation 0.2, hue 0.05),
      then, on the normalised tensor, random erasing (p 0.25).
    - ``supcon``: ``supcon-train``'s own augmentation (random resized crop, scale 0.2-1, flip, colour
      jitter 0.4/0.4/0.4/0.1 with p 0.8, grey-scale p 0.2), one view: the SupCon paper's cross-entropy
      baseline used the same augmentation as SupCon, so a comparison with it is like for like.
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
    if preset == "supcon":
        return two_view_augmentation(size, mean, std)
    raise UserError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {preset!r}")


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


@dataclass
class PreparedData:
    """The checked images of a run: class names, train and val samples, where they came from, mean/std."""

    classes: list[str]
    train_samples: list[tuple[str, int]]
    val_samples: list[tuple[str, int]]
    data_folder: str
    val_folder: str | None
    val_split: dict[str, Any] | None
    test_folder: str | None
    bad_images: int
    mean: list[float] | None = None
    std: list[float] | None = None


def _scan_same_classes(folder: str, what: str, classes: list[str], allow_split_names: bool = False):
    index = scan_image_folder(folder, what, allow_split_names=allow_split_names)
    if index.classes != classes:
        raise UserError(f"class names differ between the data folder {classes} and the {what} {index.classes}")
    return index


def prepare_data(config: BaselineConfig, engine: RunEngine, list_dir: Path | None = None) -> PreparedData:
    """Scan and check the folders, split off validation if needed, and compute mean/std if not given.

    Val folder: ``--val-folder``, else a sibling ``val`` of the data folder, else a stratified
    ``--val-split`` of the data folder (seeded by ``--split-seed``). Test folder (recorded for
    check-accuracies): ``--test-folder`` (checked now), else a sibling ``test`` if there is one
    (:func:`supcon.rundir.find_split_folder`). Mean/std, when not given, are computed on the
    training part only. Unreadable images are all listed in ``bad_images.txt`` of ``list_dir``
    [default: the engine's run directory].

    Raises:
        UserError: a missing or empty folder, < 2 classes, an empty class, class names that differ
            between folders, an unreadable image (unless ``--skip-bad-images``).
    """
    allow = config.allow_split_class_names
    index = scan_image_folder(config.data_folder, "data folder", allow_split_names=allow)
    data_folder = str(Path(index.root).resolve())
    val_folder = find_split_folder("val", config.val_folder, data_folder)
    val_split = None
    if val_folder:
        val_index = _scan_same_classes(val_folder, "val folder", index.classes, allow)
        train_samples, val_samples = index.samples, val_index.samples
    else:
        train_samples, val_samples = stratified_split(index.samples, config.val_split, config.split_seed, index.classes)
        val_split = {"fraction": config.val_split, "seed": config.split_seed}
    if config.test_folder:
        _scan_same_classes(config.test_folder, "test folder", index.classes, allow)
    test_folder = find_split_folder("test", config.test_folder, data_folder)

    need_stats = config.mean is None
    checks = None
    if engine.is_main:
        desc = "checking images, computing mean/std" if need_stats else "checking images"
        checks = (check_images([p for p, _ in train_samples], need_stats, config.num_workers, engine.progress, desc),
                  check_images([p for p, _ in val_samples], False, config.num_workers, engine.progress,
                               "checking val images"))
    train_check, val_check = engine.broadcast(checks)
    bad = train_check.bad + val_check.bad
    list_dir = list_dir or engine.run_dir
    report_bad_images(bad, config.skip_bad_images, list_dir / BAD_IMAGES_FILE if list_dir else None,
                      write_list=engine.is_main)
    bad_paths = {p for p, _ in bad}
    train_samples = [s for s in train_samples if s[0] not in bad_paths]
    val_samples = [s for s in val_samples if s[0] not in bad_paths]
    if not val_samples:
        raise UserError("no readable validation images are left")
    if need_stats:
        logger.info("mean %s, std %s computed from %d training images", train_check.mean, train_check.std,
                    len(train_samples))
    if val_split is not None:
        val_split.update(num_train=len(train_samples), num_val=len(val_samples))
        logger.info("no val folder: %d images (%.0f%% of each class, --split-seed %d) held out for validation, "
                    "%d for training", len(val_samples), 100 * config.val_split, config.split_seed, len(train_samples))
    return PreparedData(index.classes, train_samples, val_samples, data_folder, val_folder, val_split, test_folder,
                        len(bad), train_check.mean, train_check.std)

