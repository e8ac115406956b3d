"""Selection of a run's (checkpoint, head) from validation results, and its tie rule."""

import dataclasses

import pytest

from linear_probe.checkpoints import FileStamp
from linear_probe.heads import HeadRecord
from linear_probe.select import select_best


def record(checkpoint="ckpt_epoch_10.pth", epoch=10, accuracy=0.9, loss=0.3, head_epoch=50, steps=0, key="k"):
    return HeadRecord(
        checkpoint=checkpoint, checkpoint_stamp=FileStamp("0" * 64, 1, 1), backbone_epoch=epoch,
        steps_into_epoch=steps, best_val_accuracy=accuracy, best_head_epoch=head_epoch, best_val_loss=loss,
        settings={}, settings_key=key, class_names=["a", "b"], val_folder="v", train_folder="t", num_train=1,
        num_val=1, feature_dim=4,
    )


def test_highest_val_accuracy_wins_whatever_the_loss():
    best = select_best([record(epoch=10, accuracy=0.90, loss=0.1), record(epoch=20, accuracy=0.91, loss=0.9)])
    assert best.backbone_epoch == 20


def test_tie_on_accuracy_goes_to_lower_val_loss():
    best = select_best([record(epoch=30, accuracy=0.9, loss=0.40), record(epoch=10, accuracy=0.9, loss=0.20),
                        record(epoch=20, accuracy=0.9, loss=0.30)])
    assert best.backbone_epoch == 10


def test_tie_on_accuracy_and_loss_goes_to_later_backbone_state():
    later_mid_epoch = record(checkpoint="last.pth", epoch=20, steps=3)
    best = select_best([record(epoch=10), record(checkpoint="ckpt_epoch_20.pth", epoch=20), later_mid_epoch])
    assert best is later_mid_epoch


def test_then_earlier_head_epoch_then_name():
    a, b = record(head_epoch=40), record(head_epoch=7)
    assert select_best([a, b]) is b
    c, d = record(key="aaa"), record(key="bbb")
    assert select_best([c, d]) is d and select_best([d, c]) is d  # order of the input does not matter


def test_selection_uses_nothing_but_validation_fields():
    """Changing every field but the validation results and positions cannot change the choice."""
    cases = [(10, 0.8, 0.5), (20, 0.95, 0.2), (30, 0.9, 0.1)]
    records = [record(epoch=epoch, accuracy=accuracy, loss=loss) for epoch, accuracy, loss in cases]
    best = select_best(records)
    shuffled = [dataclasses.replace(r, val_folder="elsewhere", num_val=99, settings={"x": 1})
                for r in records[::-1]]
    assert select_best(shuffled).backbone_epoch == best.backbone_epoch == 20


def test_no_records_is_an_error():
    with pytest.raises(ValueError):
        select_best([])
