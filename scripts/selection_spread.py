"""How much each selection rule's test accuracy varies across seeds, on the same probe curves.

For every run and probe seed it trains a fresh linear head on each checkpoint from ``--from auto``
on (cached features, the run's recorded probe settings with the seed replaced), lets each rule of
``check-accuracies --select`` choose from the val curves alone, and only then reads the chosen
head's test accuracy. With ``--one-vs-rest K`` the same features are relabelled "class K vs the
rest" (a second, imbalanced two-class split of the same images: no new training of the backbone).

Prints one row per (run, probe seed) and the median, range and standard deviation of each rule's
test accuracy over them; ``--output FILE.json`` keeps everything.

    .venv/bin/python scripts/selection_spread.py --run demo_seed0/runs/supcon_resnet18_bs128 \\
        --run demo_seed1/runs/supcon_resnet18_bs128 --probe-seeds 0,1,2
    .venv/bin/python scripts/selection_spread.py --run ... --one-vs-rest 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linear_probe.checkpoints import find_checkpoints  # noqa: E402
from linear_probe.config import SELECTION_RULES  # noqa: E402
from linear_probe.features import FeatureCache, FrozenCheckpoint, FrozenFeatures, cached_batches  # noqa: E402
from linear_probe.heads import HeadRecord, load_head_records  # noqa: E402
from linear_probe.probe import HeadSettings, make_head, train_linear_head  # noqa: E402
from linear_probe.probe_start import choose_from_run  # noqa: E402
from linear_probe.runs import RunInfo, resolve_folder, scan_checked  # noqa: E402
from linear_probe.select import select  # noqa: E402
from supcon.checkpoint import FileStamp  # noqa: E402
from supcon.frozen import resolve_device  # noqa: E402


def checkpoint_features(run: RunInfo, cache_dir: Path, device: torch.device) -> list[dict]:
    """Train/val/test features of every checkpoint from ``--from auto`` on (cached in the run's probe cache)."""
    train_folder = run.train_folder
    folders = {"train": train_folder,
               "val": resolve_folder(None, train_folder, "val", "--val-folder", run.run_info.get("val_folder")),
               "test": resolve_folder(None, train_folder, "test", "--test-folder")}
    indexes = {split: scan_checked(folder, f"{split} folder", run.class_names) for split, folder in folders.items()}
    frozen = FrozenFeatures(FeatureCache(cache_dir), run.size)
    out = []
    for ref in find_checkpoints(run.run_dir, choose_from_run(run.run_dir).epoch):
        stamp = FileStamp.of(ref.path)
        checkpoint = FrozenCheckpoint(ref.path, device, sha256=stamp.sha256)
        entry = {"ref": ref, "stamp": stamp}
        for split, index in indexes.items():
            features, labels = frozen.of(checkpoint, index, f"{split} images")
            entry[split] = (features.to(device), labels.to(device))
        entry["folders"] = folders
        out.append(entry)
    return out


def probe_and_select(entries: list[dict], settings: HeadSettings, class_names: list[str],
                     relabel) -> dict[str, dict]:
    """Heads for every checkpoint with ``settings``; each rule's choice and its test accuracy."""
    records, heads = [], {}
    for entry in entries:
        (train_x, train_y), (val_x, val_y) = entry["train"], entry["val"]
        train_y, val_y = relabel(train_y), relabel(val_y)
        steps = math.ceil(train_x.shape[0] / settings.batch_size)
        result = train_linear_head(cached_batches(train_x, train_y, settings.batch_size, settings.seed), steps,
                                   val_x, val_y, len(class_names), settings)
        ref = entry["ref"]
        record = HeadRecord(
            checkpoint=ref.name, checkpoint_stamp=entry["stamp"], backbone_epoch=ref.backbone_epoch,
            steps_into_epoch=ref.steps_into_epoch, best_val_accuracy=result.best_val_accuracy,
            best_head_epoch=result.best_head_epoch, best_val_loss=result.best_val_loss, settings=settings.to_dict(),
            settings_key=f"seed{settings.seed}", class_names=class_names, val_folder=entry["folders"]["val"],
            train_folder=entry["folders"]["train"], num_train=int(train_x.shape[0]), num_val=int(val_x.shape[0]),
            feature_dim=int(val_x.shape[1]), val_accuracy_per_epoch=result.val_accuracy_per_epoch,
            val_loss_per_epoch=result.val_loss_per_epoch)
        records.append(record)
        heads[ref.name] = (entry, result)
    chosen = {}
    for rule in SELECTION_RULES:
        selection = select(records, rule)  # validation curves only
        entry, result = heads[selection.record.checkpoint]
        head = make_head(selection.record.feature_dim, len(class_names), seed=0).to(entry["test"][0].device)
        head.load_state_dict(result.final_state_dict if selection.final_head else result.state_dict)
        test_x, test_y = entry["test"]
        with torch.no_grad():
            accuracy = float((head(test_x).argmax(1) == relabel(test_y)).float().mean())
        chosen[rule] = {"checkpoint": selection.record.checkpoint, "head_epoch": selection.head_epoch,
                        "val_accuracy": selection.val_accuracy, "test_accuracy": accuracy,
                        "within_noise": len(selection.within_noise), "candidates": selection.candidates}
    return chosen


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "range": max(values) - min(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="A probed SupCon run (repeatable).")
    parser.add_argument("--probe-seeds", default="0", help="Comma-separated head seeds, e.g. 0,1,2.")
    parser.add_argument("--one-vs-rest", help="Relabel to this class vs the rest (a class name, e.g. 3).")
    parser.add_argument("--cache-dir", help="Feature cache [default: each run's RUN/probe/cache, as probe-all].")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", help="Write every row and the summary to this JSON file.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.probe_seeds.split(",")]
    rows = []
    for run_dir in args.run:
        run = RunInfo.load(run_dir)
        recorded = load_head_records(run.probe_dir, run.run_dir)
        base = HeadSettings(**recorded[0].settings) if recorded else HeadSettings()
        entries = checkpoint_features(run, Path(args.cache_dir) if args.cache_dir else run.cache_dir, device)
        class_names = list(run.class_names)
        if args.one_vs_rest is not None:
            positive = class_names.index(args.one_vs_rest)
            class_names = ["rest", args.one_vs_rest]

            def relabel(labels, positive=positive):
                return (labels == positive).long()
        else:
            def relabel(labels):
                return labels
        for seed in seeds:
            chosen = probe_and_select(entries, replace(base, seed=seed), class_names, relabel)
            row = {"run": str(run_dir), "probe_seed": seed, **{rule: chosen[rule] for rule in SELECTION_RULES}}
            rows.append(row)
            print(f"{Path(run_dir).parent.parent.name}/{Path(run_dir).name} probe seed {seed}: " + "; ".join(
                f"{rule} {c['checkpoint']} head {c['head_epoch']} val {100 * c['val_accuracy']:.2f}% "
                f"test {100 * c['test_accuracy']:.2f}%" for rule, c in chosen.items()), flush=True)
    result = {"split": f"{args.one_vs_rest} vs rest" if args.one_vs_rest else "all classes", "rows": rows,
              "summary": {rule: summary([r[rule]["test_accuracy"] for r in rows]) for rule in SELECTION_RULES}}
    for rule, s in result["summary"].items():
        print(f"{rule}: test accuracy median {100 * s['median']:.2f}%, range {100 * s['min']:.2f}-"
              f"{100 * s['max']:.2f}% ({100 * s['range']:.2f} points), std {100 * s['std']:.2f} over {s['n']}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
