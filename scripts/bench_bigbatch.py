"""Small batch vs cross-batch memory vs a large contrastive batch by gradient caching, on an image folder.

For each seed and setting it runs the real commands: ``supcon-train`` (same epochs for every
setting), ``probe-all`` on the last checkpoint, ``check-accuracies`` for the test accuracy; then it
writes one row per run to ``OUT/results.csv`` and the medians over seeds to ``OUT/summary.md``.
Finished runs are reused, so an interrupted benchmark continues where it stopped.

    python scripts/bench_bigbatch.py --data digits --out /tmp/bigbatch --epochs 5 --seeds 0,1,2

``--train-per-class N`` first writes a harder split: only N training images per class (the first N
of a seeded shuffle), the same val and test folders.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

#: name -> supcon-train options; the contrastive batch and the memory are what differ.
SETTINGS = {
    "batch 16": ["--batch-size", "16"],
    "batch 16 + memory 1024": ["--batch-size", "16", "--memory-size", "1024"],
    "batch 256, chunk 16": ["--batch-size", "256", "--chunk-size", "16"],
}
FIELDS = ["dataset", "setting", "seed", "epochs", "val_accuracy", "test_accuracy", "train_seconds", "final_loss"]


def _run(args: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        module, function = _ENTRY_POINTS[args[0]]
        completed = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = {args[0]!r}; "
                                    f"from {module} import {function}; sys.exit({function}())", *args[1:]],
                                   stdout=f, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise click.ClickException(f"{args[0]} failed (exit {completed.returncode}); see {log}")


#: The console scripts, run with this interpreter (setup.cfg's entry points).
_ENTRY_POINTS = {"supcon-train": ("supcon.cli", "main"), "probe-all": ("linear_probe.cli", "probe_all_main"),
                 "check-accuracies": ("linear_probe.cli", "check_accuracies_main")}


def harder_split(data: Path, out: Path, per_class: int, seed: int = 0) -> Path:
    """``out/{train,val,test}``: ``per_class`` training images per class, val and test linked unchanged."""
    if (out / "train").is_dir():
        return out
    rng = random.Random(seed)
    for class_dir in sorted((data / "train").iterdir()):
        images = sorted(class_dir.iterdir())
        rng.shuffle(images)
        target = out / "train" / class_dir.name
        target.mkdir(parents=True)
        for image in images[:per_class]:
            shutil.copy2(image, target / image.name)
    for split in ("val", "test"):
        shutil.copytree(data / split, out / split)
    return out


def one_run(data: Path, run_dir: Path, setting: list[str], seed: int, epochs: int, model: str, size: int,
            log: Path) -> dict:
    train = ["supcon-train", "--data-folder", str(data / "train"), "--model", model, "--small-input",
             "--size", str(size), "--epochs", str(epochs), "--save-freq", str(epochs), "--knn-every", "0",
             "--num-workers", "0", "--no-flip", "--seed", str(seed), "--quiet", "--run-dir", str(run_dir),
             "--resume", *setting]
    _run(train, log)
    _run(["probe-all", "--run", str(run_dir), "--from", str(epochs), "--to", str(epochs),
          "--head-solver", "sgd", "--weight-decay", "1e-2",
          "--num-workers", "0", "--quiet"], log)
    _run(["check-accuracies", "--run", str(run_dir), "--output", str(run_dir), "--num-workers", "0", "--quiet"],
         log)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(run_dir / "comparison.csv", newline="") as f:
        (compared,) = list(csv.DictReader(f))
    return {"epochs": epochs, "val_accuracy": float(compared["val_accuracy"]),
            "test_accuracy": float(compared["accuracy"]),
            "train_seconds": round(sum(float(r["epoch_seconds"]) for r in rows), 1),
            "final_loss": float(rows[-1]["loss"])}


@click.command()
@click.option("--data", type=click.Path(file_okay=False, exists=True), required=True,
              help="Folder with train/, val/ and test/ ImageFolders.")
@click.option("--name", default=None, help="Dataset name in the tables [default: the folder's name].")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--model", default="test_resnet", show_default=True)
@click.option("--size", type=int, default=32, show_default=True)
@click.option("--train-per-class", type=int, default=None, help="Harder split: N training images per class.")
def main(data: str, name: str | None, out: str, epochs: int, seeds: str, model: str, size: int,
         train_per_class: int | None):
    """Probe accuracy and training time of the three settings, median over seeds."""
    out_dir, data_dir = Path(out), Path(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or data_dir.name
    if train_per_class:
        data_dir = harder_split(data_dir, out_dir / f"{name}_{train_per_class}_per_class", train_per_class)
        name = f"{name}, {train_per_class}/class"
    results_file = out_dir / "results.csv"
    done = []
    if results_file.exists():
        with open(results_file, newline="") as f:
            done = list(csv.DictReader(f))
    for seed in [int(s) for s in seeds.split(",")]:
        for setting, options in SETTINGS.items():
            if any(r["dataset"] == name and r["setting"] == setting and int(r["seed"]) == seed for r in done):
                continue
            slug = f"{name}_{setting}_seed{seed}".replace(" ", "_").replace(",", "").replace("/", "_per_")
            start = time.perf_counter()
            row = {"dataset": name, "setting": setting, "seed": seed,
                   **one_run(data_dir, out_dir / "runs" / slug, options, seed, epochs, model, size,
                             out_dir / f"{slug}.log")}
            click.echo(f"{row} ({time.perf_counter() - start:.0f} s)")
            new_file = not results_file.exists()
            with open(results_file, "a", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
            done.append({k: str(v) for k, v in row.items()})
            write_summary(done, out_dir / "summary.md")


def _median_cell(group: list[dict], field: str, scale: float = 100.0, digits: int = 1) -> str:
    values = [float(r[field]) * scale for r in group]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def write_summary(rows: list[dict], path: Path) -> None:
    """Median (and range) over seeds of each dataset x setting."""
    lines = ["| data | setting | seeds | val accuracy | test accuracy | training s |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["dataset"], r["setting"]) for r in rows))
    for dataset, setting in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["setting"] == setting]
        lines.append(f"| {dataset} | {setting} | {len(group)} | {_median_cell(group, 'val_accuracy')} | "
                     f"{_median_cell(group, 'test_accuracy')} | {_median_cell(group, 'train_seconds', 1.0, 0)} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
