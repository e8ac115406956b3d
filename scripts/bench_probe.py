"""Benchmark probe-all: cached features vs the classic ``--augment`` protocol, same run, same data.

Probes the last ``--checkpoints`` checkpoints of a run for ``--epochs`` head epochs twice: once on
cached features (cold cache: the encoding is timed too) and once with fresh augmented crops through
the frozen encoder every head epoch. Reports the wall time of each, the ratio and the best val
accuracies, prints a table and writes ``benchmarks/probe_<device>_<date>.json``.

Without ``--run`` it builds its own: scikit-learn's digits (10 classes, offline) exported as an
ImageFolder, and a short SupCon run saving one checkpoint per epoch.

    .venv/bin/python scripts/bench_probe.py                       # digits, resnet10t at 16 px, 8 x 100
    .venv/bin/python scripts/bench_probe.py --run runs/my_run --num-workers 8
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import header, markdown_table, write_json  # noqa: E402  (also puts the repo on sys.path)

from linear_probe.config import ProbeConfig  # noqa: E402
from linear_probe.probe_all import probe_all  # noqa: E402
from supcon.frozen import resolve_device  # noqa: E402
from supcon.rundir import epoch_checkpoints  # noqa: E402

logger = logging.getLogger("bench_probe")


def build_run(work: Path, model: str, size: int, checkpoints: int, batch_size: int, num_workers: int) -> Path:
    """Export the digits and train a SupCon run with one checkpoint per epoch (reused when present)."""
    from supcon.config import TrainConfig
    from supcon.digits import export_digits
    from supcon.train import train

    data = export_digits(work / f"digits_{size}px", size=size)
    run_dir = work / f"run_{model}_{size}px_{checkpoints}ep"
    if len(epoch_checkpoints(run_dir)) >= checkpoints:
        return run_dir
    config = TrainConfig(data_folder=str(data / "train"), run_dir=str(run_dir), model=model, size=size,
                         batch_size=batch_size, epochs=checkpoints, save_freq=1, num_workers=num_workers,
                         knn_every=1, seed=0, resume=run_dir.exists())
    train(config, progress=False)
    return run_dir


def timed_probe(run_dir: Path, from_epoch: int, to_epoch: int, augment: bool, args) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="bench_probe_cache_") as cache_dir:  # cold cache: encoding counts
        start = time.perf_counter()
        result = probe_all(ProbeConfig(
            run=str(run_dir), from_epoch=from_epoch, to_epoch=to_epoch, epochs=args.epochs, augment=augment,
            head_solver="sgd", force=True, num_workers=args.num_workers, cache_dir=cache_dir, device=args.device,
        ))
        seconds = time.perf_counter() - start
    accuracies = {r.checkpoint: r.best_val_accuracy for r in result.records
                  if r.checkpoint in result.probed and bool(r.settings["augment"]) == augment
                  and r.settings["epochs"] == args.epochs}
    return seconds, accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="Existing SupCon run [default: build one on the digits].")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "supcon_bench",
                        help="Where the digits and the run are built.")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--size", type=int, default=16, help="Image size of the built run.")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=100, help="Head epochs.")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, help="A .json file or a folder [default: benchmarks/].")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    run_dir = args.run or build_run(args.work, args.model, args.size, args.checkpoints, args.train_batch_size,
                                    args.num_workers)
    epochs = list(epoch_checkpoints(run_dir))
    if len(epochs) < args.checkpoints:
        raise SystemExit(f"{run_dir} has {len(epochs)} checkpoints, fewer than --checkpoints {args.checkpoints}")
    from_epoch, to_epoch = epochs[-args.checkpoints], epochs[-1]

    cached_s, cached = timed_probe(run_dir, from_epoch, to_epoch, False, args)
    logger.info("cached: %.1f s", cached_s)
    augment_s, augmented = timed_probe(run_dir, from_epoch, to_epoch, True, args)
    logger.info("augment: %.1f s", augment_s)

    best_cached, best_augment = max(cached.values()), max(augmented.values())
    ratio = augment_s / cached_s
    gap_points = 100 * (best_augment - best_cached)
    report = {
        **header("probe", resolve_device(args.device)),
        "run": str(run_dir), "checkpoints": [f"ckpt_epoch_{e}.pth" for e in epochs[-args.checkpoints:]],
        "head_epochs": args.epochs, "num_workers": args.num_workers,
        "cached_seconds": round(cached_s, 2), "augment_seconds": round(augment_s, 2), "speedup": round(ratio, 2),
        "best_val_accuracy": {"cached": best_cached, "augment": best_augment},
        "augment_minus_cached_points": round(gap_points, 3),
        "per_checkpoint_val_accuracy": {name: {"cached": cached[name], "augment": augmented.get(name)}
                                        for name in sorted(cached, key=lambda n: int(n.split("_")[-1][:-4]))},
        "goal": {"speedup_at_least_25x": ratio >= 25, "cached_within_0.5_points_or_better": gap_points <= 0.5},
    }
    out = write_json(report, args.output, "probe")

    print(f"\n{len(cached)} checkpoints x {args.epochs} head epochs, run {run_dir}")
    print(markdown_table(["mode", "wall time (s)", "best val accuracy"], [
        ["cached features", f"{cached_s:.1f}", f"{100 * best_cached:.2f}%"],
        ["--augment", f"{augment_s:.1f}", f"{100 * best_augment:.2f}%"],
    ]))
    print(f"speed-up {ratio:.1f}x; augment - cached = {gap_points:+.2f} points; written {out}")
    for name, values in report["per_checkpoint_val_accuracy"].items():
        print(f"  {name}: cached {100 * values['cached']:.2f}%  augment {100 * values['augment']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
