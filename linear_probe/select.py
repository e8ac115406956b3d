"""Choosing a run's (checkpoint, head) for the test set, from validation results only.

The functions see nothing but probe records (val accuracies and losses), so the test set cannot
influence the choice. Three rules:

``trend`` (default)
    Score each probed checkpoint by its head's *settled* val accuracy (the mean over the last tenth
    of the head epochs, where the head's schedule has nearly stopped; an L-BFGS head's one fit) and
    average each score with its neighbouring checkpoints' (one on each side, same probe settings), so
    that one lucky or unlucky checkpoint does not decide. Then the one-standard-error rule (as in
    choosing a model by cross-validation): of the checkpoints whose smoothed score is within one
    standard error of the highest (the 95% Wilson half-width / 1.96 on the val set size), take the
    *latest* backbone state. On a curve that still rises that is a late checkpoint, on a plateau the
    end of it (more training at no measurable cost), on a curve that falls the last checkpoint of its
    peak region. The head tested is the checkpoint's final head.
``within-noise``
    The same settled scores without smoothing; of the checkpoints within the noise of the best, the
    lowest settled val cross-entropy. On a curve that rises within the noise band this takes early
    checkpoints (a rising curve's early heads often have the lower loss), which is why it is no
    longer the default.
``max-val-acc``
    The single highest val accuracy over every (checkpoint, head epoch); ties by :data:`MAX_TIE_RULE`.
    The rule of the recorded experiments, which chases val noise: on 359 val images one image is
    0.28 points and the maximum over 11 checkpoints x 100 head epochs is biased upward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

from linear_probe.checkpoints import format_backbone_epoch
from linear_probe.config import SELECTION_RULES
from linear_probe.heads import HeadRecord
from supcon.metrics import CONFIDENCE, wilson_interval

TREND, WITHIN_NOISE, MAX_VAL_ACC = SELECTION_RULES
DEFAULT_RULE = TREND
#: Neighbouring checkpoints on each side averaged into a checkpoint's ``trend`` score.
SMOOTH_HALF_WINDOW = 1
#: Share of the head epochs, at the end, averaged into the settled score.
SETTLED_SHARE = 0.1

MAX_TIE_RULE = (
    "highest val accuracy; on a tie the lower val cross-entropy of those heads; then the later backbone "
    "state (more training); then the earlier head epoch; then the alphabetically last checkpoint name and "
    "settings key"
)
RULE_TEXT = {
    TREND: "trend: settled val accuracy (mean of the last tenth of the head epochs) averaged with the neighbouring "
           "checkpoints'; of the checkpoints within one standard error of the best, the latest backbone state",
    WITHIN_NOISE: "within-noise: of the checkpoints whose settled val accuracy (mean of the last tenth of the "
                  "head epochs) is within the 95% interval of the best, the one with the lowest settled val loss; "
                  "then the later backbone state",
    MAX_VAL_ACC: f"max-val-acc: {MAX_TIE_RULE}",
}
#: The old name of the max-val-acc tie rule's text, for code written against it.
TIE_RULE = RULE_TEXT[MAX_VAL_ACC]


def settled_values(values: Sequence[float], fallback: float) -> float:
    """Mean of the last :data:`SETTLED_SHARE` of a per-head-epoch curve (at least one value)."""
    if not values:
        return fallback
    count = max(1, math.ceil(SETTLED_SHARE * len(values)))
    return float(sum(values[-count:]) / count)


def _has_epoch_curve(record: HeadRecord) -> bool:
    """SGD heads record one value per head epoch; an L-BFGS head's lists hold one value per C tried."""
    return record.regularization_c is None and bool(record.val_accuracy_per_epoch)


def settled_val_accuracy(record: HeadRecord) -> float:
    """The head's val accuracy once its schedule has settled (its best when no epoch curve is recorded,
    and an L-BFGS head's, which is one fit at the C chosen on val)."""
    if not _has_epoch_curve(record):
        return record.best_val_accuracy
    return settled_values(record.val_accuracy_per_epoch, record.best_val_accuracy)


def settled_val_loss(record: HeadRecord) -> float:
    if not _has_epoch_curve(record):
        return record.best_val_loss
    return settled_values(record.val_loss_per_epoch, record.best_val_loss)


def selection_key(record: HeadRecord) -> tuple:
    """``max-val-acc``: larger is better; see :data:`MAX_TIE_RULE`."""
    return (record.best_val_accuracy, -record.best_val_loss, record.backbone_epoch, record.steps_into_epoch,
            -record.best_head_epoch, record.checkpoint,
            record.settings_key)


def _within_noise_key(record: HeadRecord) -> tuple:
    """``within-noise`` among the candidates within the noise: larger is better."""
    return (-settled_val_loss(record), record.backbone_epoch, record.steps_into_epoch, record.checkpoint,
            record.settings_key)


def _half_width(accuracy: float, num_val: int, confidence: float) -> float:
    low, high = wilson_interval(round(accuracy * num_val), num_val, confidence)
    return (high - low) / 2


def standard_error(accuracy: float, num_val: int) -> float:
    """One standard error of an accuracy on ``num_val`` images: the 95% Wilson half-width over its z (1.96)."""
    return _half_width(accuracy, num_val, CONFIDENCE) / float(NormalDist().inv_cdf(0.5 + CONFIDENCE / 2))


def _position(record: HeadRecord) -> tuple:
    """Order of backbone states: epoch, then steps into the next epoch (a mid-epoch ``last.pth``), then name."""
    return record.backbone_epoch, record.steps_into_epoch, record.checkpoint


def curves_by_settings(records: Sequence[HeadRecord]) -> list[list[HeadRecord]]:
    """The records grouped by probe settings, each group in backbone order (one curve per settings key)."""
    groups: dict[str, list[HeadRecord]] = {}
    for record in records:
        groups.setdefault(record.settings_key, []).append(record)
    return [sorted(group, key=_position) for _, group in sorted(groups.items())]


def smoothed_scores(records: Sequence[HeadRecord], half_window: int = SMOOTH_HALF_WINDOW) -> dict[str, float]:
    """Each record's settled val accuracy averaged with its ``half_window`` neighbours on each side.

    Neighbours are the adjacent backbone states probed with the same settings; the window shrinks at
    the ends of the curve. Keys: ``checkpoint__settings_key``.
    """
    smoothed = {}
    for curve in curves_by_settings(records):
        scores = [settled_val_accuracy(r) for r in curve]
        for i, record in enumerate(curve):
            window = scores[max(0, i - half_window): i + half_window + 1]
            smoothed[_name(record)] = float(sum(window) / len(window))
    return smoothed


def still_rising(records: Sequence[HeadRecord], smoothed: dict[str, float],
                 band: float) -> tuple[HeadRecord, HeadRecord] | None:
    """``(first, last)`` checkpoint of the curve when it still rises at its last backbone state, else None.

    Rising: on the last state's curve (its probe settings, at least 3 checkpoints) the smoothed score
    is highest at the last checkpoint and rose over the later half of the curve by at least ``band``
    (one standard error of an accuracy on the val set).
    """
    last = max(records, key=_position)
    curve = next(c for c in curves_by_settings(records) if c[-1] is last) if records else []
    if len(curve) < 3:
        return None
    values = [smoothed[_name(r)] for r in curve]
    later_half = values[len(values) // 2:]
    if values[-1] < max(values) - 1e-12 or values[-1] - min(later_half) < band:
        return None
    return curve[0], last


@dataclass
class Selection:
    """The chosen record and why: the rule, each candidate's score, and those within the noise of the best.

    ``final_head``: test the record's final head (``trend``, ``within-noise``), else its best-val head epoch.
    """

    record: HeadRecord
    rule: str
    num_val: int
    scores: dict[str, float]
    band: float
    within_noise: list[HeadRecord] = field(default_factory=list)
    candidates: int = 0
    final_head: bool = False
    #: ``trend``: the smoothed scores compared; the last checkpoint when the curve still rises there.
    smoothed: dict[str, float] = field(default_factory=dict)
    rising: tuple[HeadRecord, HeadRecord] | None = None

    @property
    def head_epoch(self) -> int:
        """1-based head epoch of the head to test."""
        curve = self.record.val_accuracy_per_epoch
        return len(curve) if self.final_head and _has_epoch_curve(self.record) else self.record.best_head_epoch

    @property
    def val_accuracy(self) -> float:
        """Val accuracy of the head to test."""
        curve = self.record.val_accuracy_per_epoch
        return curve[-1] if self.final_head and _has_epoch_curve(self.record) else self.record.best_val_accuracy

    @property
    def val_loss(self) -> float:
        curve = self.record.val_loss_per_epoch
        return curve[-1] if self.final_head and _has_epoch_curve(self.record) else self.record.best_val_loss

    def note(self) -> str:
        """One sentence on how far the val set can tell the candidates apart."""
        values = list(self.scores.values())
        spread = 100 * (max(values) - min(values))
        half_width = 100 * _half_width(max(values), self.num_val, CONFIDENCE)
        score = "best val accuracy" if self.rule == MAX_VAL_ACC else "settled val accuracy"
        chosen = format_backbone_epoch(self.record.backbone_epoch, self.record.steps_into_epoch)
        text = (f"{self.candidates} probed checkpoints span {spread:.2f} points of {score} on {self.num_val} val "
                f"images, where a 95% interval on one is about ±{half_width:.2f} points")
        if self.rule == TREND:
            text += (f"; averaged with their neighbours, {len(self.within_noise)} are within one standard error "
                     f"(±{100 * self.band:.2f} points) of the best, of which the latest is backbone epoch {chosen}")
        elif self.rule == WITHIN_NOISE:
            text += (f"; {len(self.within_noise)} are within that noise of the best and not resolvable from it, "
                     f"of which backbone epoch {chosen} has the lowest settled val loss")
        else:
            text += (f"; {len(self.within_noise)} are within that interval of the highest, so the choice of "
                     f"backbone epoch {chosen} is not resolvable from them")
        return text + "."

    def advice(self) -> str | None:
        """One sentence when the val curve still rises at the last checkpoint (train longer), else None."""
        if self.rising is None:
            return None
        first, last = self.rising
        epoch = format_backbone_epoch(last.backbone_epoch, last.steps_into_epoch)
        return (f"still improving at epoch {epoch}: the smoothed val accuracy is highest at the last checkpoint "
                f"({100 * self.smoothed[_name(last)]:.1f}%, from {100 * self.smoothed[_name(first)]:.1f}% at "
                f"epoch {format_backbone_epoch(first.backbone_epoch, first.steps_into_epoch)}): train longer (a new "
                "run with a larger --epochs; a --schedule step run, or a --schedule wsd run not yet cooling down, "
                "resumes with --resume --epochs N)")


def select(records: Sequence[HeadRecord], rule: str = DEFAULT_RULE) -> Selection:
    """The (checkpoint, head) to test under ``rule`` (see the module docstring), with the reasons.

    Raises:
        ValueError: no records, or an unknown rule.
    """
    if not records:
        raise ValueError("no probe records to select from")
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; one of {', '.join(SELECTION_RULES)}")
    num_val = min(r.num_val for r in records)
    if rule == MAX_VAL_ACC:
        chosen = max(records, key=selection_key)
        band = _half_width(chosen.best_val_accuracy, num_val, CONFIDENCE)
        close = [r for r in records if r.best_val_accuracy >= chosen.best_val_accuracy - band]
        return Selection(chosen, rule, num_val, {_name(r): r.best_val_accuracy for r in records}, band, close,
                         len(records))
    scores = {_name(r): settled_val_accuracy(r) for r in records}
    if rule == TREND:
        smoothed = smoothed_scores(records)
        best = max(smoothed.values())
        band = standard_error(best, num_val)
        close = [r for r in records if smoothed[_name(r)] >= best - band - 1e-12]
        chosen = max(close, key=lambda r: (*_position(r)[:2], -settled_val_loss(r), r.checkpoint, r.settings_key))
        return Selection(chosen, rule, num_val, scores, band, close, len(records), final_head=True,
                         smoothed=smoothed, rising=still_rising(records, smoothed, band))
    best = max(scores.values())
    band = _half_width(best, num_val, CONFIDENCE)
    close = [r for r in records if settled_val_accuracy(r) >= best - band - 1e-12]
    return Selection(max(close, key=_within_noise_key), rule, num_val, scores, band, close, len(records),
                     final_head=True)


def select_best(records: Sequence[HeadRecord], rule: str = DEFAULT_RULE) -> HeadRecord:
    """The (checkpoint, head) that ``check-accuracies`` tests under ``rule`` (default: ``trend``).

    Raises:
        ValueError: no records, or an unknown rule.
    """
    return select(records, rule).record


def _name(record: HeadRecord) -> str:
    return f"{record.checkpoint}__{record.settings_key}"
