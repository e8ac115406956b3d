"""``supcon-train --until plateau``: end a run when its features stop improving on the val set.

The live probe (:mod:`supcon.live_probe`) scores the encoder on the val folder every
``--probe-every`` epochs. A run on the open-ended WSD schedule trains at its stable learning rate
until the rule below fires, then cools down over ``--cooldown-fraction`` of the epochs trained so
far, saves and stops.

The rule, checked after each live probe at epoch ``E``, asks whether training on would still pay,
not whether a rise has been proven (which, on a few hundred val images, a slow rise of a point every
ten epochs never is until long after it happened):

1. Take the live probes of the last ``patience x E`` epochs (``--plateau-patience``, a share of the
   run so far, default 50%): at least :data:`MIN_PROBES` of them, and at least one probe before.
2. Fit a line through their val accuracies (:func:`probe_trend`): its slope, plus one standard error,
   times ``E`` is what training as long again as the run so far would add at the recent pace. The
   standard error is the larger of the line's residual error (how much one probe wobbles around the
   trend) and the paired, per-image one: every probe scores the same val images and keeps which it
   got right (``val_correct``), so each image has a slope of its own and their spread measures the
   slope's noise image by image.
3. If even that is below ``--plateau-tolerance`` (default 0.03: three points of val accuracy for
   doubling the run), the features have settled: cool down.

Measured on the live probe of 400-epoch runs (``scripts/bench_convergence.py``): SupCon's probe can sit
flat for tens of epochs and then rise again, and one probe on 200 val images wobbles by about two
points, so a shorter window, fewer probes or no margin stopped such runs in their first hundred epochs.

The training loss is not consulted: on a small training set SupCon's loss keeps falling at a
constant rate long after the val features have stopped improving (measured on the textures set:
20-30% of its range in every window of a 400-epoch run), so a flat-loss condition kept such runs
training to their ceiling.

The decision is a pure function of the probe history, which the checkpoints hold, so a
resumed run decides exactly as an uninterrupted one. ``--epochs`` stays the ceiling: if the rule has
not fired by the last epoch from which a full cool-down still fits, the cool-down starts there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Fewest live probes inside the patience window (and at least one before it): a line through fewer says little.
MIN_PROBES = 6


def accuracy_standard_error(accuracy: float, num_val: int) -> float:
    """One binomial standard error of an accuracy on ``num_val`` images (never below half an image)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(num_val, 1)), 0.5 / max(num_val, 1))


@dataclass(frozen=True)
class Trend:
    """The live probe's linear trend over a window of probes: val accuracy per epoch, with its standard error."""

    first_epoch: int
    last_epoch: int
    probes: int
    slope: float
    standard_error: float  # of ``slope``
    kind: str  # "residual" or "per-image": which standard error was the larger

    def gain(self, epochs: float) -> float:
        """The val accuracy ``epochs`` more epochs would add at this pace."""
        return self.slope * epochs

    def upper_gain(self, epochs: float) -> float:
        """The same, one standard error above the fitted pace."""
        return (self.slope + self.standard_error) * epochs


def probe_trend(probes: list[dict[str, Any]]) -> Trend:
    """Least-squares slope of val accuracy against epoch over ``probes`` (at least three), with its standard error.

    Its standard error is the larger of two estimates: the scatter of the probes around the line (what
    one probe's fit adds: the C chosen on val, the features' wobble), and the spread of the per-image
    slopes when every probe kept which val images it got right (``correct``): the same images are
    scored at every probe, so the per-image slopes are paired and their mean is the slope.
    """
    epochs = np.array([p["epoch"] for p in probes], dtype=float)
    accuracy = np.array([p["accuracy"] for p in probes], dtype=float)
    centred = epochs - epochs.mean()
    spread = float((centred ** 2).sum())
    weights = centred / spread
    slope = float((weights * accuracy).sum())
    residuals = accuracy - accuracy.mean() - slope * centred
    num_val = max(int(probes[-1]["num_val"]), 1)
    floor = (0.5 / num_val) ** 2  # half an image: a line through identical probes still has a margin
    residual_se = math.sqrt(max(float((residuals ** 2).sum()) / (len(probes) - 2), floor) / spread)
    se, kind = residual_se, "residual"
    strings = [p.get("correct") or "" for p in probes]
    if all(strings) and len({len(c) for c in strings}) == 1:
        hits = np.array([[c == "1" for c in string] for string in strings], dtype=float)  # [probes, images]
        per_image = weights @ hits
        image_se = float(per_image.std(ddof=1) / math.sqrt(per_image.size)) if per_image.size > 1 else 0.0
        if image_se > se:
            se, kind = image_se, "per-image"
    return Trend(int(epochs[0]), int(epochs[-1]), len(probes), slope, se, kind)


def _points(accuracy_change: float) -> str:
    """``+1.2``: a change of val accuracy in points (no ``-0.0`` for a rounding error of a flat line)."""
    return f"{round(100 * accuracy_change, 1) + 0.0:+.1f}"


def still_rising(probes: list[dict[str, Any]], last_epoch: int, share: float = 0.5,
                 tolerance: float = 0.03) -> Trend | None:
    """The trend of the live probes over the last ``share`` of a finished run when it still rose: more than one
    standard error above flat, at a pace that doubling the run would turn into ``tolerance`` or more (None
    otherwise, or with too few probes)."""
    inside = [p for p in probes if p["epoch"] > last_epoch - share * last_epoch]
    if len(inside) < MIN_PROBES:
        return None
    trend = probe_trend(inside)
    return trend if trend.gain(last_epoch) >= tolerance and trend.slope > trend.standard_error else None


@dataclass(frozen=True)
class StopDecision:
    """When the cool-down starts and why (recorded in the checkpoints, metrics.csv and config.yaml)."""

    epoch: int  # the cool-down starts after this epoch
    cooldown_epochs: int
    reason: str
    best_epoch: int | None = None
    best_accuracy: float | None = None

    @property
    def last_epoch(self) -> int:
        return self.epoch + self.cooldown_epochs

    @property
    def cooldown_text(self) -> str:
        first = self.epoch + 1
        return f"epoch {first}" if first == self.last_epoch else f"epochs {first}-{self.last_epoch}"

    def message(self) -> str:
        return f"{self.reason}; cooled down over {self.cooldown_text}; stopped"

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cooldown_epochs": self.cooldown_epochs, "reason": self.reason,
                "best_epoch": self.best_epoch, "best_accuracy": self.best_accuracy}


@dataclass
class PlateauRule:
    """The ``--until plateau`` rule over the run's history (see the module docstring).

    Args:
        patience: the share of the epochs so far whose live probes the trend is fitted to.
        cooldown_fraction: the cool-down's length as a share of the epochs trained so far.
        ceiling: ``--epochs``; the run never trains past it.
        tolerance: the gain in val accuracy that training as long again may promise (one standard error above
            the trend) for the features to count as settled (0.03: three points).
    """

    patience: float = 0.5
    cooldown_fraction: float = 0.2
    ceiling: int = 1000
    tolerance: float = 0.03
    probes: list[dict[str, Any]] = field(default_factory=list)  # epoch, accuracy, num_val, correct
    decision: StopDecision | None = None

    def cooldown_for(self, epoch: int) -> int:
        return max(1, math.ceil(self.cooldown_fraction * epoch - 1e-9))

    @property
    def latest_start(self) -> int:
        """The last epoch after which a full cool-down still ends by the ceiling."""
        start = self.ceiling
        while start > 0 and start + self.cooldown_for(start) > self.ceiling:
            start -= 1
        return start

    def record_probe(self, epoch: int, accuracy: float, num_val: int, correct: str = "") -> None:
        """One live probe; ``correct``: its per-image results on val (``"1"``/``"0"``), for the paired rule."""
        self.probes = [p for p in self.probes if p["epoch"] < epoch] + [
            {"epoch": int(epoch), "accuracy": float(accuracy), "num_val": int(num_val), "correct": str(correct)}]

    def check(self, epoch: int, probed: bool = True) -> StopDecision | None:
        """After epoch ``epoch``'s records: the decision to cool down now, or None (also None once decided).

        ``probed``: a live probe was recorded for this epoch (the plateau is only judged then; the
        ceiling every epoch).
        """
        if self.decision is not None:
            return None
        decision = self._plateau(epoch) if probed else None
        if decision is None and epoch >= self.latest_start:
            best = max(self.probes, key=lambda p: (p["accuracy"], -p["epoch"]), default=None)
            decision = StopDecision(epoch, self.cooldown_for(epoch),
                                    f"reached epoch {epoch}, the last from which a cool-down of "
                                    f"{self.cooldown_fraction:.0%} ends by --epochs {self.ceiling}",
                                    best["epoch"] if best else None, best["accuracy"] if best else None)
        if decision is not None:
            self.decision = decision
        return decision

    def _plateau(self, epoch: int) -> StopDecision | None:
        window_start = epoch - self.patience * epoch  # probes after this epoch are inside the window
        before = [p for p in self.probes if p["epoch"] <= window_start]
        inside = [p for p in self.probes if window_start < p["epoch"] <= epoch]
        if not before or len(inside) < MIN_PROBES:
            return None
        trend = probe_trend(inside)
        if trend.upper_gain(epoch) >= self.tolerance:
            return None
        best = max(self.probes, key=lambda p: (p["accuracy"], -p["epoch"]))
        reason = (f"the live probe settled: at its pace over epochs {trend.first_epoch}-{trend.last_epoch} "
                  f"({trend.probes} probes, {_points(trend.gain(trend.last_epoch - trend.first_epoch))} points), "
                  f"{epoch} more epochs would add {_points(trend.gain(epoch))} points, at most "
                  f"{_points(trend.upper_gain(epoch))} within one {trend.kind} standard error: below "
                  f"--plateau-tolerance ({100 * self.tolerance:.1f}); best {100 * best['accuracy']:.1f}% at epoch "
                  f"{best['epoch']}")
        return StopDecision(epoch, self.cooldown_for(epoch), reason, best["epoch"], best["accuracy"])

    def state_dict(self) -> dict[str, Any]:
        return {"probes": [dict(p) for p in self.probes],
                "decision": None if self.decision is None else self.decision.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probes = [dict(p) for p in state.get("probes", [])]
        decision = state.get("decision")
        self.decision = StopDecision(**decision) if decision else None
