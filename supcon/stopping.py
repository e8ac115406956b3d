"""``supcon-train --until plateau``: end a run when its features stop improving on the val set.

The live probe (:mod:`supcon.live_probe`) scores the encoder on the val folder every
``--probe-every`` epochs. A run on the open-ended WSD schedule trains at its stable learning rate
until the rule below fires, then cools down over ``--cooldown-fraction`` of the epochs trained so
far, saves and stops.

The rule, checked after each live probe at epoch ``E``:

1. **No improvement beyond noise for the patience window**: no live probe in the last
   ``patience x E`` epochs (``--plateau-patience``, a share of the run so far, default 40%) beat the
   best probe before that window by more than one standard error of their *paired* difference.
   Both probes score the same val images, so the difference is judged image by image: with ``b``
   images only the later probe gets right and ``c`` only the earlier one, the standard error of the
   difference of accuracies is ``sqrt(b + c - (b - c)^2 / n) / n`` (the variance McNemar's test
   uses). Two checkpoints of one run disagree on few images, so this resolves rises far smaller
   than the interval of one accuracy does (``sqrt(p (1 - p) / n)``: 3.2 points at 75% on 200 images),
   which the rule used before and which could not see a rise of a point every ten epochs. Probes
   recorded without their per-image results (older runs) fall back to that unpaired error.
2. **The training loss is flat**: over the same window it fell by at most ``loss_tolerance`` (10%) of
   its range over the whole run.
3. At least :data:`MIN_PROBES` live probes lie in the window, and at least one before it (a rule that
   sees too few points proves nothing).

The decision is a pure function of the probe and loss history, which the checkpoints hold, so a
resumed run decides exactly as an uninterrupted one. ``--epochs`` stays the ceiling: if the rule has
not fired by the last epoch from which a full cool-down still fits, the cool-down starts there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Fewest live probes inside the patience window (and at least one before it).
MIN_PROBES = 2


def accuracy_standard_error(accuracy: float, num_val: int) -> float:
    """One binomial standard error of an accuracy on ``num_val`` images (never below half an image)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(num_val, 1)), 0.5 / max(num_val, 1))


def paired_standard_error(later: str, earlier: str) -> float:
    """The standard error of ``accuracy(later) - accuracy(earlier)`` for two probes of the same val images.

    Args:
        later, earlier: ``"1"``/``"0"`` per val image (right or wrong), in the same order.

    Returns:
        ``sqrt(b + c - (b - c)^2 / n) / n`` with ``b``, ``c`` the images only one of them gets right
        (never below half an image, so two identical probes still leave a margin).
    """
    n = len(later)
    only_later = sum(1 for a, b in zip(later, earlier, strict=True) if a == "1" and b == "0")
    only_earlier = sum(1 for a, b in zip(later, earlier, strict=True) if a == "0" and b == "1")
    variance = max(only_later + only_earlier - (only_later - only_earlier) ** 2 / max(n, 1), 0.0)
    return max(math.sqrt(variance) / max(n, 1), 0.5 / max(n, 1))


def improvement_noise(later: dict[str, Any], earlier: dict[str, Any]) -> tuple[float, str]:
    """One standard error of the rise from probe ``earlier`` to probe ``later``, and which kind it is."""
    a, b = later.get("correct") or "", earlier.get("correct") or ""
    if a and len(a) == len(b):
        return paired_standard_error(a, b), "paired"
    return accuracy_standard_error(earlier["accuracy"], earlier["num_val"]), "unpaired"


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
        patience: share of the epochs so far that must pass without improvement beyond noise.
        cooldown_fraction: the cool-down's length as a share of the epochs trained so far.
        ceiling: ``--epochs``; the run never trains past it.
        loss_tolerance: share of the loss range the training loss may still fall within the window.
    """

    patience: float = 0.4
    cooldown_fraction: float = 0.2
    ceiling: int = 1000
    loss_tolerance: float = 0.1
    probes: list[dict[str, Any]] = field(default_factory=list)  # epoch, accuracy, num_val, correct
    losses: list[tuple[int, float]] = field(default_factory=list)  # (epoch, mean training loss)
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

    def record_loss(self, epoch: int, loss: float) -> None:
        self.losses = [(e, v) for e, v in self.losses if e < epoch] + [(epoch, float(loss))]

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
        best_before = max(before, key=lambda p: (p["accuracy"], -p["epoch"]))
        margins = [improvement_noise(p, best_before) for p in inside]
        if any(p["accuracy"] > best_before["accuracy"] + noise for p, (noise, _) in zip(inside, margins, strict=True)):
            return None
        losses = [v for _, v in self.losses]
        if len(losses) >= 2:
            in_window = [v for e, v in self.losses if e > window_start]
            fall = max(in_window) - min(in_window) if in_window else 0.0
            total = max(losses) - min(losses)
            if total > 0 and fall > self.loss_tolerance * total and in_window[-1] < in_window[0]:
                return None
        best = max(self.probes, key=lambda p: (p["accuracy"], -p["epoch"]))
        noise, kind = margins[-1]
        reason = (f"no live probe of the last {self.patience:.0%} of the run beat epoch {best_before['epoch']}'s "
                  f"{100 * best_before['accuracy']:.1f}% by more than one {kind} standard error ({100 * noise:.1f} "
                  f"points at epoch {epoch}), and the loss flat; best {100 * best['accuracy']:.1f}% at epoch "
                  f"{best['epoch']}")
        return StopDecision(epoch, self.cooldown_for(epoch), reason, best["epoch"], best["accuracy"])

    def state_dict(self) -> dict[str, Any]:
        return {"probes": [dict(p) for p in self.probes], "losses": [list(x) for x in self.losses],
                "decision": None if self.decision is None else self.decision.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probes = [dict(p) for p in state.get("probes", [])]
        self.losses = [(int(e), float(v)) for e, v in state.get("losses", [])]
        decision = state.get("decision")
        self.decision = StopDecision(**decision) if decision else None
