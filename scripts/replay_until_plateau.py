"""Where would ``--until plateau`` have cooled down? Its rule replayed on a finished run's recorded live probes.

A ``--schedule wsd`` run trains at a constant rate until its cool-down, exactly as an ``--until plateau`` run with
the same options and seed does until its rule fires (the rule only watches), so replaying the rule on the fixed
run's live probes (``metrics.csv``, and the per-image val results its numbered checkpoints keep) gives the epoch
the ``--until plateau`` run would have chosen, for any ``--plateau-patience`` and ``--plateau-tolerance``, without
training it. On runs of another schedule the replay says where the rule would have fired on that curve.

    .venv/bin/python scripts/replay_until_plateau.py RUN [RUN ...] --patience 0.5,0.4 --tolerance 0.03,0.05
    .venv/bin/python scripts/replay_until_plateau.py RUN --every 10    # only the probes every 10 epochs
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from bench_common import markdown_table  # noqa: E402

from supcon.rundir import epoch_checkpoints, load_supcon_checkpoint  # noqa: E402
from supcon.schedule import LRSchedule  # noqa: E402
from supcon.stopping import PlateauRule, StopDecision  # noqa: E402


def recorded_probes(run_dir: Path, every: int | None = None) -> tuple[list[dict], bool]:
    """The run's live probes in epoch order (``every``: only those on multiples of it) and whether the replay is
    exact: a run's ``last.pth`` keeps every probe with its per-image val results; for a run from before it did,
    they come from ``metrics.csv`` and the numbered checkpoints, and the per-image error (which needs every
    probe's results) is left out unless each probe's checkpoint was kept."""
    history = load_supcon_checkpoint(run_dir / "last.pth").get("probe_history")
    if history:
        return [dict(p) for p in history if every is None or p["epoch"] % every == 0], True
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("probe_accuracy")]
    correct = {}
    for epoch, path in epoch_checkpoints(run_dir).items():
        probe = load_supcon_checkpoint(path).get("live_probe") or {}
        if probe.get("val_correct"):
            correct[int(epoch)] = probe["val_correct"]
    probes = [{"epoch": int(float(r["epoch"])), "accuracy": float(r["probe_accuracy"]),
               "num_val": int(float(r["probe_num_val"]))} for r in rows]
    probes = [p for p in probes if every is None or p["epoch"] % every == 0]
    exact = all(p["epoch"] in correct for p in probes)
    if exact:
        for p in probes:
            p["correct"] = correct[p["epoch"]]
    return probes, exact


def replay(probes: list[dict], ceiling: int, patience: float, tolerance: float,
           cooldown_fraction: float = 0.2) -> StopDecision | None:
    """The rule's decision on these probes (None: it had not decided by the last of them)."""
    rule = PlateauRule(patience, cooldown_fraction, ceiling=ceiling, tolerance=tolerance)
    for probe in probes:
        rule.record_probe(probe["epoch"], probe["accuracy"], probe["num_val"], probe.get("correct", ""))
        decision = rule.check(probe["epoch"])
        if decision is not None:
            return decision
    return None


def stable_phase(options: dict, probes: list[dict]) -> list[dict]:
    """A fixed WSD run's probes before its cool-down (an ``--until plateau`` run would have seen these)."""
    if options.get("schedule") != "wsd" or options.get("until") == "plateau":
        return probes
    epochs = int(options["epochs"])
    start = epochs - LRSchedule.cooldown_length(epochs, float(options.get("cooldown_fraction", 0.2)))
    return [p for p in probes if p["epoch"] <= start]


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="supcon-train run directories with live probes")
    parser.add_argument("--patience", default="0.5", help="Comma list of --plateau-patience values.")
    parser.add_argument("--tolerance", default="0.03", help="Comma list of --plateau-tolerance values.")
    parser.add_argument("--ceiling", type=int, help="--epochs of the --until plateau run [default: the run's].")
    parser.add_argument("--every", type=int, help="Replay only the probes on multiples of this epoch.")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        run_dir = Path(run)
        options = yaml.safe_load((run_dir / "config.yaml").read_text())
        ceiling = args.ceiling or int(options["epochs"])
        recorded, exact = recorded_probes(run_dir, args.every)
        probes = stable_phase(options, recorded)
        for patience, tolerance in itertools.product([float(v) for v in args.patience.split(",")],
                                                     [float(v) for v in args.tolerance.split(",")]):
            decision = replay(probes, ceiling, patience, tolerance)
            rows.append([run_dir.name if len(args.runs) == 1 else str(run_dir), "yes" if exact else "no", patience,
                         tolerance,
                         decision.epoch if decision else f"none by {probes[-1]['epoch']}",
                         decision.last_epoch if decision else "-", decision.reason if decision else ""])
    print(markdown_table(["run", "exact", "patience", "tolerance", "cool-down after", "last epoch", "why"], rows))
    if not all(row[1] == "yes" for row in rows):
        print("exact = no: a run from before runs kept their probe history; its probes without per-image results "
              "leave the per-image standard error out, so the replay may decide earlier than the run would have")
    return rows


if __name__ == "__main__":
    main()
