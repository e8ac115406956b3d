"""What the live probe costs: its time against the training time, from one run's metrics.csv.

Two settings, each one ``supcon-train`` run (the same process trains and probes, so the ratio holds on
a busy machine):

- ``demo``: the demo's digits (32 px, ResNet-18, batch 128) with the demo's checkpoint and kNN cadence
  (every 5 epochs) and the live probe at its default, every checkpoint save;
- ``224px``: generated 250x250 JPEGs at 224 px (ResNet-18, batch 32), the live probe every epoch
  without the kNN monitor (so each probe pays its own encoder pass), to measure one probe's cost; the
  overhead at the default cadence (every ``--save-freq`` = 50 epochs) follows from it.

    .venv/bin/python scripts/bench_live_probe.py       # benchmarks/live_probe_<device>_<date>.json
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import header, make_jpeg_folder, markdown_table, write_json  # noqa: E402
from bench_quality import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench_live_probe_work")
    parser.add_argument("--out", default=str(REPO / "benchmarks"))
    parser.add_argument("--demo-epochs", type=int, default=20)
    parser.add_argument("--demo-model", default="resnet18")
    parser.add_argument("--large-epochs", type=int, default=3)
    parser.add_argument("--large-images", type=int, default=160, help="Generated training images at 224 px.")
    parser.add_argument("--large-size", type=int, default=224)
    parser.add_argument("--large-model", default="resnet18")
    parser.add_argument("--large-batch-size", type=int, default=32)
    parser.add_argument("--default-save-freq", type=int, default=50, help="supcon-train's default --save-freq.")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def costs(run_dir: Path) -> dict:
    rows = read_rows(run_dir)
    train = sum(float(r["epoch_seconds"]) for r in rows)
    probes = [float(r["probe_seconds"]) for r in rows if r.get("probe_seconds")]
    return {"epochs": len(rows), "train_seconds": round(train, 2), "probes": len(probes),
            "probe_seconds": round(sum(probes), 2), "seconds_per_probe": round(sum(probes) / max(len(probes), 1), 3),
            "seconds_per_epoch": round(train / max(len(rows), 1), 3), "overhead": sum(probes) / train}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from supcon.digits import export_digits

    work = Path(args.workdir)
    log = work / "commands.log"
    digits = export_digits(work / "digits", size=32)
    demo = work / "runs" / "demo"
    save_freq = max(1, args.demo_epochs // 4)
    run(None, "demo", ["supcon-train", "--data-folder", str(digits / "train"), "--model", args.demo_model, "--size",
                       "32", "--batch-size", "128", "--epochs", str(args.demo_epochs), "--save-freq", str(save_freq),
                       "--knn-every", str(save_freq), "--no-flip", "--num-workers", "0", "--run-dir", str(demo),
                       "--resume", "--quiet"], args.threads, log)
    images = make_jpeg_folder(work / "jpegs" / "train", args.large_images, classes=4)
    make_jpeg_folder(work / "jpegs" / "val", max(40, args.large_images // 4), classes=4, seed=1)
    large = work / "runs" / "large"
    run(None, "large", ["supcon-train", "--data-folder", str(images), "--model", args.large_model, "--size",
                        str(args.large_size), "--batch-size", str(args.large_batch_size), "--epochs",
                        str(args.large_epochs), "--save-freq", "1", "--probe-every", "1", "--knn-every", "0",
                        "--num-workers", "0", "--run-dir", str(large), "--resume", "--quiet"], args.threads, log)
    demo_costs, large_costs = costs(demo), costs(large)
    large_costs["overhead_at_default_save_freq"] = (large_costs["seconds_per_probe"]
                                                    / (args.default_save_freq * large_costs["seconds_per_epoch"]))
    report = {**header("live_probe", torch.device("cpu")), "settings": vars(args), "demo": demo_costs,
              "large": large_costs}
    rows = [[f"demo digits, 32 px, probe + kNN every {save_freq} epochs", demo_costs["epochs"],
             demo_costs["probes"], demo_costs["seconds_per_epoch"], demo_costs["seconds_per_probe"],
             f"{100 * demo_costs['overhead']:.2f}%"],
            [f"{args.large_size} px, probe every epoch (own encoder pass)", large_costs["epochs"],
             large_costs["probes"], large_costs["seconds_per_epoch"], large_costs["seconds_per_probe"],
             f"{100 * large_costs['overhead']:.1f}% (every {args.default_save_freq} epochs: "
             f"{100 * large_costs['overhead_at_default_save_freq']:.2f}%)"]]
    path = write_json(report, args.out, "live_probe")
    table = markdown_table(["setting", "epochs", "probes", "train s / epoch", "s / probe", "probe time / train time"],
                           rows)
    path.with_suffix(".md").write_text(f"# Live probe cost: {report['date'][:10]}, {report['device']['name']}\n\n"
                                       f"`{report['command']}`\n\n{table}\n")
    print(table)
    print(f"written: {path}")
    return report


if __name__ == "__main__":
    main()
