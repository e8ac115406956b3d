"""Choosing a run's (checkpoint, head) for the test set, from validation results only.

The functions see nothing but probe records (val accuracies and losses), so the test set cannot
influence the choice. Two rules:

``within-noise`` (default)
    Score each probed checkpoint by its head's *settled* val accuracy: the mean over the last tenth
    of the head epochs (at least one), where the cosine schedule has nearly stopped, instead of the
    luckiest head epoch. Every checkpoint whose score is within the noise of the best score (the
    half-width of the 95% Wilson interval of the best on the val set size) is as good as the best
    as far as the val set can tell; among those take the lowest settled val cross-entropy (a
    continuous score: it still moves when no image changes class), then the later backbone state.
    The head tested is that checkpoint's *final* head (the last head epoch), not its luckiest one;
    head files written before final heads were stored fall back to the best head epoch.
``max-val-acc``
    The single highest val accuracy over every (checkpoint, head epoch); ties by :data:`MAX_TIE_RULE`.
    The rule of the recorded experiments, which chases val noise: on 359 val images one image is
    0.28 points and the maximum over 11 checkpoints x 100 head epochs is biased upward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from linear_probe.checkpoints import format_backbone_epoch
from linear_probe.config import SELECTION_RULES
from linear_probe.heads import HeadRecord
from supcon.metrics import CONFIDENCE, wilson_interval

WITHIN_NOISE, MAX_VAL_ACC = SELECTION_RULES
DEFAULT_RULE = WITHIN_NOISE
#: Share of the head epochs, at the end, averaged into the settled score.
SETTLED_SHARE = 0.1

MAX_TIE_RULE = (
    "highest val accuracy; on a tie the lower val cross-entropy of those heads; then the later backbone "
    "state (more training); then the earlier head epoch; then the alphabetically last checkpoint name and "
    "settings key"
)
RULE_TEXT = {
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


@dataclass
class Selection:
    """The chosen record and why: the rule, each candidate's score, and those within the noise of the best.

    ``final_head``: test the record's final head (``within-noise``), else its best-val head epoch.
    """

    record: HeadRecord
    rule: str
    num_val: int
    scores: dict[str, float]
    band: float
    within_noise: list[HeadRecord] = field(default_factory=list)
    candidates: int = 0
    final_head: bool = False

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
        score = "settled val accuracy" if self.rule == WITHIN_NOISE else "best val accuracy"
        chosen = format_backbone_epoch(self.record.backbone_epoch, self.record.steps_into_epoch)
        text = (f"{self.candidates} probed checkpoints span {spread:.2f} points of {score} on {self.num_val} val "
                f"images, where a 95% interval on one is about ±{half_width:.2f} points")
        if self.rule == WITHIN_NOISE:
            text += (f"; {len(self.within_noise)} are within that noise of the best and not resolvable from it, "
                     f"of which backbone epoch {chosen} has the lowest settled val loss")
        else:
            text += (f"; {len(self.within_noise)} are within that interval of the highest, so the choice of "
                     f"backbone epoch {chosen} is not resolvable from them")
        return text + "."


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
    best = max(scores.values())
    band = _half_width(best, num_val, CONFIDENCE)
    close = [r for r in records if settled_val_accuracy(r) >= best - band - 1e-12]
    return Selection(max(close, key=_within_noise_key), rule, num_val, scores, band, close, len(records),
                     final_head=True)


def select_best(records: Sequence[HeadRecord], rule: str = DEFAULT_RULE) -> HeadRecord:
    """The (checkpoint, head) that ``check-accuracies`` tests under ``rule`` (default: ``within-noise``).

    Raises:
        ValueError: no records, or an unknown rule.
    """
    return select(records, rule).record


def _name(record: HeadRecord) -> str:
    return f"{record.checkpoint}__{record.settings_key}"
