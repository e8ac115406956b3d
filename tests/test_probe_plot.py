"""probe-all's plot (``linear_probe.tables_and_plots.plot_probe``): its legend says what was drawn, for either
head solver."""

from __future__ import annotations

from linear_probe.heads import HeadRecord
from linear_probe.probe import HeadSettings
from linear_probe.tables_and_plots import plot_probe
from supcon.checkpoint import FileStamp

HEAD_EPOCHS = 10


def head_record(epoch: int, accuracy: float, solver: str) -> HeadRecord:
    """A probed checkpoint on 100 val images: an SGD head with a curve over its head epochs, or one L-BFGS fit."""
    settings = HeadSettings(epochs=HEAD_EPOCHS, head_solver=solver).to_dict()
    if solver == "lbfgs":  # one value per C tried; the one fit is its best and final head
        curve, head_epoch, c = [accuracy - 0.05, accuracy, accuracy - 0.02], 1, 1.0
    else:
        curve, head_epoch, c = [accuracy - 0.1] * (HEAD_EPOCHS - 1) + [accuracy], HEAD_EPOCHS, None
    return HeadRecord(
        checkpoint=f"ckpt_epoch_{epoch}.pth", checkpoint_stamp=FileStamp("0" * 64, 1, 1), backbone_epoch=epoch,
        steps_into_epoch=0, best_val_accuracy=accuracy, best_head_epoch=head_epoch, best_val_loss=0.5,
        settings=settings, settings_key=solver, class_names=["a", "b"], val_folder="v", train_folder="t",
        num_train=100, num_val=100, feature_dim=4, val_accuracy_per_epoch=curve,
        val_loss_per_epoch=[0.5] * len(curve), train_loss_per_epoch=[0.4] * len(curve), regularization_c=c,
    )


def legend_labels(path, solver: str) -> list[str]:
    records = [head_record(epoch, accuracy, solver) for epoch, accuracy in ((10, 0.80), (20, 0.85), (30, 0.84))]
    figure = plot_probe(path, records, curves={})
    assert path.is_file()
    assert len(figure.legends) == 1
    return [text.get_text() for text in figure.legends[0].get_texts()]


def test_the_lbfgs_legend_names_its_one_fit_and_no_head_epochs(tmp_path):
    labels = legend_labels(tmp_path / "probe_plot.png", "lbfgs")
    assert "probe: val acc. (L-BFGS head, C chosen on val), 95% interval" in labels
    assert "val acc. averaged with the neighbouring checkpoints" in labels
    for label in labels:
        assert "None" not in label, label
        assert "head epochs" not in label, label  # an L-BFGS head has none
        assert "settled" not in label, label  # nor a tail of a schedule to settle over


def test_the_sgd_legend_names_the_best_and_the_settled_head_epochs(tmp_path):
    labels = legend_labels(tmp_path / "probe_plot.png", "sgd")
    assert (f"probe: best val acc. of {HEAD_EPOCHS} head epochs, 95% interval\n"
            f"({HeadSettings(epochs=HEAD_EPOCHS).describe()})") in labels
    assert "probe: settled val acc. (last tenth of the head epochs)" in labels
    assert "settled val acc. averaged with the neighbouring checkpoints" in labels
    assert not any("L-BFGS" in label or "None" in label for label in labels)

