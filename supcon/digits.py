"""Export scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) as an ImageFolder.

The data ship inside scikit-learn, so this needs no network. The split is stratified with a fixed
seed; images are upscaled (bicubic) and stored as RGB PNGs, ``root/{train,val,test}/<digit>/*.png``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from supcon.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "digits_export.json"


def export_digits(root: str | os.PathLike, size: int = 32, val_fraction: float = 0.2, test_fraction: float = 0.2,
                  seed: int = 0, classes: list[int] | None = None, one_vs_rest: int | None = None,
                  train_per_class: int | None = None) -> Path:
    """Write the digits as ``root/{train,val,test}/<class>/<index>.png``; returns ``root``.

    Args:
        root: output folder; reused as is when it already holds an export with the same settings.
        size: side of the upscaled square images.
        val_fraction: share of each class for validation.
        test_fraction: share of each class for test.
        seed: split seed.
        classes: keep only these digits (e.g. ``[3, 8]`` for a binary task); default all ten.
        one_vs_rest: make a binary, imbalanced task: class ``<digit>`` against class ``other``.
        train_per_class: keep at most this many training images of each digit (a smaller training set; val
            and test stay as split).

    Raises:
        UserError: ``root`` exists, is not empty and is not such an export.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    settings = {"size": size, "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                "classes": sorted(classes) if classes else list(range(10)), "one_vs_rest": one_vs_rest}
    if train_per_class is not None:  # recorded only when used, so earlier exports are still recognised
        settings["train_per_class"] = train_per_class
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == settings:
            return root
        raise UserError(f"{root} holds a digits export with other settings; choose another folder")
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not empty; choose another folder for the digits export")

    digits = load_digits()
    keep = np.isin(digits.target, settings["classes"])
    images, labels = digits.images[keep], digits.target[keep]
    names = {int(c): str(c) for c in np.unique(labels)}
    if one_vs_rest is not None:
        labels = (labels == one_vs_rest).astype(int)
        names = {0: "other", 1: str(one_vs_rest)}
    indices = np.arange(len(labels))
    train_idx, rest_idx = train_test_split(indices, test_size=val_fraction + test_fraction, stratify=labels,
                                           random_state=seed)
    val_idx, test_idx = train_test_split(rest_idx, test_size=test_fraction / (val_fraction + test_fraction),
                                         stratify=labels[rest_idx], random_state=seed)
    if train_per_class is not None:
        train_idx = np.concatenate([train_idx[digits.target[keep][train_idx] == digit][:train_per_class]
                                    for digit in settings["classes"]])
    for split, split_idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in split_idx:
            folder = root / split / names[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray((images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
            gray.resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    marker.write_text(json.dumps(settings))
    logger.info("exported %d digits to %s (train %d, val %d, test %d)", len(labels), root, len(train_idx),
                len(val_idx), len(test_idx))
    return root
