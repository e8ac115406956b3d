"""Benchmark data loading alone: source images/s of each pipeline per worker count, on real JPEGs.

Pipelines (each yields two views per source image at --size px):

* plain:    decode + torchvision's two-view augmentation (crop, flip, colour jitter, grayscale,
            normalise) in the workers: what ``supcon-train --no-gpu-augment`` loads;
* fast-cpu: decode + two RandomResizedCrops to uint8, the workers' half of the fast path
            (``--gpu-augment``: the colour ops then run on the training device);
* decode:   JPEG decode to RGB only, the ceiling of any pipeline.

Timing starts after the workers' first round of batches and runs through the real DataLoader
(supcon.data.make_loader: persistent workers, prefetch; pinned memory when a GPU is present).
Given a training figure (--train-rate, or --train-json from bench_train.py), it also reports how
many times what training consumes each loader delivers (the issue's goal: >= 1.5 with 16 workers).

    .venv/bin/python scripts/bench_loader.py                      # generated 250x250 JPEGs, 224 px views
    .venv/bin/python scripts/bench_loader.py --data-folder DIR --workers 0,1,2,4,8,16 \\
        --train-json benchmarks/train_nvidia-h100-80gb-hbm3_<date>.json

Writes benchmarks/loader_<device>_<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from supcon.data import load_rgb, make_loader  # noqa: E402

logger = logging.getLogger("bench_loader")
PIPELINES = ("plain", "fast-cpu", "decode")
#: Which bench_train data path consumes what each pipeline produces.
CONSUMER = {"plain": "cpu", "fast-cpu": "device"}


class DecodeOnly(Dataset):
    """Decode each image to RGB and return its size: the cost every pipeline pays first."""

    def __init__(self, samples):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        path, label = self.samples[index]
        image = load_rgb(path)
        return torch.tensor(image.size), label


def make_dataset(pipeline: str, samples, size: int):
    if pipeline in ("plain", "fast-cpu"):
        return bench.two_view_dataset(samples, size, fast=pipeline == "fast-cpu")
    return DecodeOnly(samples)


def measure(pipeline: str, workers: int, samples, args, pin: bool) -> dict:
    skip = max(workers, 1)  # each worker's first batch arrives at about the same time: not steady state
    sampler = bench.EndlessBatches(len(samples), args.batch_size, skip + args.batches)
    loader = make_loader(make_dataset(pipeline, samples, args.size), workers, pin, batch_sampler=sampler)
    batches = iter(loader)
    start_up = time.perf_counter()
    for _ in itertools.islice(batches, skip):
        pass
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    seconds = time.perf_counter() - start
    images_per_s = count * args.batch_size / seconds
    return {"pipeline": pipeline, "num_workers": workers, "batches": count, "batch_size": args.batch_size,
            "seconds": round(seconds, 4), "start_up_seconds": round(start - start_up, 3),
            "images_per_s": round(images_per_s, 2),
            "images_per_s_per_worker": round(images_per_s / max(workers, 1), 2)}


def training_rates(args) -> dict[str, float]:
    """What training consumes, per data path ('cpu' or 'device'), in source images/s."""
    if args.train_rate:
        return {"cpu": args.train_rate, "device": args.train_rate}
    if not args.train_json:
        return {}
    data = json.loads(Path(args.train_json).read_text())
    rates: dict[str, float] = {}
    for row in data["results"]:  # the fastest compute-only figure of each data path
        if row.get("data") == "synthetic" and row.get("images_per_s") and row.get("size") == args.size:
            path = row["data_path"]
            rates[path] = max(rates.get(path, 0.0), row["images_per_s"])
    return rates


def parse_args(argv=None):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default_workers = [w for w in (0, 1, 2, 4, 8, 16) if w <= cpus]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-folder", help="an ImageFolder of JPEGs [default: generate --gen-images 250x250 JPEGs]")
    parser.add_argument("--gen-images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224, help="view size in pixels")
    parser.add_argument("--batch-size", type=int, default=64 if torch.cuda.is_available() else 32)
    parser.add_argument("--workers", type=lambda t: [int(v) for v in t.split(",")], default=default_workers,
                        help="worker counts, comma-separated (0: the main process)")
    parser.add_argument("--pipelines", type=lambda t: [v.strip() for v in t.split(",")], default=list(PIPELINES),
                        help=f"comma-separated, of {', '.join(PIPELINES)}")
    parser.add_argument("--batches", type=int, default=30 if torch.cuda.is_available() else 8,
                        help="timed batches per measurement")
    parser.add_argument("--train-rate", type=float, help="source images/s that training consumes")
    parser.add_argument("--train-json", help="a bench_train.py JSON: its fastest synthetic figure per data path")
    parser.add_argument("--out", help="JSON file or folder [default: benchmarks/]")
    args = parser.parse_args(argv)
    unknown = [p for p in args.pipelines if p not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}; choose from {', '.join(PIPELINES)}")
    return args


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in DataLoader workers; keeps the main-process (0 workers) figure per core
    pin = torch.cuda.is_available()
    samples, generated = bench.folder_samples(args.data_folder, args.gen_images, logger)
    rates = training_rates(args)
    results = []
    for pipeline, workers in itertools.product(args.pipelines, args.workers):
        row = measure(pipeline, workers, samples, args, pin)
        consumer = CONSUMER.get(pipeline)
        if consumer in rates:
            row["training_images_per_s"] = rates[consumer]
            row["loader_over_training"] = round(row["images_per_s"] / rates[consumer], 3)
        logger.info("%-8s %2d workers: %8.1f img/s (%.1f per worker)%s", pipeline, workers, row["images_per_s"],
                    row["images_per_s_per_worker"],
                    f", x{row['loader_over_training']} of training" if "loader_over_training" in row else "")
        results.append(row)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = bench.header("loader", device)
    sizes = {tuple(load_rgb(p).size) for p, _ in samples[:20]}
    report["settings"] = {
        "data_folder": args.data_folder or f"generated: {args.gen_images} JPEGs 250x250", "images": len(samples),
        "image_sizes_seen": sorted(list(s) for s in sizes), "view_size": args.size, "views_per_image": 2,
        "batch_size": args.batch_size, "timed_batches": args.batches, "pin_memory": pin,
        "training_images_per_s": rates or None, "training_json": args.train_json,
        "unit": "source images per second (two views each)",
    }
    report["results"] = results
    columns = ["pipeline", "workers", "img/s", "img/s per worker"] + (["x training"] if rates else [])
    rows = [[r["pipeline"], r["num_workers"], r["images_per_s"], r["images_per_s_per_worker"]]
            + ([r.get("loader_over_training")] if rates else []) for r in results]
    title = (f"{report['device']['cpu']}, {report['device']['cpu_count']} CPUs, {args.size} px views, "
             f"batch {args.batch_size}")
    bench.publish(report, args.out, "loader", title, columns, rows, generated)
    return report


if __name__ == "__main__":
    main()
