"""Shared fixtures: tiny generated ImageFolders and a tiny trained run (CPU, seconds)."""

from __future__ import annotations

import configparser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny CPU models run fastest on one intra-op thread (on a shared 2-core machine two threads spin
# against each other, 5-10x slower). Subprocess tests pass OMP_NUM_THREADS to match, since the thread
# count changes results bit for bit.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier test set."""
    torch.set_num_threads(1)
    yield


REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, tuple[str, str]]:
    """``{"baseline-train": ("supcon.baseline.cli", "main"), ...}``: every command setup.cfg installs."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        module, attribute = target.split(":")
        scripts[name] = (module, attribute)
    return scripts


CLASS_COLOURS = {"cat": (210, 40, 40), "dog": (40, 40, 210), "fox": (40, 190, 40)}


def write_image_folder(root: Path, per_class: int, classes=CLASS_COLOURS, size: int = 32, seed: int = 0,
                       fmt: str = "png") -> Path:
    """An easily separable ImageFolder: each class is a noisy image around its own colour."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(0, 25, (size, size, 3)) + np.asarray(colour)
            # a bright square at a random place, so crops differ from each other
            y, x = rng.integers(0, size - 8, 2)
            pixels[y:y + 8, x:x + 8] = 255
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{name}_{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """``root/{train,val,test}/{cat,dog,fox}/*.png``: 12 / 6 / 6 images per class, 32x32."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", 12, seed=1)
    write_image_folder(root / "val", 6, seed=2)
    write_image_folder(root / "test", 6, seed=3)
    return root


@pytest.fixture(scope="session")
def train_folder(image_root) -> Path:
    return image_root / "train"


TINY_TRAIN_ARGS = ["--model", "test_resnet", "--small-input", "--size", "32", "--batch-size", "8",
                   "--num-workers", "0", "--knn-every", "1", "--quiet"]


def tiny_config(data_folder, run_dir, **overrides):
    """A TrainConfig for a seconds-long CPU run of timm's ``test_resnet``."""
    from supcon.config import TrainConfig

    values = dict(data_folder=str(data_folder), run_dir=str(run_dir), model="test_resnet", small_input=True,
                  size=32, batch_size=8, epochs=2, save_freq=1, num_workers=0, knn_every=1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, train_folder) -> Path:
    """A finished 4-epoch tiny SupCon run with checkpoints at epochs 2 and 4 (and last.pth)."""
    from supcon.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny_run"
    result = train(tiny_config(train_folder, run_dir, epochs=4, save_freq=2), progress=False)
    assert result.epochs_done == 4
    return run_dir


@pytest.fixture(scope="session")
def two_process_run(train_folder, tmp_path_factory) -> Path:
    """The multi-process tests' reference: ``torchrun --standalone --nproc-per-node 2`` on one launcher, 2 epochs."""
    from tests.launch_helpers import BATCH_ON_TWO, MODEL_ARGS, TORCHRUN, start, wait_all

    folder = tmp_path_factory.mktemp("two_processes")
    run_dir = folder / "run"
    log = folder / "train.log"
    launcher = start([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "supcon.cli", "--data-folder",
                      train_folder, "--run-dir", run_dir, *MODEL_ARGS, "--batch-size", BATCH_ON_TWO], folder, log)
    assert wait_all([launcher], timeout=300) == [0], log.read_text()[-3000:]
    return run_dir
