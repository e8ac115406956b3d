"""The benchmarks' image sets: small real image sets cut from photographs that ship inside installed packages.

This module serves the benchmarks only (``scripts/bench_quality.py`` and ``scripts/bench_convergence.py``
import :data:`SOURCES` and :func:`export_patch_set`); no command of the pipeline uses it. It needs no
network: the photographs come with scikit-image and scikit-learn.

Two patch-classification tasks where the pixels alone fail (an RBF SVM on them is far from a CNN):

``textures``
    Which surface is this? Patches of four photographs from scikit-image's data folder: ``brick``,
    ``grass``, ``gravel`` and ``tissue`` (its immunohistochemistry slide).
``photos``
    Which photograph is this patch from? Four colour photographs: scikit-image's ``astronaut``,
    ``chelsea`` (a cat), ``coffee`` and scikit-learn's ``china`` (a temple).

Every patch is turned to grey and standardised to the same mean and contrast, so neither the
brightness nor the colour of a photograph names it: what is left is texture and shape. Patches with
almost no structure (grey-level standard deviation below :data:`MIN_STD`: sky, a blurred background)
are drawn again: no method could tell their photograph, and standardising would only amplify noise.

No pixel is shared between splits: each photograph is cut into square tiles, the tiles are dealt to
train / val / test (stratified, seeded), and the patches of a split are drawn only inside its tiles
(a random square of 60-100% of the tile side, a random quarter turn and mirror, resized to ``size``).
``patches.csv`` in the export records where each patch was cut.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from supcon.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "patch_set_export.json"
#: Where each patch was cut: ``split,class,file,top,left,side,quarter_turns,mirrored`` (pixels of the source).
BOXES = "patches.csv"
SPLITS = ("train", "val", "test")
#: Smallest grey-level standard deviation (0-255) of a patch kept; flatter ones are drawn again.
MIN_STD = 8.0
_DRAWS = 200


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError:
            raise UserError("this image set is cut from scikit-image's bundled photographs: "
                            "pip install scikit-image (it is in the test extra: pip install -e '.[test]')")
        return getattr(skimage.data, name)()
    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    return load


#: Set name -> class name -> loader of the source photograph (an HxW or HxWx3 uint8 array).
SOURCES: dict[str, dict[str, Callable[[], np.ndarray]]] = {
    "textures": {"brick": _skimage("brick"), "grass": _skimage("grass"), "gravel": _skimage("gravel"),
                 "tissue": _skimage("immunohistochemistry")},
    "photos": {"astronaut": _skimage("astronaut"), "cat": _skimage("chelsea"), "coffee": _skimage("coffee"),
               "temple": _sklearn("china.jpg")},
}


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return image.astype(np.float64)


def _standardise(patch: np.ndarray) -> np.ndarray:
    """Mean 128 and standard deviation 40 (clipped to 0-255), so level and contrast name no class."""
    centred = patch - patch.mean()
    scaled = centred * (40.0 / max(float(patch.std()), 1e-6)) + 128.0
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _deal_tiles(num_tiles: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(num_tiles)
    val = max(1, round(fractions[1] * num_tiles))
    test = max(1, round(fractions[2] * num_tiles))
    return [order[val + test:], order[:val], order[val:val + test]]


def draw_box(image: np.ndarray, tiles: np.ndarray, n: int, tile: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """``(top, left, side)`` of a random square of 60-100% of a tile side inside one of ``tiles`` (the ``n``-th,
    then the next ones when a tile is too flat), with a grey-level standard deviation of at least :data:`MIN_STD`.

    Raises:
        UserError: no such square in :data:`_DRAWS` draws.
    """
    cols = image.shape[1] // tile
    for attempt in range(_DRAWS):
        t = int(tiles[(n + attempt // 10) % len(tiles)])
        side = int(rng.integers(round(0.6 * tile), tile + 1))
        top = (t // cols) * tile + int(rng.integers(0, tile - side + 1))
        left = (t % cols) * tile + int(rng.integers(0, tile - side + 1))
        if image[top:top + side, left:left + side].std() >= MIN_STD:
            return top, left, side
    raise UserError(f"no patch with structure found in {_DRAWS} draws; the photograph is too flat for this set")


def export_patch_set(root: str | os.PathLike, name: str, size: int = 32,
                     per_class: tuple[int, int, int] = (150, 50, 50), tile: int = 48, seed: int = 0) -> Path:
    """Write ``root/{train,val,test}/<class>/<n>.png`` for the set ``name``; returns ``root``.

    Args:
        root: output folder; reused as is when it already holds this set with the same settings.
        name: one of :data:`SOURCES` (``textures``, ``photos``).
        size: side of the square patches written.
        per_class: patches per class in train, val and test.
        tile: side of the tiles the photographs are cut into (the unit dealt to the splits).
        seed: seed of the tile split and the patch draws.

    Raises:
        UserError: unknown set, or ``root`` exists, is not empty and is not this export.
    """
    if name not in SOURCES:
        raise UserError(f"unknown image set {name!r}; one of {', '.join(SOURCES)}")
    root = Path(root)
    settings = {"set": name, "size": size, "per_class": list(per_class), "tile": tile, "seed": seed}
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == settings:
            return root
        raise UserError(f"{root} holds a {name} export with other settings; choose another folder")
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not empty; choose another folder for the {name} export")
    rng = np.random.default_rng(seed)
    fractions = tuple(n / sum(per_class) for n in per_class)
    rows = ["split,class,file,top,left,side,quarter_turns,mirrored"]
    for class_name, load in SOURCES[name].items():
        image = _grey(load())
        tiles = _deal_tiles((image.shape[0] // tile) * (image.shape[1] // tile), fractions, rng)
        for split, split_tiles, count in zip(SPLITS, tiles, per_class, strict=True):
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                top, left, side = draw_box(image, split_tiles, n, tile, rng)
                turns, mirrored = int(rng.integers(4)), bool(rng.random() < 0.5)
                patch = np.rot90(image[top:top + side, left:left + side], k=turns)
                if mirrored:
                    patch = patch[:, ::-1]
                small = Image.fromarray(_standardise(patch)).resize((size, size), Image.BICUBIC)
                small.convert("RGB").save(folder / f"{n:04d}.png")
                rows.append(f"{split},{class_name},{n:04d}.png,{top},{left},{side},{turns},{int(mirrored)}")
    (root / BOXES).write_text("\n".join(rows) + "\n")
    marker.write_text(json.dumps(settings))
    logger.info("exported the %s set to %s (%s per class)", name, root, "/".join(map(str, per_class)))
    return root
