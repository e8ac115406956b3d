"""Does ``--until plateau`` end runs where fixed lengths would, for fewer epochs?

For each image set of the quality benchmark (``scripts/bench_quality.py``: the digits and the patch
sets, no download) and each seed, it trains SupCon four times:

- fixed cosine runs of ``L/2``, ``L`` and ``2L`` epochs (the reference recipe's schedule);
- ``--until plateau --epochs 4L``: WSD with the live probe every ``--probe-every`` epochs, cooled down
  and stopped when the probe stops improving (or at the ceiling);

then ``probe-all --from auto`` and ``check-accuracies`` on each, and reports epochs used, wall time and
the selected test accuracy with its 95% interval, and McNemar's exact test of the auto-stopped run
against the best fixed run (the test images of all seeds pooled). Goal: the auto-stopped run is not
worse than the best fixed run while using at most half the epochs of the fixed run that first
reaches that accuracy.

    .venv/bin/python scripts/bench_until.py --length 12              # benchmarks/until/until_<device>_<date>.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import header, markdown_table, write_json  # noqa: E402
from bench_quality import DATASETS, export, network_args, probe_from_auto, run  # noqa: E402

from linear_probe.compare import mcnemar_exact  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench_until_work")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "until"))
    parser.add_argument("--datasets", default="digits,textures")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--length", type=int, default=12, help="L: the fixed runs train L/2, L and 2L epochs; the "
                                                               "auto-stopped run has a ceiling of 4L.")
    parser.add_argument("--probe-every", type=int, default=2, help="Live probe (and checkpoint) every N epochs.")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-class", default="100,50,50")
    parser.add_argument("--digits-train-per-class", type=int, default=40)
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--supcon-args", default="")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def variants(length: int) -> dict[str, list[str]]:
    half = max(3, length // 2)
    return {f"cosine_{half}": ["--epochs", str(half)], f"cosine_{length}": ["--epochs", str(length)],
            f"cosine_{2 * length}": ["--epochs", str(2 * length)],
            "until_plateau": ["--epochs", str(4 * length), "--until", "plateau"]}


def run_variant(dataset: str, data: Path, seed: int, name: str, extra: list[str], work: Path,
                args: argparse.Namespace) -> dict:
    run_dir = work / dataset / f"seed{seed}" / name
    log = run_dir.parent / f"{name}.log"
    common = [*network_args(args), "--seed", str(seed), "--save-freq", str(args.probe_every), "--probe-every",
              str(args.probe_every), "--knn-every", str(args.probe_every)]
    start = time.perf_counter()
    run(None, name, ["supcon-train", "--data-folder", str(data / "train"), *common, *extra, "--run-dir", str(run_dir),
                     "--resume", *args.supcon_args.split()], args.threads, log)
    train_seconds = time.perf_counter() - start
    note = probe_from_auto(None, ["probe-all", "--run", str(run_dir), "--seed", str(seed), "--num-workers", "0",
                                  "--quiet"], args.threads, log)
    run(None, "check-accuracies", ["check-accuracies", "--run", str(run_dir), "--output", str(run_dir),
                                   "--num-workers", "0", "--quiet"], args.threads, log)
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    import torch

    state = torch.load(run_dir / "last.pth", weights_only=True)
    decision = (state.get("plateau") or {}).get("decision")
    return {"dataset": dataset, "seed": seed, "variant": name, "epochs": int(state["epoch"]),
            "train_seconds": round(train_seconds, 1), "decision": decision, "note": note,
            "selected_epoch": metrics["selection"]["backbone_epoch"],
            "val_accuracy": metrics["selection"]["val_accuracy"],
            "accuracy": metrics["metrics"]["accuracy"], "interval": metrics["metrics"]["intervals"]["accuracy"],
            "correct": [int(p == y) for p, y in zip(metrics["predictions"], metrics["labels"], strict=True)]}


def summarize(results: list[dict], args: argparse.Namespace) -> tuple[dict, str]:
    lines, summary = [], {}
    names = list(variants(args.length))
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows, table = [], {}
        for name in names:
            cells = sorted((r for r in results if r["dataset"] == dataset and r["variant"] == name),
                           key=lambda r: r["seed"])
            table[name] = {"epochs": [c["epochs"] for c in cells], "accuracy": [c["accuracy"] for c in cells],
                           "seconds": [c["train_seconds"] for c in cells],
                           "correct": np.concatenate([c["correct"] for c in cells]).astype(bool)}
            rows.append([name.replace("_", " "), ", ".join(str(c["epochs"]) for c in cells),
                         f"{statistics.median(c['train_seconds'] for c in cells):.0f}",
                         ", ".join(f"{100 * c['accuracy']:.2f}% [{100 * c['interval'][0]:.1f}, "
                                   f"{100 * c['interval'][1]:.1f}]" for c in cells),
                         f"**{100 * statistics.median(c['accuracy'] for c in cells):.2f}%**"])
        fixed = [n for n in names if n != "until_plateau"]
        best = max(fixed, key=lambda n: table[n]["correct"].mean())
        auto = table["until_plateau"]
        only_auto, only_best, p = mcnemar_exact(auto["correct"], table[best]["correct"])
        worse = p < 0.05 and only_best > only_auto
        reaching = next((n for n in fixed if table[n]["correct"].mean() >= auto["correct"].mean() - 1e-12), None)
        auto_epochs = statistics.median(auto["epochs"])
        within_half = reaching is not None and auto_epochs <= 0.5 * statistics.median(table[reaching]["epochs"])
        summary[dataset] = {"best_fixed": best, "mcnemar_p": p, "only_auto": only_auto, "only_best": only_best,
                            "auto_not_worse": not worse, "first_fixed_reaching_auto": reaching,
                            "auto_median_epochs": auto_epochs, "half_the_epochs": within_half,
                            "table": {n: {k: v for k, v in t.items() if k != "correct"} for n, t in table.items()}}
        lines += [f"### {dataset}", "", markdown_table(["run", "epochs (per seed)", "train s (median)",
                                                         "test accuracy [95% interval] per seed", "median"], rows), ""]
        lines.append(f"- until plateau vs the best fixed run ({best.replace('_', ' ')}), test images of all seeds "
                     f"pooled: {only_auto}:{only_best} images only one of them gets right, McNemar p={p:.3g}: "
                     f"{'worse' if worse else 'not worse'}.")
        if reaching is None:
            longest = statistics.median(table[fixed[-1]]["epochs"])
            lines.append(f"- No fixed run reaches its pooled accuracy, so the half-the-epochs goal has nothing to "
                         f"compare with; until plateau used a median of {auto_epochs:g} epochs, the longest fixed "
                         f"run {longest:g}.")
        else:
            lines.append(f"- The first fixed run that reaches its pooled accuracy: {reaching.replace('_', ' ')}; "
                         f"until plateau used a median of {auto_epochs:g} epochs: "
                         f"{'at most' if within_half else 'more than'} half of it.")
        autos = sorted((r for r in results if r["dataset"] == dataset and r["variant"] == "until_plateau"),
                       key=lambda r: r["seed"])
        decisions = [c["decision"]["reason"] if c["decision"] else "-" for c in autos]
        lines += ["- Why each auto-stopped run stopped: " + " | ".join(decisions)]
        notes = [f"{r['variant'].replace('_', ' ')} seed {r['seed']}: {r['note']}" for r in results
                 if r["dataset"] == dataset and r.get("note")]
        lines += [*(["- Notes: " + "; ".join(notes) + "."] if notes else []), ""]
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    work = Path(args.workdir)
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown image set(s) {', '.join(unknown)}; one of {', '.join(DATASETS)}")
    start = time.perf_counter()
    data = {name: export(name, work / "data" / name, args) for name in datasets}
    jobs = [(d, s, n, e) for d in datasets for s in (int(x) for x in args.seeds.split(","))
            for n, e in variants(args.length).items()]
    jobs.sort(key=lambda j: -int(j[3][1]))  # the longest first, so the two workers end together
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda j: run_variant(j[0], data[j[0]], j[1], j[2], j[3], work, args), jobs))
    summary, markdown = summarize(results, args)
    report = {**header("until", torch.device("cpu")), "settings": vars(args), "summary": summary,
              "runs": [{k: v for k, v in r.items() if k != "correct"} for r in results],
              "wall_seconds": round(time.perf_counter() - start, 1)}
    path = write_json(report, args.out, "until")
    title = (f"# --until plateau against fixed lengths: {report['date'][:10]}, {report['device']['name']}, "
             f"L = {args.length}, {report['wall_seconds'] / 60:.0f} min\n\n`{report['command']}`\n")
    path.with_suffix(".md").write_text(f"{title}\n{markdown}\n")
    print(f"{title}\n{markdown}\nwritten: {path}")
    return report


if __name__ == "__main__":
    main()
