"""Frozen-encoder features: encode a folder once per checkpoint, cache it on disk, or augment per epoch.

The fast path encodes every image once (deterministic eval transform) and trains the heads on the
cached tensors. The cache key is the checkpoint's content hash plus everything that decides the
features: the folder's listing (relative paths, labels, sizes, modification times), the image
size, mean/std and transform. A re-run, or new head settings, reuse the file; a changed
checkpoint or folder gets a new one.

Callers ask one question, "the frozen features of checkpoint C on folder F":
``FrozenFeatures(cache, size, ...).of(FrozenCheckpoint(path, device), index)``.

The classic protocol (``--augment``) instead draws fresh random crops of the training images
every head epoch and runs them through the frozen encoder; crops are a pure function of
``(seed, head epoch, image index)``, as in supcon-train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler
from torchvision import transforms

from linear_probe.checkpoints import assert_encoder_unchanged
from supcon.checkpoint import FileStamp, atomic_save, safe_load
from supcon.data import ImageFolderIndex, MultiViewDataset, eval_transform, make_loader
from supcon.errors import UserError
from supcon.frozen import build_frozen_encoder, encode_samples
from supcon.rundir import load_supcon_checkpoint

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "linear-probe-features"
#: Bump when the way features are computed changes, so old cache files stop matching.
FEATURES_VERSION = 1
EVAL_TRANSFORM_NAME = "resize-short-side+center-crop"

#: ``(features [B, D], labels [B])`` batches of one head epoch, given the 0-based head epoch.
EpochBatches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (``None``: leave as is), then restore the previous count."""
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def folder_fingerprint(index: ImageFolderIndex) -> str:
    """A hash of a folder's listing: class names, and each image's relative path, label, size and mtime."""
    digest = hashlib.sha256(json.dumps(index.classes).encode())
    root = Path(index.root)
    for path, label in index.samples:
        stat = os.stat(path)
        digest.update(f"\n{Path(path).relative_to(root).as_posix()}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def linear_eval_augmentation(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The reference SupCon linear evaluation's training augmentation: random resized crop and flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size=size, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


class FeatureCache:
    """Feature tensors on disk, one ``features_<key>.pt`` per (checkpoint content, folder, transform)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"features_{key[:32]}.pt"

    def load(self, fields: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached ``(features, labels)`` for ``fields``, or None (missing, unreadable, damaged or stale).

        A file cut short does not load; one whose bytes changed is caught by the SHA-256 of its
        tensors, stored beside them. Either is logged and recomputed, never trusted.
        """
        key = self.key(fields)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = safe_load(path)
        except UserError as exc:
            logger.warning("recomputing feature cache file %s: %s", path, exc)
            return None
        if not isinstance(data, dict) or data.get("format") != FEATURES_FORMAT or data.get("key") != key:
            return None
        if data.get("sha256") != tensors_sha256(data["features"], data["labels"]):
            logger.warning("recomputing feature cache file %s: its content does not match its hash", path)
            return None
        return data["features"], data["labels"]

    def store(self, fields: dict[str, Any], features: torch.Tensor, labels: torch.Tensor) -> Path:
        key = self.key(fields)
        path = self.path(key)
        features = features.contiguous()
        atomic_save({"format": FEATURES_FORMAT, "key": key, "fields": fields, "features": features,
                     "labels": labels, "sha256": tensors_sha256(features, labels)}, path)
        return path


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 over the dtype, shape and bytes of each tensor."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cached_features(cache: FeatureCache, encoder_fn: Callable[[], nn.Module], checkpoint_sha256: str,
                    index: ImageFolderIndex, fingerprint: str, size: int, mean: Sequence[float],
                    std: Sequence[float], device: torch.device, batch_size: int, num_workers: int,
                    progress: bool = False, what: str = "images") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Features of a folder for one checkpoint: from the cache, else encoded once and stored.

    Args:
        encoder_fn: returns the frozen encoder (on ``device``); called only on a cache miss.

    Returns:
        ``(features, labels, from_cache)``.
    """
    fields = {
        "version": FEATURES_VERSION, "checkpoint_sha256": checkpoint_sha256, "folder": fingerprint,
        "transform": EVAL_TRANSFORM_NAME, "size": int(size), "mean": [float(v) for v in mean],
        "std": [float(v) for v in std], "dtype": "float32",
    }
    hit = cache.load(fields)
    if hit is not None:
        return hit[0], hit[1], True
    features, labels = encode_samples(encoder_fn(), index.samples, eval_transform(size, mean, std), device,
                                      batch_size, num_workers, progress, desc=f"encoding {what}")
    cache.store(fields, features, labels)
    return features, labels, False


class FrozenCheckpoint:
    """One checkpoint as a frozen encoder: its state, its content hash, and the encoder, built on first use.

    The encoder is rebuilt only when something needs it (a cache miss, augmented crops) and at most
    once, so every folder encoded for this checkpoint shares it.

    Args:
        path: The checkpoint file.
        device: Where the encoder runs.
        state: The checkpoint's loaded state; read from ``path`` when not given.
        sha256: The file's content hash (part of the cache key); hashed from ``path`` on first use when not given.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device = torch.device("cpu"),
                 state: dict[str, Any] | None = None, sha256: str | None = None):
        self.path = Path(path)
        self.device = device
        self.state = load_supcon_checkpoint(self.path) if state is None else state
        self._sha256 = sha256
        self._encoder: nn.Module | None = None

    @property
    def sha256(self) -> str:
        """The checkpoint file's SHA-256, the part of the feature cache key that names the checkpoint."""
        if self._sha256 is None:
            self._sha256 = FileStamp.of(self.path).sha256
        return self._sha256

    def encoder(self) -> nn.Module:
        """The frozen encoder (projection head dropped, ``eval()``) on ``device``, built on the first call.

        Raises:
            UserError: the weights do not fit the recorded architecture.
        """
        if self._encoder is None:
            self._encoder = build_frozen_encoder(self.state, self.path).to(self.device)
        return self._encoder

    def assert_encoder_unchanged(self) -> None:
        """Check the encoder, if it was built, still equals the checkpoint's weights.

        Raises:
            RuntimeError: a tensor changed (a bug: nothing may train the frozen encoder).
        """
        if self._encoder is not None:
            assert_encoder_unchanged(self._encoder, self.state["encoder"], self.path)


@dataclass(frozen=True)
class FrozenFeatures:
    """How a run's frozen features are made and kept, the same for each of its checkpoints.

    Attributes:
        cache: Where the features are cached (a run's ``probe/cache``).
        size: The eval transform's image size (the run's).
        batch_size: Images per encoding batch.
        num_workers: Data loader workers for encoding.
        progress: Show a progress bar while encoding.
    """

    cache: FeatureCache
    size: int
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = False

    def of(self, checkpoint: FrozenCheckpoint, index: ImageFolderIndex, what: str = "images",
           fingerprint: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen features of ``checkpoint`` on the folder ``index``: from the cache, else encoded once and stored.

        Args:
            checkpoint: The checkpoint; its encoder is built only on a cache miss.
            index: The folder's images.
            what: Names the images in the progress bar.
            fingerprint: ``folder_fingerprint(index)`` when the caller already has it; computed when not given.

        Returns:
            ``(features [N, D] float32, labels [N])``, on the CPU.
        """
        fingerprint = folder_fingerprint(index) if fingerprint is None else fingerprint
        features, labels, _ = cached_features(
            self.cache, checkpoint.encoder, checkpoint.sha256, index, fingerprint, self.size,
            checkpoint.state["mean"], checkpoint.state["std"], checkpoint.device, self.batch_size, self.num_workers,
            self.progress, what)
        return features, labels


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one head epoch, a pure function of ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> EpochBatches:
    """Shuffled mini-batches of device-resident cached features (the last batch may be smaller)."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(features.shape[0], seed, epoch).to(features.device)
        for start in range(0, features.shape[0], batch_size):
            chosen = order[start:start + batch_size]
            yield features[chosen], labels[chosen]

    return batches


class ShuffledBatchSampler(Sampler):
    """Batches of ``(index, epoch)`` keys in :func:`epoch_order`, last partial batch kept."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        for start in range(0, self.num_samples, self.batch_size):
            yield [(i, self.epoch) for i in order[start:start + self.batch_size]]


def augmented_batches(encoder: nn.Module, samples: Sequence[tuple[str, int]], size: int, mean: Sequence[float],
                      std: Sequence[float], batch_size: int, seed: int, device: torch.device,
                      num_workers: int = 0) -> EpochBatches:
    """The classic protocol: every head epoch, fresh augmented crops through the frozen encoder."""
    dataset = MultiViewDataset(samples, linear_eval_augmentation(size, mean, std), n_views=1, seed=seed)
    sampler = ShuffledBatchSampler(len(dataset), batch_size, seed)
    loader = make_loader(dataset, num_workers, device.type == "cuda", batch_sampler=sampler)

    encoder_threads = torch.get_num_threads()  # the head may train on fewer; the encoder keeps these

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler.set_epoch(epoch)
        encoder.eval()
        iterator = iter(loader)
        while True:
            with torch_threads(encoder_threads), torch.no_grad():
                batch = next(iterator, None)
                if batch is None:
                    return
                views, targets = batch
                features = encoder(views[:, 0].to(device, non_blocking=True)).float()
            yield features, targets.to(device, non_blocking=True)

    return batches
