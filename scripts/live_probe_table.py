"""Compare SupCon runs by what they recorded while training: the live probe and the loss against its collapsed level.

For each run directory it reads ``metrics.csv`` (no image is read, nothing is recomputed) and prints one row:
epochs trained, the live probe's val accuracy at the last and at the best probe, the final loss against the
collapsed level ``(T/T_base) log(2B - 1)``, and the spread of the projections. Used to compare training
variants on validation alone (``scripts/bench_quality.py --val-only --supcon-only`` runs), without a test split.

    .venv/bin/python scripts/live_probe_table.py WORK/lr031/textures/seed0/supcon WORK/lr125w/textures/seed0/supcon
    .venv/bin/python scripts/live_probe_table.py --json out.json RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import markdown_table  # noqa: E402


def summarize_run(run_dir: Path) -> dict:
    """The row of one run: its last and best live probe, and its last epoch's loss, collapsed level and spread.

    Raises:
        SystemExit: no ``metrics.csv``, or no live probe in it.
    """
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.csv (not a supcon-train run directory?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    probes = [r for r in rows if r.get("probe_accuracy")]
    if not probes:
        raise SystemExit(f"{run_dir}: no live probe in metrics.csv (trained with --probe-every 0, or no val folder)")
    last, best = probes[-1], max(probes, key=lambda r: (float(r["probe_accuracy"]), -int(r["epoch"])))
    final = rows[-1]
    return {"run": str(run_dir), "epochs": int(final["epoch"]),
            "last_probe": {"epoch": int(last["epoch"]), "accuracy": float(last["probe_accuracy"]),
                           "interval": [float(last["probe_low"]), float(last["probe_high"])]},
            "best_probe": {"epoch": int(best["epoch"]), "accuracy": float(best["probe_accuracy"])},
            "num_val": int(last["probe_num_val"]), "loss": float(final["loss"]),
            "collapsed_loss": float(final["collapsed_loss"]), "spread": float(final["spread"])}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="supcon-train run directories")
    parser.add_argument("--json", type=Path, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    rows = [summarize_run(run) for run in args.runs]
    table = [[r["run"], r["epochs"],
              f"{100 * r['last_probe']['accuracy']:.1f}% [{100 * r['last_probe']['interval'][0]:.1f}, "
              f"{100 * r['last_probe']['interval'][1]:.1f}] (epoch {r['last_probe']['epoch']})",
              f"{100 * r['best_probe']['accuracy']:.1f}% (epoch {r['best_probe']['epoch']})", r["num_val"],
              f"{r['loss']:.3f} / {r['collapsed_loss']:.3f}", f"{r['spread']:.4f}"] for r in rows]
    print(markdown_table(["run", "epochs", "live probe, last", "live probe, best", "val images",
                          "loss / collapsed level", "spread"], table))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
