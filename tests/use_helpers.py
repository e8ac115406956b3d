"""Tiny runs for the export / predict / report tests (built once per session, treat as read-only)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import tiny_config, write_image_folder

_MADE: dict[str, Path] = {}

TWO_CLASSES = {"benign": (200, 60, 60), "malignant": (60, 60, 200)}


def plain_stem_probed_run(tmp_path_factory, train_folder: Path) -> Path:
    """A 2-epoch SupCon run of ``test_resnet`` with timm's own stem (no --small-input), probed."""
    if "plain" not in _MADE:
        from linear_probe.config import ProbeConfig
        from linear_probe.probe_all import probe_all
        from supcon.train import train

        run_dir = tmp_path_factory.mktemp("plain_stem") / "run"
        train(tiny_config(train_folder, run_dir, small_input=False, epochs=2, save_freq=1, knn_every=1),
              progress=False)
        probe_all(ProbeConfig(run=str(run_dir), num_workers=0, epochs=5, device="cpu", head_solver="sgd"))
        _MADE["plain"] = run_dir
    return _MADE["plain"]


def binary_image_root(tmp_path_factory) -> Path:
    """``root/{train,val,test}/{benign,malignant}``: 10 / 5 / 6 images per class, 32x32."""
    if "binary_root" not in _MADE:
        root = tmp_path_factory.mktemp("binary_images")
        write_image_folder(root / "train", 10, classes=TWO_CLASSES, seed=11)
        write_image_folder(root / "val", 5, classes=TWO_CLASSES, seed=12)
        write_image_folder(root / "test", 6, classes=TWO_CLASSES, seed=13)
        _MADE["binary_root"] = root
    return _MADE["binary_root"]


def binary_baseline_run(tmp_path_factory) -> Path:
    """A 2-epoch two-class baseline run of timm's ``test_resnet`` with a linear head."""
    if "baseline" not in _MADE:
        from supcon.baseline.config import BaselineConfig
        from supcon.baseline.train import train

        root = binary_image_root(tmp_path_factory)
        run_dir = tmp_path_factory.mktemp("baseline_binary") / "run"
        train(BaselineConfig(data_folder=str(root / "train"), run_dir=str(run_dir), model="test_resnet", head="linear",
                             small_input=True, size=32, batch_size=8, epochs=2, num_workers=0, augment="none",
                             seed=0, precision="fp32"), progress=False)
        _MADE["baseline"] = run_dir
    return _MADE["baseline"]
