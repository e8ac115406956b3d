"""SupCon at the budgets it is used at, against cross-entropy at its best: does the long pretraining pay off?

For each image set (built from images that ship inside installed packages, so no download) and seed,
the commands a user would run, each resumed if its run directory exists:

1. SupCon, ResNet-18, the project's defaults otherwise:
   - ``cosine400``: 400 epochs on the default (cosine) schedule;
   - ``wsd400``: 400 epochs on WSD (warm-up, a constant rate, a linear cool-down over the last 20%);
   - ``wsd50``, ``wsd100``, ``wsd200``: the same WSD run cooled down earlier. WSD's constant phase does not
     depend on ``--epochs``, so each is ``wsd400``'s checkpoint at 40, 80 or 160 epochs resumed with
     ``--epochs`` 50, 100 or 200 (``supcon-train --resume --epochs N`` on a WSD run at its stable rate):
     the run a user would have got with that budget, for the price of its cool-down;
   - ``until400``: ``--until plateau`` under a 400-epoch ceiling (it stops itself);
   each then ``probe-all --from auto`` (the linear probe, its checkpoint chosen on val).
2. Cross-entropy from scratch at its best: a grid of its augmentation (``standard``, and ``supcon``:
   SupCon's own) and its schedule (constant Adam, cosine), 200 epochs, ``best.pth`` chosen by val
   accuracy (early stopping by selection). The grid runs on the first seed; the configuration with the
   best val accuracy is then trained on the other seeds (chosen on val, never on test).
3. ``finetune``: that CE configuration fine-tuning the ``cosine400`` encoder (``baseline-train
   --init-from``), 100 epochs.
4. ``check-accuracies`` over the cell's runs: test accuracy with its 95% interval, per-image results.

Each finished cell's results (val and test accuracy, per-image test results, epochs, training seconds)
are written to ``benchmarks/convergence/cells/<set>_seed<N>.json`` as soon as they exist, so a later
session (or machine) can finish the benchmark and summarise every cell without the run folders. The
summary (``--summarize``, also after every run) pools the test images of the seeds per set and
compares each SupCon variant with the best CE run by McNemar's exact test.

``--val-only`` reads no test folder: it reports val accuracies, the mode for choosing defaults.

    .venv/bin/python scripts/bench_convergence.py --workdir /work/bench_conv            # everything (hours)
    .venv/bin/python scripts/bench_convergence.py --workdir W --datasets textures --only cosine400,wsd400
    .venv/bin/python scripts/bench_convergence.py --summarize                           # tables from cells/
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_common import header, markdown_table  # noqa: E402
from bench_quality import DATASETS, export, percent, probe_from_auto, run  # noqa: E402

from linear_probe.compare import mcnemar_exact  # noqa: E402

OUT = REPO / "benchmarks" / "convergence"
#: SupCon runs: name -> supcon-train options beyond the common ones.
SUPCON_RUNS = {
    "cosine400": ["--epochs", "400", "--save-freq", "20", "--probe-every", "10", "--knn-every", "20"],
    "wsd400": ["--schedule", "wsd", "--epochs", "400", "--cooldown-fraction", "0.2", "--save-freq", "10",
               "--probe-every", "5", "--knn-every", "20"],
    "until400": ["--until", "plateau", "--epochs", "400", "--save-freq", "10", "--probe-every", "5",
                 "--knn-every", "20"],
}
#: WSD budgets cut from wsd400: name -> (its --epochs, the wsd400 checkpoint its cool-down starts from).
WSD_BRANCHES = {"wsd50": (50, 40), "wsd100": (100, 80), "wsd200": (200, 160)}
SUPCON_NAMES = ["wsd50", "wsd100", "wsd200", "wsd400", "cosine400", "until400"]
#: The CE grid: name -> (--augment, --scheduler).
CE_GRID = {"ce_standard_constant": ("standard", "none"), "ce_standard_cosine": ("standard", "cosine"),
           "ce_supcon_constant": ("supcon", "none"), "ce_supcon_cosine": ("supcon", "cosine")}
CE_EPOCHS, FINETUNE_EPOCHS = 200, 100
LABELS = {"wsd50": "SupCon WSD 50 + probe", "wsd100": "SupCon WSD 100 + probe", "wsd200": "SupCon WSD 200 + probe",
          "wsd400": "SupCon WSD 400 + probe", "cosine400": "SupCon cosine 400 + probe",
          "until400": "SupCon --until plateau (ceiling 400) + probe", "finetune": "SupCon cosine 400, fine-tuned (CE)",
          "ce_best": "CE from scratch, best of the grid on val"}
ALL_STEPS = [*SUPCON_NAMES, "ce", "finetune", "check"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench_convergence_work", help="Image sets and runs (resumed).")
    parser.add_argument("--datasets", default="textures,digits,photos", help=f"Comma list of {', '.join(DATASETS)}.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--grid-seed", type=int,
                        help="The seed whose val accuracy chooses the CE configuration [default: the first seed].")
    parser.add_argument("--only", default=",".join(ALL_STEPS),
                        help=f"Comma list of the steps to run: {', '.join(ALL_STEPS)}.")
    parser.add_argument("--jobs", type=int, default=2, help="(image set, seed) cells run at once.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per command (results depend on it).")
    parser.add_argument("--val-only", action="store_true", help="Read no test folder; report val accuracies.")
    parser.add_argument("--summarize", action="store_true", help="Only rebuild the summary from the cell files.")
    parser.add_argument("--out", default=str(OUT), help="Folder of cells/ and the summary.")
    return parser.parse_args(argv)


def common_args() -> list[str]:
    return ["--model", "resnet18", "--size", "32", "--batch-size", "64", "--num-workers", "0", "--quiet"]


def quality_args() -> argparse.Namespace:
    """What bench_quality's exporter needs: the image sets at 32 px, 100/50/50 patches per class, 40 digits."""
    return argparse.Namespace(size=32, per_class="100,50,50", digits_train_per_class=40)


class Cell:
    """One (image set, seed): its data, its runs folder and its log."""

    def __init__(self, dataset: str, seed: int, data: Path, work: Path, args: argparse.Namespace):
        self.dataset, self.seed, self.data, self.args = dataset, seed, data, args
        self.runs = work / "runs" / dataset / f"seed{seed}"
        self.log = self.runs / "commands.log"
        self.train = str(data / "train")

    def run(self, step: str, argv: list[str]) -> None:
        run(None, step, argv, self.args.threads, self.log)

    def supcon(self, name: str) -> None:
        self.cell_run_dir(name).parent.mkdir(parents=True, exist_ok=True)
        if name in WSD_BRANCHES:
            self.branch(name)
        self.run(name, ["supcon-train", "--data-folder", self.train, *common_args(), "--seed", str(self.seed),
                        "--run-dir", str(self.cell_run_dir(name)), "--resume", *self.supcon_options(name)])
        probe_from_auto(None, ["probe-all", "--run", str(self.cell_run_dir(name)), "--seed", str(self.seed),
                               "--num-workers", "0", "--quiet"], self.args.threads, self.log)

    def supcon_options(self, name: str) -> list[str]:
        if name in WSD_BRANCHES:
            options = list(SUPCON_RUNS["wsd400"])
            options[options.index("--epochs") + 1] = str(WSD_BRANCHES[name][0])
            return options
        return SUPCON_RUNS[name]

    def branch(self, name: str) -> None:
        """Start ``name`` as wsd400's state after its branch epoch (once; later calls resume it)."""
        target = self.cell_run_dir(name)
        if target.exists():
            return
        source, (_, at) = self.cell_run_dir("wsd400"), WSD_BRANCHES[name]
        checkpoint = source / f"ckpt_epoch_{at}.pth"
        if not checkpoint.is_file():
            raise RuntimeError(f"{name} branches from {checkpoint}, which wsd400 has not written yet")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for item in ("config.yaml", "train_images.txt", "metrics.csv"):
            if (source / item).is_file():
                shutil.copy2(source / item, partial / item)
        for epoch in range(10, at + 1, 10):  # its checkpoints so far: probe-all may choose among them
            shutil.copy2(source / f"ckpt_epoch_{epoch}.pth", partial / f"ckpt_epoch_{epoch}.pth")
        shutil.copy2(checkpoint, partial / "last.pth")
        partial.rename(target)

    def cell_run_dir(self, name: str) -> Path:
        return self.runs / name

    def baseline(self, name: str, augment: str, scheduler: str, extra: list[str], epochs: int) -> None:
        self.run(name, ["baseline-train", "--data-folder", self.train, *common_args(), "--seed", str(self.seed),
                        "--epochs", str(epochs), "--augment", augment, "--scheduler", scheduler, "--monitor",
                        "val_accuracy", "--run-dir", str(self.cell_run_dir(name)), "--resume", *extra])


def ce_choice(work: Path, dataset: str, first_seed: int) -> str | None:
    """The CE configuration with the best val accuracy on the first seed (None until the grid is done)."""
    runs = work / "runs" / dataset / f"seed{first_seed}"
    scores = {}
    for name in CE_GRID:
        if not finished(runs / name, CE_EPOCHS) or not (runs / name / "best.pth").is_file():
            return None
        scores[name] = val_accuracy(runs / name)
    return max(CE_GRID, key=lambda n: (scores[n], -list(CE_GRID).index(n)))


def val_accuracy(run_dir: Path) -> float:
    selection = run_dir / "probe" / "selection.json"
    if selection.is_file():
        return float(json.loads(selection.read_text())["val_accuracy"])
    import torch

    return float(torch.load(run_dir / "best.pth", weights_only=True)["best_val_accuracy"])


def finished(run_dir: Path, epochs: int) -> bool:
    """A baseline or SupCon run whose metrics.csv reached its last epoch (or an early stop it recorded)."""
    rows = read_rows(run_dir)
    return bool(rows) and (int(float(rows[-1]["epoch"])) >= epochs or any(r.get("stop_decision") for r in rows))


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_cell(cell: Cell, steps: list[str], work: Path, first_seed: int) -> None:
    for name in ["wsd400", *WSD_BRANCHES, "cosine400", "until400"]:  # the branches start from wsd400
        if name in steps:
            cell.supcon(name)
    choice = ce_choice(work, cell.dataset, first_seed)
    if "ce" in steps:
        names = list(CE_GRID) if cell.seed == first_seed else ([choice] if choice else [])
        for name in names:
            cell.baseline(name, *CE_GRID[name], [], CE_EPOCHS)
        choice = ce_choice(work, cell.dataset, first_seed)
    if "finetune" in steps and choice and (cell.runs / "cosine400" / "probe" / "selection.json").is_file():
        cell.baseline("finetune", *CE_GRID[choice], ["--init-from", str(cell.runs / "cosine400")], FINETUNE_EPOCHS)
    networks = cell_networks(cell, choice)
    if "check" in steps and networks and not cell.args.val_only:
        cell.run("check-accuracies", ["check-accuracies", *[a for n in networks.values() for a in ("--run", str(n))],
                                      "--output", str(cell.runs), "--num-workers", "0", "--quiet"])
    write_cell(cell, networks, choice)


def cell_networks(cell: Cell, choice: str | None) -> dict[str, Path]:
    """The cell's finished runs, by table name (ce_best: the chosen CE configuration's run)."""
    networks = {}
    for name in SUPCON_NAMES:
        run_dir = cell.runs / name
        epochs = WSD_BRANCHES[name][0] if name in WSD_BRANCHES else 400
        if finished(run_dir, epochs) and (run_dir / "probe" / "selection.json").is_file():
            networks[name] = run_dir
    if choice and finished(cell.runs / choice, CE_EPOCHS):
        networks["ce_best"] = cell.runs / choice
    if finished(cell.runs / "finetune", FINETUNE_EPOCHS):
        networks["finetune"] = cell.runs / "finetune"
    return networks


def train_seconds(run_dir: Path) -> float:
    """Training time of the run as a user would have spent it (a WSD branch: wsd400's epochs before it too, whose
    rows its metrics.csv starts with)."""
    return round(sum(float(r.get("epoch_seconds") or 0) for r in read_rows(run_dir)), 1)


def write_cell(cell: Cell, networks: dict[str, Path], choice: str | None) -> None:
    """The cell's results so far, to ``<out>/cells/<set>_seed<N>.json`` (what the summary reads)."""
    result = {"dataset": cell.dataset, "seed": cell.seed, "ce_choice": choice, "runs": {}}
    for name, run_dir in networks.items():
        rows = read_rows(run_dir)
        entry = {"run": run_dir.name, "epochs": int(float(rows[-1]["epoch"])) if rows else None,
                 "train_seconds": train_seconds(run_dir), "val_accuracy": val_accuracy(run_dir)}
        selection = run_dir / "probe" / "selection.json"
        if selection.is_file():
            chosen = json.loads(selection.read_text())
            entry["selected_backbone_epoch"] = chosen.get("backbone_epoch")
            entry["advice"] = chosen.get("advice")
        decided = [r for r in rows if r.get("stop_decision")]
        if decided:
            entry["stop_decision"] = {"epoch": int(float(decided[0]["epoch"])), "reason": decided[0]["stop_decision"]}
        metrics_file = run_dir / "test_metrics.json"
        if not cell.args.val_only and metrics_file.is_file():
            tested = json.loads(metrics_file.read_text())
            entry["test"] = {"accuracy": tested["metrics"]["accuracy"],
                             "interval": tested["metrics"]["intervals"]["accuracy"],
                             "correct": "".join(str(int(p == y)) for p, y in
                                                zip(tested["predictions"], tested["labels"], strict=True))}
        result["runs"][name] = entry
    out = Path(cell.args.out) / "cells"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cell.dataset}_seed{cell.seed}{'_val' if cell.args.val_only else ''}.json").write_text(
        json.dumps(result, indent=1) + "\n")


def pooled(cells: list[dict], name: str, rival: str) -> dict | None:
    """``name`` against ``rival`` on the test images of every seed that has both (McNemar's exact test)."""
    both = [c for c in cells if "test" in c["runs"].get(name, {}) and "test" in c["runs"].get(rival, {})]
    if not both:
        return None
    a = np.array([ch == "1" for c in both for ch in c["runs"][name]["test"]["correct"]])
    b = np.array([ch == "1" for c in both for ch in c["runs"][rival]["test"]["correct"]])
    only_a, only_b, p = mcnemar_exact(a, b)
    outcome = "ties with" if p >= 0.05 else ("beats" if only_a > only_b else "loses to")
    return {"seeds": [c["seed"] for c in both], "only_this_correct": only_a, "only_rival_correct": only_b,
            "mcnemar_exact_p": p, "outcome": outcome, "accuracy": float(a.mean()), "rival_accuracy": float(b.mean())}


def summarize(out: Path, val_only: bool) -> tuple[dict, str]:
    """The per-set tables (test accuracy, epochs, time) and verdicts against CE at its best."""
    suffix = "_val.json" if val_only else ".json"
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob(f"*_seed*{suffix}"))
             if val_only or not p.name.endswith("_val.json")]
    summary, lines = {}, []
    for dataset in [d for d in DATASETS if any(c["dataset"] == d for c in cells)]:
        mine = sorted((c for c in cells if c["dataset"] == dataset), key=lambda c: c["seed"])
        seeds = [c["seed"] for c in mine]
        names = [n for n in [*SUPCON_NAMES, "finetune", "ce_best"] if any(n in c["runs"] for c in mine)]
        rows, table = [], {}
        for name in names:
            values, texts = [], []
            for c in mine:
                entry = c["runs"].get(name)
                if entry is None:
                    texts.append("-")
                    continue
                if val_only or "test" not in entry:
                    values.append(entry["val_accuracy"])
                    texts.append(f"val {percent(entry['val_accuracy'])}")
                else:
                    low, high = entry["test"]["interval"]
                    values.append(entry["test"]["accuracy"])
                    texts.append(f"{percent(entry['test']['accuracy'])} [{100 * low:.1f}, {100 * high:.1f}]")
            epochs = [c["runs"][name]["epochs"] for c in mine if name in c["runs"]]
            seconds = [c["runs"][name]["train_seconds"] for c in mine if name in c["runs"]]
            table[name] = {"per_seed": values, "epochs": epochs, "train_seconds": seconds}
            label = LABELS[name] + (f" ({mine[0]['ce_choice']})" if name == "ce_best" and mine[0]["ce_choice"] else "")
            rows.append([label, *texts, ", ".join(str(e) for e in epochs),
                         f"{statistics.median(seconds) / 60:.0f}" if seconds else "-",
                         f"**{percent(statistics.median(values))}**" if values else "-"])
        what = "val accuracy" if val_only else "test accuracy [95% interval]"
        lines += [f"### {dataset}", "", markdown_table(
            ["run", *[f"seed {s}" for s in seeds], "epochs", "train min (median)", "median"], rows), "",
            f"{what}; train min: the epochs' own time (the live probe included), one thread, two runs at once."]
        entry = {"table": table, "verdicts": {}}
        if not val_only:
            for name in [n for n in names if n != "ce_best"]:
                verdict = pooled(mine, name, "ce_best")
                if verdict is None:
                    continue
                entry["verdicts"][name] = verdict
                lines.append(f"- {LABELS[name]} {verdict['outcome']} CE at its best: {percent(verdict['accuracy'])} "
                             f"vs {percent(verdict['rival_accuracy'])} over seeds "
                             f"{', '.join(map(str, verdict['seeds']))}, {verdict['only_this_correct']}:"
                             f"{verdict['only_rival_correct']} images only one of them gets right, McNemar "
                             f"p={verdict['mcnemar_exact_p']:.3g}.")
        stops = [f"seed {c['seed']}: epoch {c['runs']['until400']['stop_decision']['epoch']} "
                 f"({c['runs']['until400']['stop_decision']['reason']})"
                 for c in mine if c["runs"].get("until400", {}).get("stop_decision")]
        if stops:
            lines.append("- Where --until plateau decided to cool down: " + "; ".join(stops) + ".")
        lines.append("")
        summary[dataset] = entry
    return summary, "\n".join(lines)


def write_summary(out: Path, val_only: bool, started: float | None = None) -> Path:
    import torch

    summary, markdown = summarize(out, val_only)
    report = {**header("convergence", torch.device("cpu")), "summary": summary}
    if started is not None:
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
    stem = "convergence_val" if val_only else "convergence"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    title = (f"# Convergence benchmark ({'val only' if val_only else 'test'}): {report['date'][:10]}, "
             f"{report['device']['name']}\n\n`{report['command']}`\n")
    path.with_suffix(".md").write_text(f"{title}\n{markdown}\n")
    print(f"{title}\n{markdown}\nwritten: {path} and {path.with_suffix('.md')}")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        write_summary(out, args.val_only)
        return
    work = Path(args.workdir)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown or any(s not in ALL_STEPS for s in steps):
        raise SystemExit(f"unknown image set or step in {args.datasets!r} / {args.only!r}; sets: "
                         f"{', '.join(DATASETS)}; steps: {', '.join(ALL_STEPS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    data = {name: export(name, work / "data" / name, quality_args()) for name in datasets}
    # the first seed of every set first: the other seeds train the CE configuration its grid chooses
    cells = [Cell(name, seed, data[name], work, args) for seed in seeds for name in datasets]
    first_seed = seeds[0] if args.grid_seed is None else args.grid_seed

    def one(cell: Cell) -> None:
        try:
            run_cell(cell, steps, work, first_seed)
        except RuntimeError as exc:  # one cell's failure is reported; the others go on
            print(f"{cell.dataset} seed {cell.seed}: {exc}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, cells))
    write_summary(out, args.val_only, started)


if __name__ == "__main__":
    main()
