"""Image folders: scanning, checking, mean/std, the two views and the epoch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from supcon.data import (
    EpochBatchSampler,
    MultiViewDataset,
    check_images,
    report_bad_images,
    scan_image_folder,
    two_view_augmentation,
)
from supcon.errors import UserError
from tests.conftest import write_image_folder


def test_scan_lists_sorted_classes_and_their_images(train_folder):
    index = scan_image_folder(train_folder)
    assert index.classes == ["cat", "dog", "fox"]
    assert len(index.samples) == 36
    assert index.targets == [0] * 12 + [1] * 12 + [2] * 12
    assert all(path.endswith(".png") and f"/{index.classes[label]}/" in path for path, label in index.samples)


def test_scan_ignores_hidden_entries_and_other_files(tmp_path):
    write_image_folder(tmp_path, 2, size=12)
    (tmp_path / ".cache").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"")
    index = scan_image_folder(tmp_path)
    assert index.classes == ["cat", "dog", "fox"]
    assert len(index.samples) == 6


@pytest.mark.parametrize("layout,message", [
    ("missing", "data folder not found"),
    ("file", "is not a directory"),
    ("empty", "has no class subfolders"),
    ("one_class", r"has 1 class folder \(cat\); at least 2 are needed"),
    ("empty_class", "class folder .*dog has no images"),
])
def test_scan_refuses_bad_folders(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "one_class":
        write_image_folder(root, 2, classes={"cat": (1, 2, 3)}, size=12)
    elif layout == "empty_class":
        write_image_folder(root, 2, size=12)
        for image in (root / "dog").iterdir():
            image.unlink()
    with pytest.raises(UserError, match=message):
        scan_image_folder(root)


def test_check_images_mean_std_over_all_pixels(tmp_path):
    write_image_folder(tmp_path, 3, size=12)
    paths = [p for p, _ in scan_image_folder(tmp_path).samples]
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
                             for p in paths])
    check = check_images(paths, compute_stats=True, progress=False)
    assert check.bad == []
    np.testing.assert_allclose(check.mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(check.std, pixels.std(0), atol=1e-6)
    assert check_images(paths, compute_stats=False, progress=False).mean is None


def test_check_images_finds_corrupt_and_truncated_files(tmp_path):
    write_image_folder(tmp_path, 3, size=12)
    corrupt = tmp_path / "cat" / "cat_001.png"
    corrupt.write_bytes(b"this is not a png")
    truncated = tmp_path / "dog" / "dog_002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    paths = [p for p, _ in scan_image_folder(tmp_path).samples]
    check = check_images(paths, compute_stats=True, progress=False)
    assert sorted(path for path, _ in check.bad) == sorted([str(corrupt), str(truncated)])
    with pytest.raises(UserError, match=f"unreadable image {corrupt}.*and 1 more.*--skip-bad-images"):
        report_bad_images(check.bad, skip=False)
    report_bad_images(check.bad, skip=True)  # only logs


def test_sampler_shards_the_single_process_batches():
    single = EpochBatchSampler(50, batch_size=8, seed=3)
    ranks = [EpochBatchSampler(50, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 5):
        single.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        single_batches = list(single)
        rank_batches = [list(sampler) for sampler in ranks]
        assert len(single_batches) == len(rank_batches[0]) == len(rank_batches[1]) == 50 // 8
        for b, batch in enumerate(single_batches):
            assert batch == rank_batches[0][b] + rank_batches[1][b]
            assert all(epoch_of == epoch for _, epoch_of in batch)
        seen = [i for batch in single_batches for i, _ in batch]
        assert len(set(seen)) == len(seen) == 48  # no repeats; the partial last batch is dropped


def test_sampler_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    def batches(seed, epoch, start=0):
        sampler = EpochBatchSampler(40, batch_size=4, seed=seed)
        sampler.set_epoch(epoch, start)
        return list(sampler)

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2)
    assert batches(0, 1) != batches(1, 1)
    assert batches(0, 1, start=3) == batches(0, 1)[3:]
    sampler = EpochBatchSampler(40, batch_size=4, seed=0)
    sampler.set_epoch(0, 3)
    assert len(sampler) == 7


def test_views_depend_only_on_seed_epoch_and_index(train_folder):
    samples = scan_image_folder(train_folder).samples[:4]
    dataset = MultiViewDataset(samples, two_view_augmentation(24, [0.5] * 3, [0.25] * 3), n_views=2, seed=0)
    views, label = dataset[(2, 1)]
    assert views.shape == (2, 3, 24, 24) and label == samples[2][1]
    assert not torch.equal(views[0], views[1])  # two different augmentations
    torch.manual_seed(1234)  # whatever the global RNG state was
    assert torch.equal(dataset[(2, 1)][0], views)
    assert not torch.equal(dataset[(2, 2)][0], views)  # another epoch, other crops
    other_seed = MultiViewDataset(samples, dataset.transform, n_views=2, seed=1)
    assert not torch.equal(other_seed[(2, 1)][0], views)


def test_augmentation_is_the_supcon_recipe():
    from torchvision import transforms

    steps = two_view_augmentation(32, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]).transforms
    crop, flip, jitter, gray, _, normalize = steps
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert isinstance(flip, transforms.RandomHorizontalFlip)
    assert isinstance(jitter, transforms.RandomApply) and jitter.p == 0.8
    color = jitter.transforms[0]
    assert (color.brightness, color.contrast, color.saturation, color.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                                (-0.1, 0.1))
    assert isinstance(gray, transforms.RandomGrayscale) and gray.p == 0.2
    assert normalize.mean == [0.1, 0.2, 0.3] and normalize.std == [0.4, 0.5, 0.6]


def test_crop_min_and_no_flip_reach_both_data_paths():
    from supcon.gpu_augment import AugmentSpec

    plain = two_view_augmentation(32, [0.5] * 3, [0.25] * 3, crop_min=0.5, flip=False)
    crop, flip = plain.transforms[0], plain.transforms[1]
    assert crop.scale == (0.5, 1.0) and flip.p == 0.0
    spec = AugmentSpec.supcon(32, [0.5] * 3, [0.25] * 3, crop_min=0.5, flip=False)
    assert spec.scale == (0.5, 1.0) and spec.flip_p == 0.0
    # the reference recipe stays the default
    default = AugmentSpec.supcon(32, [0.5] * 3, [0.25] * 3)
    assert default.scale == (0.2, 1.0) and default.flip_p == 0.5


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_crop_min_out_of_range_is_refused(value):
    from supcon.config import TrainConfig

    with pytest.raises(UserError, match="--crop-min"):
        TrainConfig(data_folder="x", crop_min=float(value)).validate()
