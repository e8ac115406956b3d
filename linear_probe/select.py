"""Choosing a run's (checkpoint, head) for the test set, from validation results only.

The function sees nothing but probe records (val accuracies and losses), so the test set cannot
influence the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

from linear_probe.heads import HeadRecord

TIE_RULE = (
    "highest val accuracy; on a tie the lower val cross-entropy of those heads; then the later backbone "
    "state (more training); then the earlier head epoch; then the alphabetically last checkpoint name and "
    "settings key"
)


def selection_key(record: HeadRecord) -> tuple:
    """Larger is better; see :data:`TIE_RULE`."""
    return (record.best_val_accuracy, -record.best_val_loss, record.backbone_epoch, record.steps_into_epoch,
            -record.best_head_epoch, record.checkpoint,
            record.settings_key)


def select_best(records: Sequence[HeadRecord]) -> HeadRecord:
    """The best probed (checkpoint, head) by validation accuracy, ties broken by :data:`TIE_RULE`.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no probe records to select from")
    return max(records, key=selection_key)
