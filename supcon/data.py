"""Image folders: scanning and checking, mean/std, the two-view augmentation (its spec) and the epoch sampler.

Randomness is a pure function of ``(seed, epoch, image index)``: the sampler's permutation is seeded
by ``(seed, epoch)`` and each sample's augmentation by ``(seed, epoch, index)``. So an epoch gives
the same batches and crops whatever the number of workers, and a run resumed mid-way sees exactly
what an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from supcon.errors import UserError

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Folder names (compared case-insensitively) that name a dataset split, not a class. A "class folder"
#: with one of these names almost always means a dataset root (``DATA/{train,val,test}``) was given
#: where one split was meant: training on it would mix the splits and leak the test set.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
#: The option that allows class folders named like splits, for the rare dataset whose classes are so named.
ALLOW_SPLIT_NAMES_OPTION = "--allow-split-class-names"
_OPTION_FOR = {"data folder": "--data-folder", "val folder": "--val-folder", "test folder": "--test-folder"}


@dataclass
class ImageFolderIndex:
    """The images of an ImageFolder: class names (sorted) and ``(path, label)`` samples."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def without(self, bad_paths: Sequence[str]) -> ImageFolderIndex:
        bad = set(bad_paths)
        return ImageFolderIndex(self.root, self.classes, [s for s in self.samples if s[0] not in bad])


def split_named(classes: Sequence[str]) -> list[str]:
    """The class folder names that name a dataset split (train/val/valid/validation/test, any case)."""
    names = {name for group in SPLIT_FOLDER_NAMES.values() for name in group}
    return [c for c in classes if c.lower() in names]


def _refuse_split_names(root: Path, what: str, classes: list[str]) -> None:
    """Raise for an ImageFolder whose class folders are named like dataset splits (a dataset root)."""
    found = split_named(classes)
    if not found:
        return
    wanted = "test" if "test" in what else "val" if "val" in what else "train"
    meant = next((c for c in classes if c.lower() in SPLIT_FOLDER_NAMES[wanted]), None)
    option = _OPTION_FOR.get(what, "the folder option")
    hint = f"point {option} at {root / meant}" if meant else f"point {option} at one split, not the dataset root"
    raise UserError(
        f"{what} {root} looks like a dataset root: its class folders {', '.join(found)} are named like dataset "
        f"splits, and training or evaluating on it would mix the splits (the test set would leak); {hint}, "
        f"or pass {ALLOW_SPLIT_NAMES_OPTION} if these really are class names"
    )


def scan_image_folder(root: str | os.PathLike, what: str = "data folder", min_classes: int = 2,
                      allow_split_names: bool = False) -> ImageFolderIndex:
    """List an ImageFolder (one subfolder per class) without opening any image.

    Args:
        root: the folder.
        what: how to name the folder in error messages (e.g. "val folder").
        min_classes: fewest class subfolders accepted.
        allow_split_names: accept class folders named like dataset splits (``train``, ``val``, ``test``...).

    Raises:
        UserError: the folder is missing, has no class subfolders, fewer than ``min_classes``
            classes, class folders named like dataset splits (unless ``allow_split_names``), or a
            class subfolder holds no image.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise UserError(f"{what} not found: {root_path}")
    if not root_path.is_dir():
        raise UserError(f"{what} is not a directory: {root_path}")
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{what} {root_path} has no class subfolders (expected one subfolder of images per class)")
    if not allow_split_names:
        _refuse_split_names(root_path, what, classes)
    if len(classes) < min_classes:
        raise UserError(
            f"{what} {root_path} has {len(classes)} class folder ({classes[0]}); at least {min_classes} are needed"
        )
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            str(p) for p in (root_path / name).rglob("*")
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise UserError(
                f"class folder {root_path / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "remove it or add images"
            )
        samples.extend((f, label) for f in files)
    return ImageFolderIndex(str(root_path), classes, samples)


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, fully decoded (so a truncated file fails here, not later)."""
    with Image.open(path) as img:
        return img.convert("RGB")


class _InspectDataset(Dataset):
    """Decodes each image once; returns per-channel sums for mean/std, or marks it unreadable."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            pixels = np.asarray(load_rgb(self.paths[index]), dtype=np.float64) / 255.0
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return index, False, reason, np.zeros(3), np.zeros(3), 0
        flat = pixels.reshape(-1, 3)
        return index, True, "", flat.sum(0), (flat * flat).sum(0), flat.shape[0]


@dataclass
class FolderCheck:
    """Result of decoding every image of a folder once."""

    bad: list[tuple[str, str]]  # (path, reason)
    mean: list[float] | None
    std: list[float] | None


def check_images(
    paths: Sequence[str], compute_stats: bool, num_workers: int = 0, progress: bool = True,
    desc: str = "checking images",
) -> FolderCheck:
    """Decode every image once: find unreadable ones and, optionally, the per-channel mean and std.

    The statistics are over all pixels of the readable images, in [0, 1], at their stored size.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(
        _InspectDataset(paths), batch_size=None, shuffle=False, num_workers=num_workers,
    )
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    bad: list[tuple[str, str]] = []
    for index, ok, reason, s, sq, n in tqdm(loader, total=len(paths), desc=desc, disable=not progress, leave=False):
        if not ok:
            bad.append((paths[int(index)], reason))
            continue
        total += np.asarray(s)
        total_sq += np.asarray(sq)
        count += int(n)
    if not compute_stats or count == 0:
        return FolderCheck(bad, None, None)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = np.maximum(std, 1e-6)  # a constant channel must not divide by zero
    return FolderCheck(bad, [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std])


def write_bad_image_list(bad: Sequence[tuple[str, str]], path: str | os.PathLike) -> None:
    """Write every unreadable image as ``path<TAB>reason``, one a line (atomically; creates the folder)."""
    from supcon.checkpoint import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text("".join(f"{p}\t{reason}\n" for p, reason in bad), path)


def report_bad_images(bad: list[tuple[str, str]], skip: bool, list_path: str | os.PathLike | None = None,
                      write_list: bool = True) -> None:
    """Raise for unreadable images unless ``skip``; then just log how many were dropped.

    Args:
        bad: ``(path, reason)`` of every unreadable image.
        skip: drop them (logged) instead of raising.
        list_path: where the full list goes (named in the message), so all can be fixed at once.
        write_list: write ``list_path`` here (False on the processes other than the main one).

    Raises:
        UserError: there are unreadable images and not ``skip``.
    """
    if not bad:
        if list_path is not None and write_list:
            Path(list_path).unlink(missing_ok=True)  # a list from an earlier, refused start is stale now
        return
    if list_path is not None and write_list:
        write_bad_image_list(bad, list_path)
    where = f"; all {len(bad)} are listed in {list_path}" if list_path is not None else ""
    if not skip:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(
            f"unreadable image {bad[0][0]}: {bad[0][1]}{more}{where}; fix or remove them, or pass --skip-bad-images"
        )
    logger.warning("skipping %d unreadable image(s)%s", len(bad), where or f", e.g. {bad[0][0]}")


@dataclass(frozen=True)
class AugmentSpec:
    """The settings of the two-view augmentation: the source of both the plain and the fast data path.

    Ranges are ``(low, high)`` of the uniformly drawn factor (brightness 0.4 is ``(0.6, 1.4)``);
    ``None`` turns that op off. The plain path is :meth:`torchvision_pipeline`; the fast path
    (:mod:`supcon.gpu_augment`) crops in the workers and applies the rest on the device.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float
    jitter_p: float
    brightness: tuple[float, float] | None
    contrast: tuple[float, float] | None
    saturation: tuple[float, float] | None
    hue: tuple[float, float] | None
    grayscale_p: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def supcon(cls, size: int, mean: Sequence[float], std: Sequence[float], crop_min: float = 0.2,
               flip: bool = True) -> AugmentSpec:
        """The SupCon training augmentation (Khosla et al. 2020), applied independently per view.

        Args:
            crop_min: smallest crop area (fraction of the image) of RandomResizedCrop; 0.2 in the reference.
            flip: random horizontal flips (turn off where mirror images mean something else, e.g. text).
        """
        jitter = (0.6, 1.4)  # ColorJitter(0.4, 0.4, 0.4, 0.1)
        return cls(size=size, scale=(crop_min, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5 if flip else 0.0,
                   jitter_p=0.8, brightness=jitter, contrast=jitter, saturation=jitter, hue=(-0.1, 0.1),
                   grayscale_p=0.2, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))

    def crop(self) -> transforms.RandomResizedCrop:
        """The random crop, bilinear (shared by both paths, so crop boxes and resampling agree)."""
        return transforms.RandomResizedCrop(size=self.size, scale=self.scale, ratio=self.ratio,
                                            interpolation=transforms.InterpolationMode.BILINEAR)

    def torchvision_pipeline(self) -> transforms.Compose:
        """The plain path: every op per image in PIL/torchvision, in the loader workers."""
        jitter = transforms.ColorJitter(brightness=self.brightness or 0, contrast=self.contrast or 0,
                                        saturation=self.saturation or 0, hue=self.hue or 0)
        return transforms.Compose([
            self.crop(),
            transforms.RandomHorizontalFlip(p=self.flip_p),
            transforms.RandomApply([jitter], p=self.jitter_p),
            transforms.RandomGrayscale(p=self.grayscale_p),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(self.mean), std=list(self.std)),
        ])


def two_view_augmentation(size: int, mean: Sequence[float], std: Sequence[float], crop_min: float = 0.2,
                          flip: bool = True) -> transforms.Compose:
    """The plain path's torchvision pipeline of :meth:`AugmentSpec.supcon`."""
    return AugmentSpec.supcon(size, mean, std, crop_min=crop_min, flip=flip).torchvision_pipeline()


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Deterministic preprocessing for feature extraction: resize the short side, centre crop."""
    return transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """A 63-bit seed that depends on all the numbers (no collisions between neighbours).

    ``draw``: which time the image is drawn in the epoch, counted from 0; a sampler that repeats images
    (:class:`supcon.sampling.BalancedBatchSampler`) gives each repeat other crops. Draw 0 is the seed of
    ``(seed, epoch, index)`` alone.
    """
    entropy = [seed, epoch, index] if draw == 0 else [seed, epoch, index, draw]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> 1)


class MultiViewDataset(Dataset):
    """Returns ``(views [n_views, C, H, W], label)`` for an ``(index, epoch)`` or ``(index, epoch, draw)`` key
    from the sampler (``draw``: see :func:`sample_seed`)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, n_views: int = 2, seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.n_views = n_views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, draw = (*key, 0)[:3] if isinstance(key, tuple) else (key, 0, 0)
        path, label = self.samples[index]
        image = load_rgb(path)
        # torchvision's transforms draw from the global torch RNG; seeding it per sample makes the
        # crops a function of (seed, epoch, index, draw) whatever process or worker decodes the image.
        torch.manual_seed(sample_seed(self.seed, epoch, index, draw))
        views = torch.stack([self.transform(image) for _ in range(self.n_views)])
        return views, label


class EvalDataset(Dataset):
    """Returns ``(image tensor, label)`` through a deterministic transform."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


class EpochBatchSampler(Sampler):
    """Shuffled batches for one process of ``world_size``, a pure function of ``(seed, epoch)``.

    Each global batch of ``batch_size * world_size`` images is cut into one contiguous slice per
    process, so the processes together see exactly the single-process batch. The last partial
    global batch is dropped (contrastive batches must be full). Yields lists of ``(index, epoch)``.
    A subclass chooses other global batches by overriding :meth:`global_batches`
    (:class:`supcon.sampling.BalancedBatchSampler`); the slicing stays this one.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return self.num_samples // self.global_batch - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch, and the batch to start from when resuming mid-epoch."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        first = self.rank * self.batch_size
        for batch in self.global_batches():
            yield batch[first:first + self.batch_size]

    def global_batches(self) -> Iterator[list[tuple[int, ...]]]:
        """The epoch's global batches of keys, from ``start_batch`` on: slices of one seeded permutation."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        size = self.global_batch
        for b in range(self.start_batch, self.num_samples // size):
            yield [(i, self.epoch) for i in order[b * size:(b + 1) * size]]


def make_loader(dataset: Dataset, num_workers: int, pin_memory: bool, persistent: bool = True,
                **kwargs) -> DataLoader:
    """A DataLoader with the fast settings (persistent workers, prefetch) when workers are used.

    ``persistent=False`` for loaders used now and then (the kNN monitor): their workers exit after
    each pass instead of holding memory for the whole run.
    """
    extra = {}
    if num_workers > 0:
        extra.update(persistent_workers=persistent, prefetch_factor=4)
    return DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, **extra, **kwargs)
