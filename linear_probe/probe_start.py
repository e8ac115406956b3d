"""``--from auto``: the first backbone epoch worth probing, from the run's logged curves.

The rule, on the per-epoch rows of ``RUN/metrics.csv``:

1. Smooth the training loss with a centred moving average of ``2h + 1`` epochs, ``h = epochs // 100``
   (no smoothing under 100 epochs).
2. **Loss plateau**: the first epoch ``e`` after which the smoothed loss still falls by at most
   ``tolerance`` (default 10%) of its total range: ``s[e] - min(s[e:]) <= tolerance * (max(s) - min(s))``.
   Epochs at the collapsed level ``log(2B - 1)`` (within 1%; ``collapsed_loss`` column) never count:
   a collapsed run looks flat but has learnt nothing.
3. **Live-probe plateau** (when ``supcon-train`` logged its live probe, ``probe_accuracy``, at two
   epochs or more): the first probed epoch whose val accuracy is within one standard error of the
   best live probe's (the noise :mod:`supcon.stopping` judges with, so after ``--until plateau`` this
   is where the plateau the run found begins). Without a live probe, the **kNN plateau** (when the
   kNN monitor logged ``knn_accuracy`` at two epochs or more, and it moved by at least one point):
   the first logged epoch after which the kNN accuracy still rises by at most ``tolerance`` of its
   total range.
4. The chosen epoch is the earlier of the two. Starting too late can miss the best checkpoint;
   starting a little early only costs a few more probes, each cheap on cached features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supcon.errors import UserError
from supcon.rundir import METRICS_FILE, MetricsCSV

COLLAPSED_TOLERANCE = 0.01
#: metrics.csv columns of supcon-train's live probe.
PROBE_CURVES = ("probe_accuracy", "probe_low", "probe_high", "probe_num_val")
MIN_EPOCHS = 3
#: A kNN curve that moves less than this (one point) carries no plateau signal and is ignored.
MIN_KNN_RANGE = 0.01


@dataclass(frozen=True)
class AutoFrom:
    """The chosen first epoch and why."""

    epoch: int
    loss_epoch: int
    knn_epoch: int | None
    reason: str


def smooth(values: Sequence[float], half_window: int) -> list[float]:
    """Centred moving average; the window shrinks at both ends."""
    if half_window <= 0:
        return [float(v) for v in values]
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half_window): i + half_window + 1]
        out.append(sum(window) / len(window))
    return out


def loss_plateau_index(losses: Sequence[float], tolerance: float, eligible: Sequence[bool] | None = None) -> int | None:
    """Index of the first eligible point after which ``losses`` falls by at most ``tolerance`` of its range."""
    total = max(losses) - min(losses)
    suffix_min = list(losses)
    for i in range(len(losses) - 2, -1, -1):
        suffix_min[i] = min(losses[i], suffix_min[i + 1])
    for i, value in enumerate(losses):
        if (eligible is None or eligible[i]) and value - suffix_min[i] <= tolerance * total:
            return i
    return None


def rise_plateau_index(values: Sequence[float], tolerance: float) -> int:
    """Index of the first point after which ``values`` rises by at most ``tolerance`` of its range."""
    return loss_plateau_index([-v for v in values], tolerance)  # a rise is a fall of the negation


def probe_plateau_epoch(epochs: Sequence[int], accuracies: Sequence[float | None],
                        num_val: int | None) -> int | None:
    """The first epoch whose live-probe val accuracy is within one standard error of the best (None: < 2 probes)."""
    from supcon.stopping import accuracy_standard_error

    logged = [(int(e), float(a)) for e, a in zip(epochs, accuracies, strict=True) if a is not None and math.isfinite(a)]
    if len(logged) < 2 or not num_val:
        return None
    best = max(a for _, a in logged)
    noise = accuracy_standard_error(best, num_val)
    return next(e for e, a in logged if a >= best - noise - 1e-12)


def choose_from_epoch(epochs: Sequence[int], losses: Sequence[float], tolerance: float = 0.1,
                      collapsed: Sequence[float | None] | None = None,
                      knn: Sequence[float | None] | None = None, probe: Sequence[float | None] | None = None,
                      probe_num_val: int | None = None) -> AutoFrom:
    """Apply the module's rule to per-epoch curves.

    Args:
        epochs: the epochs (1-based) of the rows.
        losses: mean training loss per row.
        tolerance: share of the total change still allowed after the plateau starts.
        collapsed: the collapsed loss level per row (None where unknown).
        knn: kNN accuracy per row (None where not measured).
        probe: live-probe val accuracy per row (None where not measured); used instead of the kNN curve.
        probe_num_val: the val images the live probe was scored on.

    Raises:
        UserError: fewer than 3 epochs, or a loss at the collapsed level throughout.
    """
    if len(losses) < MIN_EPOCHS:
        raise UserError(f"--from auto needs at least {MIN_EPOCHS} logged epochs in {METRICS_FILE}, the run has "
                        f"{len(losses)}; pass --from N")
    smoothed = smooth(losses, len(losses) // 100)
    eligible = [
        level is None or not math.isfinite(level) or abs(loss - level) > COLLAPSED_TOLERANCE * level
        for loss, level in zip(losses, collapsed or [None] * len(losses), strict=True)
    ]
    index = loss_plateau_index(smoothed, tolerance, eligible)
    if index is None:
        raise UserError(
            "--from auto: the training loss sits at the collapsed level log(2B - 1) throughout (the embedding "
            "collapsed; see supcon-train's warning), so no plateau means anything; pass --from N to probe anyway"
        )
    loss_epoch = int(epochs[index])
    total = max(smoothed) - min(smoothed)
    reason = (f"the smoothed training loss falls by at most {tolerance:.0%} of its total range ({total:.4g}) after "
              f"epoch {loss_epoch} ({smoothed[index]:.4f}, lowest later {min(smoothed[index:]):.4f})")
    knn_epoch = None
    logged = [(int(e), float(a)) for e, a in zip(epochs, knn or [None] * len(epochs), strict=True)
              if a is not None and math.isfinite(a)]
    accuracies = [a for _, a in logged]
    probe_epoch = probe_plateau_epoch(epochs, probe or [None] * len(epochs), probe_num_val)
    if probe_epoch is not None:
        chosen = min(loss_epoch, probe_epoch)
        reason += (f"; the live probe's val accuracy is within one standard error of its best from epoch {probe_epoch}"
                   f"; starting at the earlier, epoch {chosen}")
        return AutoFrom(chosen, loss_epoch, probe_epoch, reason)
    if len(logged) >= 2 and max(accuracies) - min(accuracies) >= MIN_KNN_RANGE:
        knn_epoch = logged[rise_plateau_index(accuracies, tolerance)][0]
        reason += (f"; the kNN accuracy rises by at most {tolerance:.0%} of its range after epoch {knn_epoch} "
                   f"(of {len(logged)} measured)")
    elif len(logged) >= 2:
        reason += f"; the kNN accuracy stays within {MIN_KNN_RANGE:.0%} ({min(accuracies):.2%}), so it is not used"
    chosen = loss_epoch if knn_epoch is None else min(loss_epoch, knn_epoch)
    if knn_epoch is not None:
        reason += f"; starting at the earlier, epoch {chosen}"
    return AutoFrom(chosen, loss_epoch, knn_epoch, reason)


def read_curves(run_dir: str | os.PathLike) -> dict[str, list]:
    """The run's per-epoch ``epoch``, ``loss``, ``collapsed_loss``, ``spread``, ``knn_accuracy`` (None if empty)."""
    path = Path(run_dir) / METRICS_FILE
    curves: dict[str, list] = {k: [] for k in ("epoch", "loss", "collapsed_loss", "spread", "knn_accuracy",
                                                *PROBE_CURVES)}
    for row in MetricsCSV(path, []).read():
        try:
            epoch, loss = int(float(row["epoch"])), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue
        curves["epoch"].append(epoch)
        curves["loss"].append(loss)
        for key in ("collapsed_loss", "spread", "knn_accuracy", *PROBE_CURVES):
            try:
                curves[key].append(float(row[key]) if row.get(key) not in (None, "") else None)
            except ValueError:
                curves[key].append(None)
    return curves


def choose_from_run(run_dir: str | os.PathLike, tolerance: float = 0.1) -> AutoFrom:
    """:func:`choose_from_epoch` on a run's ``metrics.csv``.

    Raises:
        UserError: no metrics.csv, or too few epochs logged.
    """
    if not (Path(run_dir) / METRICS_FILE).is_file():
        raise UserError(f"--from auto needs {Path(run_dir) / METRICS_FILE} (the loss curve); pass --from N")
    curves = read_curves(run_dir)
    return choose_from_epoch(curves["epoch"], curves["loss"], tolerance, curves["collapsed_loss"],
                             curves["knn_accuracy"], curves["probe_accuracy"], probe_num_val(curves))


def probe_num_val(curves: dict[str, list]) -> int | None:
    """The live probe's val set size, as metrics.csv recorded it (None without a live probe)."""
    return next((int(n) for n in curves["probe_num_val"] if n is not None), None)
