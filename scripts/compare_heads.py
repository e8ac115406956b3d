"""Compare probe-all's two heads on every checkpoint of a run: the SGD protocol and L-BFGS logistic regression.

For each checkpoint the train/val/test features come from the run's feature cache (encoded once
when missing); both heads are then fit on the same cached tensors in this process, and timed
(head fitting only: the encoding is shared). Prints val and test accuracy per checkpoint and head,
with the seconds each fit took, then for each solver the checkpoint chosen on val alone among those
from ``--from`` (highest val accuracy, then lower val cross-entropy, then the later checkpoint, as
check-accuracies chooses) and its test accuracy. The test columns are for this report only.

    .venv/bin/python scripts/compare_heads.py --run demo/runs/supcon_resnet18_bs128 --weight-decay 1e-2 --from auto
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table  # noqa: E402  (also puts the repo on sys.path)

from linear_probe.checkpoints import find_checkpoints  # noqa: E402
from linear_probe.config import ProbeConfig  # noqa: E402
from linear_probe.features import FeatureCache, FrozenCheckpoint, FrozenFeatures, cached_batches  # noqa: E402
from linear_probe.lbfgs import train_lbfgs_head  # noqa: E402
from linear_probe.probe import HeadSettings, train_linear_head  # noqa: E402
from linear_probe.probe_start import choose_from_run  # noqa: E402
from linear_probe.runs import RunInfo, resolve_folder, scan_checked  # noqa: E402
from supcon.logistic import linear_scores  # noqa: E402


def accuracy(state_dict: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> float:
    logits = linear_scores(features.double(), state_dict["weight"].double(), state_dict["bias"].double())
    return float((logits.argmax(1) == labels).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a supcon-train run directory")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="the SGD head's (the demo probes with 1e-2)")
    parser.add_argument("--epochs", type=int, default=100, help="SGD head epochs")
    parser.add_argument("--from", dest="from_epoch", default="0",
                        help="first backbone epoch of the val choice, or 'auto' (probe-all's rule) [default: 0]")
    args = parser.parse_args()
    torch.set_num_threads(1)

    run = RunInfo.load(args.run)
    train_index = scan_checked(run.train_folder, "train folder", run.class_names)
    val_index = scan_checked(resolve_folder(None, run.train_folder, "val", "--val-folder"), "val folder",
                             run.class_names)
    test_index = scan_checked(resolve_folder(None, run.train_folder, "test", "--test-folder"), "test folder",
                              run.class_names)
    frozen = FrozenFeatures(FeatureCache(run.cache_dir), run.size)
    settings = HeadSettings(weight_decay=args.weight_decay, epochs=args.epochs)
    device = torch.device("cpu")
    if args.from_epoch == "auto":
        from_epoch = choose_from_run(run.run_dir, ProbeConfig.auto_tolerance).epoch
    else:
        from_epoch = int(args.from_epoch)
    rows, totals = [], {"sgd": 0.0, "lbfgs": 0.0}
    candidates: dict[str, list[tuple]] = {"sgd": [], "lbfgs": []}
    for ref in find_checkpoints(run.run_dir, 0):
        if ref.name == "last.pth":
            continue
        checkpoint = FrozenCheckpoint(ref.path, device)
        train_x, train_y = frozen.of(checkpoint, train_index, "train")
        val_x, val_y = frozen.of(checkpoint, val_index, "val")
        test_x, test_y = frozen.of(checkpoint, test_index, "test")
        start = time.perf_counter()
        sgd = train_linear_head(cached_batches(train_x, train_y, settings.batch_size, settings.seed),
                                math.ceil(len(train_y) / settings.batch_size), val_x, val_y, len(run.class_names),
                                settings)
        sgd_seconds = time.perf_counter() - start
        start = time.perf_counter()
        lbfgs = train_lbfgs_head(train_x, train_y, val_x, val_y, len(run.class_names))
        lbfgs_seconds = time.perf_counter() - start
        totals["sgd"] += sgd_seconds
        totals["lbfgs"] += lbfgs_seconds
        if ref.backbone_epoch >= from_epoch:
            for solver, head in (("sgd", sgd), ("lbfgs", lbfgs)):
                candidates[solver].append((head.best_val_accuracy, -head.best_val_loss, ref.backbone_epoch,
                                           accuracy(head.state_dict, test_x, test_y)))
        rows.append([ref.backbone_epoch,
                     f"{100 * sgd.best_val_accuracy:.2f}", f"{100 * accuracy(sgd.state_dict, test_x, test_y):.2f}",
                     f"{sgd.best_val_loss:.4f}", sgd.best_head_epoch, f"{sgd_seconds:.2f}",
                     f"{100 * lbfgs.best_val_accuracy:.2f}",
                     f"{100 * accuracy(lbfgs.state_dict, test_x, test_y):.2f}", f"{lbfgs.best_val_loss:.4f}",
                     f"{lbfgs.regularization_c:g}", f"{lbfgs_seconds:.2f}"])
    print(f"run {run.run_dir}; SGD: {settings.describe()}; L-BFGS: C on val; {len(val_y)} val, {len(test_y)} test "
          f"images; head fitting only, 1 thread")
    print(markdown_table(["backbone epoch", "SGD val %", "SGD test %", "SGD val loss", "SGD head epoch", "SGD s",
                          "L-BFGS val %", "L-BFGS test %", "L-BFGS val loss", "L-BFGS C", "L-BFGS s"], rows))
    print(f"total head seconds: SGD {totals['sgd']:.1f}, L-BFGS {totals['lbfgs']:.1f}")
    for solver, found in candidates.items():
        if found:
            val, _, epoch, test = max(found)
            print(f"chosen on val from epoch {from_epoch}, {solver}: backbone epoch {epoch}, val {100 * val:.2f}%, "
                  f"test {100 * test:.2f}%")


if __name__ == "__main__":
    main()
