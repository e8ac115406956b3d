"""Which probe head should be the default? The SGD protocol against L-BFGS, on val images only.

For each SupCon run given, on its last numbered checkpoint (features from the run's probe cache,
encoded once when missing), three val accuracies:

- ``SGD settled``: the recorded protocol (batch 256, LR 0.25, 100 head epochs, cosine), the mean val
  accuracy of its last tenth of head epochs (what ``check-accuracies`` scores a checkpoint by);
- ``L-BFGS, C on val``: logistic regression with its C chosen on the same val images it is scored on
  (what ``probe-all`` reports; optimistic by the choice of one C among 17);
- ``L-BFGS, C on the other half``: val split in two halves (stratified, seeded); C chosen on one half and
  scored on the other, both ways, averaged: no image both chooses C and scores it.

No test folder is read. The defaults of the project were chosen on this table
(``benchmarks/quality/probe_heads_val_<device>_<date>.{json,md}``).

    .venv/bin/python scripts/probe_heads_val.py bench_quality_work/val/*/seed*/supcon
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import header, markdown_table, write_json  # noqa: E402  (also puts the repo on sys.path)

from linear_probe.checkpoints import find_checkpoints  # noqa: E402
from linear_probe.features import FeatureCache, FrozenCheckpoint, FrozenFeatures, cached_batches  # noqa: E402
from linear_probe.probe import HeadSettings, train_linear_head  # noqa: E402
from linear_probe.runs import RunInfo, resolve_folder, scan_checked  # noqa: E402
from linear_probe.select import settled_values  # noqa: E402
from supcon.logistic import fit_logistic_regression, linear_scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stratified_halves(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two halves of the indices, every class split evenly (alternate members of a seeded permutation)."""
    rng = np.random.default_rng(seed)
    halves: tuple[list[int], list[int]] = ([], [])
    for label in np.unique(labels.numpy()):
        members = rng.permutation(np.flatnonzero(labels.numpy() == label))
        halves[0].extend(members[::2].tolist())
        halves[1].extend(members[1::2].tolist())
    return torch.tensor(sorted(halves[0])), torch.tensor(sorted(halves[1]))


def cross_half_accuracy(train_x, train_y, val_x, val_y, num_classes: int) -> float:
    """L-BFGS with C chosen on one half of val, scored on the other; the mean of both directions."""
    scores = []
    for choose, score in (stratified_halves(val_y), stratified_halves(val_y)[::-1]):
        fit = fit_logistic_regression(train_x, train_y, val_x[choose], val_y[choose], num_classes)
        predicted = linear_scores(val_x[score].double(), fit.weight.double(), fit.bias.double()).argmax(1)
        scores.append(float((predicted == val_y[score]).double().mean()))
    return float(np.mean(scores))


def compare_run(run_dir: str) -> dict:
    run = RunInfo.load(run_dir)
    train_index = scan_checked(run.train_folder, "train folder", run.class_names)
    val_index = scan_checked(resolve_folder(None, run.train_folder, "val", "--val-folder"), "val folder",
                             run.class_names)
    ref = [r for r in find_checkpoints(run.run_dir, 0) if r.name != "last.pth"][-1]
    checkpoint, frozen = FrozenCheckpoint(ref.path), FrozenFeatures(FeatureCache(run.cache_dir), run.size)
    train_x, train_y = frozen.of(checkpoint, train_index, "train")
    val_x, val_y = frozen.of(checkpoint, val_index, "val")
    classes = len(run.class_names)
    settings = HeadSettings()
    sgd = train_linear_head(cached_batches(train_x, train_y, settings.batch_size, settings.seed),
                            math.ceil(len(train_y) / settings.batch_size), val_x, val_y, classes, settings)
    on_val = fit_logistic_regression(train_x, train_y, val_x, val_y, classes)
    return {"run": str(run.run_dir), "backbone_epoch": ref.backbone_epoch, "num_val": len(val_y),
            "sgd_settled": settled_values(sgd.val_accuracy_per_epoch, sgd.best_val_accuracy),
            "lbfgs_c_on_val": on_val.val_accuracy,
            "lbfgs_c_on_other_half": cross_half_accuracy(train_x, train_y, val_x, val_y, classes)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="supcon-train run directories")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "quality"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [compare_run(run) for run in args.runs]
    gains = [r["lbfgs_c_on_other_half"] - r["sgd_settled"] for r in rows]
    table = markdown_table(
        ["run", "epoch", "val images", "SGD settled", "L-BFGS, C on val", "L-BFGS, C on the other half", "gain"],
        [[r["run"], r["backbone_epoch"], r["num_val"], f"{100 * r['sgd_settled']:.2f}%",
          f"{100 * r['lbfgs_c_on_val']:.2f}%", f"{100 * r['lbfgs_c_on_other_half']:.2f}%", f"{100 * g:+.2f}"]
         for r, g in zip(rows, gains, strict=True)])
    verdict = (f"L-BFGS with C chosen on the other half of val minus the SGD head's settled val accuracy: mean "
               f"{100 * statistics.mean(gains):+.2f} points, median {100 * statistics.median(gains):+.2f}, "
               f"{sum(g > 0 for g in gains)} of {len(gains)} runs higher, {sum(g < 0 for g in gains)} lower.")
    report = {**header("probe_heads_val", torch.device("cpu")), "runs": rows, "mean_gain": statistics.mean(gains)}
    path = write_json(report, args.out, "probe_heads_val")
    path.with_suffix(".md").write_text(f"# Probe heads on val: {report['date'][:10]}\n\n`{report['command']}`\n\n"
                                       f"{table}\n\n{verdict}\n")
    print(f"{table}\n\n{verdict}\nwritten: {path}")
    return report


if __name__ == "__main__":
    main()
