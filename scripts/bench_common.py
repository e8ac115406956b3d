"""What bench_train.py and bench_loader.py share: a JPEG folder to load, machine facts, JSON and tables."""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/bench_*.py` from anywhere
    sys.path.insert(0, str(REPO))

from supcon.data import EpochBatchSampler, MultiViewDataset, scan_image_folder  # noqa: E402
from supcon.gpu_augment import AugmentSpec, CropDataset  # noqa: E402

#: The normalisation of the benchmarks' generated images (ImageNet's; any fixed values do).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def two_view_dataset(samples, size: int, fast: bool, n_views: int = 2):
    """The training dataset of one data path: the fast path's uint8 crops, or the plain path's float views."""
    spec = AugmentSpec.supcon(size, MEAN, STD)
    if fast:
        return CropDataset(samples, spec, n_views, seed=0)
    return MultiViewDataset(samples, spec.torchvision_pipeline(), n_views, seed=0)


def folder_samples(data_folder: str | None, gen_images: int, log) -> tuple[list, object]:
    """``(samples, temporary folder or None)``: ``data_folder``'s images, else ``gen_images`` generated JPEGs
    (keep the returned folder object alive while the samples are read)."""
    generated = None
    if data_folder is None:
        import tempfile

        generated = tempfile.TemporaryDirectory(prefix="bench_jpegs_")
        log.info("generating %d 250x250 JPEGs in %s", gen_images, generated.name)
        data_folder = str(make_jpeg_folder(generated.name, gen_images))
    return scan_image_folder(data_folder).samples, generated


def make_jpeg_folder(root: str | os.PathLike, images: int, size: tuple[int, int] = (250, 250), classes: int = 4,
                     seed: int = 0, quality: int = 90) -> Path:
    """An ImageFolder of ``images`` photo-like JPEGs (smooth colour fields plus noise), ``classes`` classes.

    JPEG decode time depends on content; smooth fields with mild noise compress like photographs
    (about 15-25 KB at 250x250), unlike pure noise (incompressible) or flat colour (trivial).
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    for i in range(images):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.jpg"
        if path.exists():
            continue
        field = np.zeros((height, width, 3))
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            field += rng.uniform(20, 60, 3) * np.sin(fx * np.pi * xx + fy * np.pi * yy + phase)[..., None]
        pixels = field + rng.uniform(60, 190, 3) + rng.normal(0, 8, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)
    return root


def device_facts(device: torch.device) -> dict:
    """The machine: accelerator name and memory, CPU model, cores and threads used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"type": device.type, "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        facts["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                     cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        facts["name"] = cpu
    return facts


def device_slug(facts: dict) -> str:
    """``cpu`` or the GPU's name as a file-name part, e.g. ``nvidia-h100-80gb-hbm3``."""
    if facts["type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", facts["name"].lower()).strip("-")


def versions() -> dict:
    import accelerate
    import timm
    import torchvision

    import supcon

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "accelerate": accelerate.__version__, "supcon": supcon.__version__,
            "pillow": __import__("PIL").__version__}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def header(kind: str, device: torch.device) -> dict:
    """The common head of a benchmark JSON."""
    facts = device_facts(device)
    return {"benchmark": kind, "date": datetime.now().isoformat(timespec="seconds"), "device": facts,
            "versions": versions(), "git_commit": git_commit(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}


def write_json(data: dict, out: str | os.PathLike | None, kind: str) -> Path:
    """Write to ``out`` (a .json file, or a folder for ``<kind>_<device>_<date>[_N].json``)."""
    out = Path(out) if out else REPO / "benchmarks"
    if out.suffix != ".json":
        stem = f"{kind}_{device_slug(data['device'])}_{datetime.now():%Y%m%d}"
        out = out / f"{stem}.json"
        for number in itertools.count(2):  # a second run the same day gets its own file
            if not out.exists():
                break
            out = out.parent / f"{stem}_{number}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def publish(report: dict, out: str | os.PathLike | None, kind: str, title: str, columns: list[str],
            rows: list[list], generated=None) -> Path:
    """Write the JSON (:func:`write_json`), print ``title`` and the markdown table, remove the generated folder."""
    path = write_json(report, out, kind)
    print(f"\n{title}\n")
    print(markdown_table(columns, rows))
    print(f"\nwritten: {path}")
    if generated is not None:
        generated.cleanup()
    return path


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class EndlessBatches(EpochBatchSampler):
    """EpochBatchSampler's ``(index, epoch)`` batches, epoch after epoch, ``total`` of them."""

    def __init__(self, num_samples: int, batch_size: int, total: int):
        super().__init__(num_samples, batch_size, seed=0)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        produced = 0
        for epoch in itertools.count():
            self.set_epoch(epoch)
            for batch in super().__iter__():
                if produced == self.total:
                    return
                yield batch
                produced += 1
