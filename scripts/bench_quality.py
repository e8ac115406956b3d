"""Does SupCon pay off? The whole pipeline against supervised training on small real image sets, several seeds.

For each image set (built from photographs and digits that ship inside installed packages, so no
download) and each seed, it runs the commands a user would:

1. ``supcon-train`` (the defaults, plus the model, size, batch, epochs and seed that a user must choose)
   -> ``probe-all --from auto`` -> the selected checkpoint's linear probe;
2. ``baseline-train --init-from`` that SupCon run: the supervised fine-tune from the SupCon encoder;
3. ``baseline-train``: the same network trained with cross-entropy from scratch, for the same epochs;
4. the classical peers on the pixels (``baseline-train --model svm|logreg|knn``, hyper-parameters on val);
5. ``check-accuracies`` over all of them (test accuracy with its 95% interval, McNemar against the best,
   the verdict of each SupCon-based run against the best supervised one), and once per selection rule
   on the SupCon run alone (which checkpoint each rule takes, and its test accuracy).

The summary (``benchmarks/quality/quality_<device>_<date>.{json,md}``) is one table per image set:
test accuracy per seed, the median, and the verdict of SupCon (probe, and fine-tuned) against the
cross-entropy network over the seeds (McNemar's exact test on the test images of all seeds pooled).

``--val-only`` runs steps 1-3 without reading any test folder and reports validation accuracies: the
mode for choosing defaults (never tune on a test split).

    .venv/bin/python scripts/bench_quality.py                      # the committed table (about an hour, CPU)
    .venv/bin/python scripts/bench_quality.py --val-only --tag crop05 --supcon-args "--crop-min 0.5"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_common import header, markdown_table, write_json  # noqa: E402

from linear_probe.compare import mcnemar_exact  # noqa: E402
from linear_probe.config import SELECTION_RULES  # noqa: E402
from supcon.digits import export_digits  # noqa: E402
from supcon.patch_sets import SOURCES, export_patch_set  # noqa: E402

DATASETS = ("digits", *SOURCES)
#: Run directory name -> row label of the tables.
SUPCON, FINETUNE, SCRATCH, SCRATCH_LONG = "supcon", "supcon_finetune", "ce_scratch", "ce_scratch_2x"
CLASSICAL = ("svm", "logreg", "knn")
LABELS = {SUPCON: "SupCon + linear probe", FINETUNE: "SupCon, then fine-tuned (CE)", SCRATCH: "CE from scratch",
          SCRATCH_LONG: "CE from scratch, twice the epochs (as many as SupCon + fine-tune)",
          "svm": "RBF SVM on pixels", "logreg": "logistic regression on pixels", "knn": "kNN on pixels"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench_quality_work", help="Image sets and runs (resumed if present).")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "quality"),
                        help="Folder (or .json file) of the summary; the .md table goes beside it.")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"Comma list of {', '.join(DATASETS)}.")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds of training (the image sets stay the same).")
    parser.add_argument("--epochs", type=int, default=40, help="Epochs of SupCon, the fine-tune and CE each.")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32, help="Image side the sets are written at.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-class", default="100,50,50", help="Patch sets: train,val,test images per class.")
    parser.add_argument("--digits-train-per-class", type=int, default=40,
                        help="Digits: training images per digit (val and test: the demo's split, 359 and 360).")
    parser.add_argument("--pixel-size", type=int, default=16, help="Side of the pixels the classical peers see "
                                                                   "(digits: 8, their own resolution).")
    parser.add_argument("--supcon-args", default="", help="Extra supcon-train options (a variant under study).")
    parser.add_argument("--baseline-args", default="", help="Extra options of both baseline-train networks.")
    parser.add_argument("--no-finetune", action="store_true", help="Skip the fine-tune from SupCon.")
    parser.add_argument("--no-long-ce", action="store_true",
                        help="Skip CE from scratch at twice the epochs (the fine-tune's total: SupCon + fine-tune).")
    parser.add_argument("--supcon-only", action="store_true",
                        help="With --val-only: only SupCon and its probes (comparing SupCon variants).")
    parser.add_argument("--val-only", action="store_true",
                        help="Choose-defaults mode: no test folder is read; report validation accuracies.")
    parser.add_argument("--tag", default="", help="Name of this variant (run folders and output file).")
    parser.add_argument("--jobs", type=int, default=2, help="(image set, seed) cells run at once.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per command (pinned: results depend "
                                                              "on it).")
    parser.add_argument("--small-input", action="store_true", help="The 3x3 stride-1 stem for SupCon and CE.")
    return parser.parse_args(argv)


@dataclass
class Cell:
    """One (image set, seed): its folders and the commands' timings."""

    dataset: str
    seed: int
    data: Path
    runs: Path
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def export(name: str, root: Path, args: argparse.Namespace) -> Path:
    """Write (or reuse) one image set; a lock beside it lets several benchmarks share one workdir."""
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if name == "digits":
            return export_digits(root, size=args.size, train_per_class=args.digits_train_per_class)
        per_class = tuple(int(v) for v in args.per_class.split(","))
        return export_patch_set(root, name, size=args.size, per_class=per_class)


def command_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run(cell: Cell | None, step: str, argv: list[str], threads: int, log: Path) -> None:
    """Run one command (its own process, pinned threads); its output goes to ``log``; fails loudly."""
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        done = subprocess.run([command_path(argv[0]), *argv[1:]], env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed (exit {done.returncode}); see {log}")
    if cell is not None:
        cell.seconds[step] = round(time.perf_counter() - start, 1)


def network_args(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--size", str(args.size), "--batch-size", str(args.batch_size),
            "--num-workers", "0", "--quiet", *(["--small-input"] if args.small_input else [])]


def run_cell(cell: Cell, args: argparse.Namespace, classical_runs: list[Path]) -> Cell:
    """Steps 1-3 (and 5 unless --val-only) for one image set and seed."""
    runs, seed, log = cell.runs, str(cell.seed), cell.runs / "commands.log"
    common = network_args(args)
    train = str(cell.data / "train")
    save_freq = str(max(1, args.epochs // 10))
    run(cell, "supcon-train", ["supcon-train", "--data-folder", train, *common, "--epochs", str(args.epochs),
                               "--save-freq", save_freq, "--knn-every", save_freq, "--seed", seed, "--run-dir",
                               str(runs / SUPCON), "--resume", *shlex.split(args.supcon_args)], args.threads, log)
    probe = ["probe-all", "--run", str(runs / SUPCON), "--seed", seed, "--num-workers", "0", "--quiet"]
    note = probe_from_auto(cell, probe, args.threads, log)
    if note:
        cell.notes.append(note)
    if args.val_only and args.supcon_only:
        return cell
    baseline = ["baseline-train", "--data-folder", train, *common, "--epochs", str(args.epochs), "--seed", seed,
                *shlex.split(args.baseline_args)]
    if not args.no_finetune:
        run(cell, "fine-tune", [*baseline, "--init-from", str(runs / SUPCON), "--run-dir", str(runs / FINETUNE),
                                "--resume"], args.threads, log)
    run(cell, "ce-scratch", [*baseline, "--run-dir", str(runs / SCRATCH), "--resume"], args.threads, log)
    if not (args.no_long_ce or args.no_finetune):
        run(cell, "ce-scratch-2x", [*baseline, "--epochs", str(2 * args.epochs), "--run-dir", str(runs / SCRATCH_LONG),
                                    "--resume"], args.threads, log)
    if args.val_only:
        return cell
    for rule in SELECTION_RULES:  # the default rule last: its result is what the SupCon run keeps
        if rule != SELECTION_RULES[0]:
            run(cell, f"check-{rule}", ["check-accuracies", "--run", str(runs / SUPCON), "--select", rule,
                                        "--output", str(runs / f"rule_{rule}"), "--bootstrap", "0",
                                        "--num-workers", "0", "--quiet"], args.threads, log)
            rule_metrics = json.loads((runs / SUPCON / "test_metrics.json").read_text())
            (runs / f"rule_{rule}" / "test_metrics.json").write_text(json.dumps(rule_metrics))
    networks = [runs / name for name in network_names(args)]
    run(cell, "check-accuracies", ["check-accuracies", *[a for r in [*networks, *classical_runs]
                                                         for a in ("--run", str(r))],
                                   "--output", str(runs), "--num-workers", "0", "--quiet"], args.threads, log)
    return cell


def probe_from_auto(cell: Cell | None, probe: list[str], threads: int, log: Path) -> str | None:
    """``probe-all --from auto``; on a run whose loss sat at the collapsed level (which it refuses), every
    checkpoint instead, and the note that says so."""
    try:
        run(cell, "probe-all", [*probe, "--from", "auto"], threads, log)
        return None
    except RuntimeError:
        if "collapsed level" not in log.read_text().splitlines()[-1]:
            raise
    run(cell, "probe-all", [*probe, "--from", "1"], threads, log)
    return "collapsed: the loss sat at the collapsed level throughout; probed from epoch 1"


def network_names(args: argparse.Namespace) -> list[str]:
    """The run folders of one cell's networks, in table order."""
    if args.val_only and args.supcon_only:
        return [SUPCON]
    if args.no_finetune:
        return [SUPCON, SCRATCH]
    return [SUPCON, FINETUNE, SCRATCH, *([] if args.no_long_ce else [SCRATCH_LONG])]


def fit_classical(name: str, data: Path, work: Path, args: argparse.Namespace) -> list[Path]:
    """The classical peers on the pixels (deterministic: once per image set)."""
    pixel_size = 8 if name == "digits" else args.pixel_size
    runs = []
    for model in CLASSICAL:
        run_dir = work / "classical" / model
        run(None, model, ["baseline-train", "--model", model, "--size", str(pixel_size), "--data-folder",
                          str(data / "train"), "--num-workers", "0", "--run-dir", str(run_dir), "--resume",
                          "--quiet"], args.threads, work / "classical" / "commands.log")
        runs.append(run_dir)
    return runs


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "test_metrics.json").read_text())


def val_accuracy(run_dir: Path) -> float:
    """The validation accuracy of the model a run would test: the probe selection's, or best.pth's."""
    selection = run_dir / "probe" / "selection.json"
    if selection.is_file():
        return float(json.loads(selection.read_text())["val_accuracy"])
    import torch

    return float(torch.load(run_dir / "best.pth", weights_only=True)["best_val_accuracy"])


def cell_result(cell: Cell, args: argparse.Namespace, classical_runs: list[Path]) -> dict:
    names = network_names(args)
    result = {"dataset": cell.dataset, "seed": cell.seed, "seconds": cell.seconds, "notes": cell.notes,
              "val_accuracy": {n: val_accuracy(cell.runs / n) for n in names}}
    selection = json.loads((cell.runs / SUPCON / "probe" / "selection.json").read_text())
    result["selected_backbone_epoch"] = selection["backbone_epoch"]
    result["advice"] = selection.get("advice")
    if args.val_only:
        return result
    tested = {n: metrics_of(cell.runs / n) for n in names}
    tested.update({r.name: metrics_of(r) for r in classical_runs})
    result["test"] = {n: {"accuracy": m["metrics"]["accuracy"], "interval": m["metrics"]["intervals"]["accuracy"],
                          "correct": [int(p == y) for p, y in zip(m["predictions"], m["labels"], strict=True)],
                          "verdict": m.get("verdict")} for n, m in tested.items()}
    result["rules"] = {}
    for rule in SELECTION_RULES:
        m = metrics_of(cell.runs / (SUPCON if rule == SELECTION_RULES[0] else f"rule_{rule}"))
        result["rules"][rule] = {"backbone_epoch": m["selection"]["backbone_epoch"],
                                 "val_accuracy": m["selection"]["val_accuracy"],
                                 "test_accuracy": m["metrics"]["accuracy"]}
    return result


def pooled(cells: list[dict], name: str, rival: str) -> dict:
    """``name`` against ``rival`` over every seed's test images (McNemar's exact test on the pooled pairs)."""
    a = np.concatenate([c["test"][name]["correct"] for c in cells]).astype(bool)
    b = np.concatenate([c["test"][rival]["correct"] for c in cells]).astype(bool)
    only_a, only_b, p = mcnemar_exact(a, b)
    outcome = "ties with" if p >= 0.05 else ("beats" if only_a > only_b else "loses to")
    return {"only_this_correct": only_a, "only_rival_correct": only_b, "mcnemar_exact_p": p, "outcome": outcome,
            "accuracy": float(a.mean()), "rival_accuracy": float(b.mean())}


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def summarize(results: list[dict], args: argparse.Namespace) -> tuple[dict, str]:
    """The per-dataset tables and verdicts (markdown) and their numbers."""
    summary, lines = {}, []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        cells = sorted((r for r in results if r["dataset"] == dataset), key=lambda r: r["seed"])
        seeds = [c["seed"] for c in cells]
        key = "val_accuracy" if args.val_only else "test"
        names = list(cells[0][key])
        rows, table = [], {}
        for name in names:
            values = [c[key][name] if args.val_only else c[key][name]["accuracy"] for c in cells]
            table[name] = {"per_seed": values, "median": statistics.median(values)}
            per_seed = [percent(v) if args.val_only else
                        f"{percent(v)} [{100 * c['test'][name]['interval'][0]:.1f}, "
                        f"{100 * c['test'][name]['interval'][1]:.1f}]" for v, c in zip(values, cells, strict=True)]
            rows.append([LABELS.get(name, name), *per_seed, f"**{percent(statistics.median(values))}**"])
        what = "val accuracy" if args.val_only else "test accuracy [95% interval]"
        lines += [f"### {dataset}", "", markdown_table(["run", *[f"seed {s}" for s in seeds], "median"], rows), ""]
        lines.append(f"{what}; SupCon's selected backbone epochs: "
                     f"{', '.join(str(c['selected_backbone_epoch']) for c in cells)} of {args.epochs}.")
        entry = {"table": table, "selected_backbone_epoch": [c["selected_backbone_epoch"] for c in cells]}
        if not args.val_only:
            entry["verdicts"] = {}
            pairs = [(SUPCON, SCRATCH), (FINETUNE, SCRATCH), (FINETUNE, SCRATCH_LONG)]
            for name, rival in ((n, r) for n, r in pairs if n in names and r in names):
                verdict = pooled(cells, name, rival)
                entry["verdicts"][f"{name}_vs_{rival}"] = verdict
                epochs = args.epochs * (2 if rival == SCRATCH_LONG else 1)
                per_seed = ", ".join((c["test"][name].get("verdict") or {}).get("outcome", "-") for c in cells)
                lines.append(f"- {LABELS[name]} {verdict['outcome']} CE from scratch at {epochs} epochs: "
                             f"{percent(verdict['accuracy'])} vs {percent(verdict['rival_accuracy'])} over the "
                             f"{len(cells)} seeds' test images, {verdict['only_this_correct']}:"
                             f"{verdict['only_rival_correct']} images only one of them gets right, McNemar "
                             f"p={verdict['mcnemar_exact_p']:.3g} (per seed, against the best supervised run: "
                             f"{per_seed}).")
            against_svm = {name: pooled(cells, name, "svm") for name in names if name != "svm"}  # not with itself
            entry["versus_svm"] = against_svm
            lines.append("- Against the RBF SVM on pixels: " + "; ".join(
                f"{LABELS[name]} {v['outcome']} it (p={v['mcnemar_exact_p']:.3g})" for name, v in against_svm.items())
                + ".")
            rule_rows = [[f"seed {c['seed']}", *[f"{c['rules'][r]['backbone_epoch']} / "
                                                  f"{percent(c['rules'][r]['test_accuracy'])}"
                                                  for r in SELECTION_RULES]] for c in cells]
            lines += ["", "Selection rules on the same SupCon runs (backbone epoch chosen on val / its test accuracy):",
                      "", markdown_table(["", *[f"`--select {r}`" for r in SELECTION_RULES]], rule_rows)]
        advice = [f"seed {c['seed']}: {c['advice']}" for c in cells if c.get("advice")]
        if advice:
            lines += ["", "probe-all's advice: " + "; ".join(advice) + "."]
        notes = [f"seed {c['seed']}: {note}" for c in cells for note in c.get("notes", [])]
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines.append("")
        summary[dataset] = entry
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    work = Path(args.workdir) / (args.tag or "default")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown image set(s) {', '.join(unknown)}; one of {', '.join(DATASETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    data = {name: export(name, Path(args.workdir) / "data" / name, args) for name in datasets}
    classical = {} if args.val_only else {name: fit_classical(name, data[name], work / name, args)
                                          for name in datasets}
    cells = [Cell(name, seed, data[name], work / name / f"seed{seed}") for name in datasets for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda c: run_cell(c, args, classical.get(c.dataset, [])), cells))
    results = [cell_result(c, args, classical.get(c.dataset, [])) for c in done]
    summary, markdown = summarize(results, args)
    report = {**header("quality", torch.device("cpu")), "settings": vars(args), "summary": summary,
              "cells": results, "wall_seconds": round(time.perf_counter() - start, 1)}
    kind = "quality" + (f"_{args.tag}" if args.tag else "") + ("_val" if args.val_only else "")
    path = write_json(report, args.out, kind)
    title = (f"# Quality benchmark{' (' + args.tag + ')' if args.tag else ''}: {report['date'][:10]}, "
             f"{report['device']['name']}, {args.threads} thread(s) per command, {args.jobs} at once, "
             f"{report['wall_seconds'] / 60:.0f} min\n\n`{report['command']}`\n")
    path.with_suffix(".md").write_text(f"{title}\n{markdown}\n")
    print(f"{title}\n{markdown}\nwritten: {path} and {path.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
