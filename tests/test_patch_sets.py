"""The patch image sets cut from package-shipped photographs: sizes, no pixel shared between splits, no flat patches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from supcon.errors import UserError
from supcon.patch_sets import BOXES, MARKER, MIN_STD, SOURCES, draw_box, export_patch_set

SMALL = dict(size=16, per_class=(12, 4, 4), tile=48, seed=3)


@pytest.fixture(scope="module", params=sorted(SOURCES))
def exported(request, tmp_path_factory):
    return request.param, export_patch_set(tmp_path_factory.mktemp(request.param) / "set", request.param, **SMALL)


def test_every_split_has_every_class_with_the_asked_counts_and_size(exported):
    name, root = exported
    for split, count in zip(("train", "val", "test"), SMALL["per_class"], strict=True):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == sorted(SOURCES[name])
        for folder in folders:
            files = sorted((root / split / folder).glob("*.png"))
            assert len(files) == count
            with Image.open(files[0]) as image:
                assert image.size == (16, 16) and image.mode == "RGB"


def test_no_pixel_of_a_photograph_is_in_two_splits(exported):
    """Patches of one split are cut from its own tiles: the boxes of different splits never overlap."""
    _, root = exported
    with open(root / BOXES, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(SMALL["per_class"]) * 4
    for class_name in {r["class"] for r in rows}:
        covered = {}
        for row in (r for r in rows if r["class"] == class_name):
            top, left, side = int(row["top"]), int(row["left"]), int(row["side"])
            for y in range(top, top + side, 4):  # a grid of sample points inside the box
                for x in range(left, left + side, 4):
                    covered.setdefault((y, x), set()).add(row["split"])
        assert all(len(splits) == 1 for splits in covered.values())


def test_flat_regions_are_never_cut():
    """On a photograph whose left half is flat, every box lies in the textured right half."""
    rng = np.random.default_rng(0)
    image = np.full((96, 192), 128.0)
    image[:, 96:] += rng.normal(0, 30, (96, 96))
    tiles = np.arange(8)  # 2 rows x 4 columns of 48-px tiles; columns 0-1 are flat
    boxes = [draw_box(image, tiles, n, 48, rng) for n in range(40)]
    assert all(left >= 96 for _, left, _ in boxes)
    assert all(image[top:top + s, left:left + s].std() >= MIN_STD for top, left, s in boxes)
    with pytest.raises(UserError, match="too flat"):
        draw_box(np.full((96, 96), 7.0), np.arange(4), 0, 48, rng)


def test_an_export_is_reused_with_the_same_settings_and_refused_with_others(exported):
    name, root = exported
    stamp = (root / MARKER).stat().st_mtime_ns
    assert export_patch_set(root, name, **SMALL) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp
    assert json.loads((root / MARKER).read_text())["set"] == name
    with pytest.raises(UserError, match="other settings"):
        export_patch_set(root, name, **{**SMALL, "seed": 4})


def test_unknown_set_and_a_foreign_folder_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown image set 'faces'"):
        export_patch_set(tmp_path / "x", "faces")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_patch_set(tmp_path / "busy", "textures")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
