"""The baseline training loop: early stopping, resume after Ctrl-C, freezing end to end, the val split."""

from __future__ import annotations

import csv
import logging
import math
import os
import signal

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed

import supcon.baseline.trainer as baseline_trainer
from supcon.baseline.config import BaselineConfig
from supcon.baseline.data import stratified_split, train_transform
from supcon.baseline.models import build_classifier, make_model_config
from supcon.baseline.train import train
from supcon.baseline.trainer import EarlyStopping, make_scheduler
from supcon.errors import UserError
from supcon.rundir import load_baseline_checkpoint


def tiny_config(data_folder, run_dir, **overrides) -> BaselineConfig:
    """Seconds on the CPU: the simple CNN at 32 px, 3 steps of 12 images per epoch."""
    values = dict(data_folder=str(data_folder), run_dir=str(run_dir), model="simple_cnn", size=32, batch_size=12,
                  epochs=2, num_workers=0, augment="none", seed=0)
    values.update(overrides)
    return BaselineConfig(**values)


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- early stopping ---------------------------------------------------------------------------------------------


def test_early_stopping_on_scripted_curves():
    stopper = EarlyStopping(patience=2, mode="min")
    flags = [stopper.update(epoch, value) for epoch, value in enumerate([1.0, 0.8, 0.8, 0.9], start=1)]
    assert flags == [True, True, False, False]  # a tie is no improvement: the earliest epoch stays best
    assert (stopper.best_epoch, stopper.best_value, stopper.should_stop) == (2, 0.8, True)

    stopper = EarlyStopping(patience=2, mode="max")
    assert [stopper.update(e, v) for e, v in enumerate([0.5, float("nan"), 0.7, 0.6], start=1)] == [
        True, False, True, False]
    assert (stopper.best_epoch, stopper.should_stop) == (3, False)
    assert not EarlyStopping(patience=0).should_stop


def test_the_loop_stops_at_the_right_epoch_on_a_scripted_validation_curve(image_root, tmp_path, monkeypatch):
    curve = [1.0, 0.8, 0.9, 0.7, 0.75, 0.72, 0.71, 0.5, 0.4, 0.3]  # best at 4, then 3 epochs without improvement
    calls = []

    def scripted_evaluate(model, loss_fn, loader, accelerator):
        calls.append(len(calls))
        return {"loss": curve[len(calls) - 1], "accuracy": 0.5 + 0.01 * len(calls), "auc": 0.5, "f1": 0.5}

    monkeypatch.setattr(baseline_trainer, "evaluate", scripted_evaluate)
    run_dir = tmp_path / "run"
    result = train(tiny_config(image_root / "train", run_dir, epochs=10, patience=3), progress=False)
    assert (result.epochs_done, result.best_epoch, result.stopped_early) == (7, 4, True)
    rows = read_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))
    assert [int(r["best"]) for r in rows] == [1, 1, 0, 1, 0, 0, 0]
    best = load_baseline_checkpoint(run_dir / "best.pth")
    assert (best["best_epoch"], best["val_loss"], best["val_accuracy"]) == (4, 0.7, pytest.approx(0.54))
    last = load_baseline_checkpoint(run_dir / "last.pth")
    assert (last["epoch"], last["finished"], last["stopped_early"]) == (7, True, True)

    # Resuming a finished run trains nothing.
    result = train(tiny_config(image_root / "train", run_dir, epochs=10, patience=3, resume=True), progress=False)
    assert (result.epochs_done, result.best_epoch, len(calls)) == (7, 4, 7)


# --- resume -----------------------------------------------------------------------------------------------------


def test_ctrl_c_then_resume_gives_the_weights_of_an_uninterrupted_run(image_root, tmp_path, monkeypatch, caplog):
    # A worker process loads the data, so the model's own randomness (DropBlock) draws from the main process's
    # RNG, which only a restored RNG state continues; epoch 4 needs the restored cosine schedule.
    config = dict(epochs=4, augment="standard", model="plain_cnn", optimizer="sgd", learning_rate=0.05,
                  scheduler="cosine", num_workers=1)
    straight = train(tiny_config(image_root / "train", tmp_path / "straight", **config), progress=False)
    assert straight.epochs_done == 4

    original = baseline_trainer.train_one_epoch

    def ctrl_c_in_epoch_3(*args, **kwargs):
        if args[5] == 2:  # 0-based epoch index
            os.kill(os.getpid(), signal.SIGINT)  # handled by the run: stops after the current step
        return original(*args, **kwargs)

    monkeypatch.setattr(baseline_trainer, "train_one_epoch", ctrl_c_in_epoch_3)
    run_dir = tmp_path / "interrupted"
    with caplog.at_level(logging.INFO):
        interrupted = train(tiny_config(image_root / "train", run_dir, **config), progress=False)
    assert (interrupted.interrupted_by, interrupted.exit_code, interrupted.epochs_done) == (signal.SIGINT, 130, 2)
    assert load_baseline_checkpoint(run_dir / "last.pth")["epoch"] == 2
    # the epoch in progress, 1-based, in both messages
    assert "interrupted in epoch 3;" in caplog.text and "(epoch 3 is redone)" in caplog.text
    monkeypatch.setattr(baseline_trainer, "train_one_epoch", original)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = train(tiny_config(image_root / "train", run_dir, resume=True, **config), progress=False)
    assert resumed.epochs_done == 4
    assert f"resuming {run_dir} at epoch 3 (2 of 4 epochs done)" in caplog.text
    a = load_baseline_checkpoint(tmp_path / "straight" / "last.pth")
    b = load_baseline_checkpoint(run_dir / "last.pth")
    for part in ("encoder", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), key
    assert [r["train_loss"] for r in read_rows(run_dir)] == [r["train_loss"] for r in read_rows(tmp_path / "straight")]


# --- imbalanced classes: --class-weights, --sampler -------------------------------------------------------------


def test_class_weights_and_the_balanced_sampler_change_the_first_epoch_and_are_recorded(tmp_path):
    import yaml
    from sklearn.utils.class_weight import compute_class_weight

    from tests.conftest import CLASS_COLOURS, write_image_folder

    data = tmp_path / "data"  # 1:5, with a val folder: 30 cats and 6 dogs to train on
    write_image_folder(data / "train", 30, classes={"cat": CLASS_COLOURS["cat"]}, seed=7)
    write_image_folder(data / "train", 6, classes={"dog": CLASS_COLOURS["dog"]}, seed=8)
    write_image_folder(data / "val", 3, classes={name: CLASS_COLOURS[name] for name in ("cat", "dog")}, seed=9)
    runs = {}
    for name, options in (("plain", {}), ("weighted", {"class_weights": "balanced"}),
                          ("balanced", {"sampler": "balanced"})):
        result = train(tiny_config(data / "train", tmp_path / name, epochs=1, **options), progress=False)
        assert result.epochs_done == 1
        runs[name] = (float(read_rows(tmp_path / name)[0]["train_loss"]),
                      yaml.safe_load((tmp_path / name / "config.yaml").read_text()))
    plain_loss, plain_config = runs["plain"]
    weighted_loss, weighted_config = runs["weighted"]
    balanced_loss, balanced_config = runs["balanced"]
    assert (plain_config["sampler"], plain_config["class_weights"]) == ("random", "none")
    assert plain_config["run_info"]["class_weights"] is None
    assert weighted_config["class_weights"] == "balanced"
    expected = compute_class_weight("balanced", classes=np.arange(2), y=np.array([0] * 30 + [1] * 6))
    assert weighted_config["run_info"]["class_weights"] == pytest.approx([36 / 60, 36 / 12])
    assert weighted_config["run_info"]["class_weights"] == pytest.approx(expected.tolist())
    assert weighted_loss != pytest.approx(plain_loss, rel=1e-4)
    assert balanced_config["sampler"] == "balanced" and balanced_config["run_info"]["steps_per_epoch"] == 36 // 12
    assert balanced_loss != pytest.approx(plain_loss, rel=1e-4)


# --- freezing end to end ----------------------------------------------------------------------------------------


def test_freeze_keeps_frozen_weights_but_moves_their_batchnorm_statistics(image_root, tmp_path):
    config = tiny_config(image_root / "train", tmp_path / "run", model="plain_cnn", freeze=2, epochs=1,
                         optimizer="adamw", learning_rate=0.01, weight_decay=0.5)
    train(config, progress=False)
    set_seed(0)
    initial = build_classifier(make_model_config("plain_cnn", 3)).backbone.state_dict()
    trained = load_baseline_checkpoint(tmp_path / "run" / "last.pth")["encoder"]
    for key, value in initial.items():
        if key.startswith(("blocks.0.", "blocks.1.")):
            if key.endswith(("running_mean", "running_var")):
                assert not torch.equal(trained[key], value), key  # BatchNorm statistics still update
            elif not key.endswith("num_batches_tracked"):
                assert torch.equal(trained[key], value), key  # frozen (weight decay included)
        elif key.endswith(".weight"):
            assert not torch.equal(trained[key], value), key  # the rest trains
    frozen = load_baseline_checkpoint(tmp_path / "run" / "best.pth")["config"]["freeze"]
    assert frozen == 2


# --- the validation split ---------------------------------------------------------------------------------------


def test_val_split_is_stratified_seeded_and_disjoint():
    samples = [(f"c{label}/{i}.png", label) for label, count in enumerate([10, 5, 3]) for i in range(count)]
    train_part, val_part = stratified_split(samples, 0.2, seed=0)
    assert [sum(1 for _, y in val_part if y == label) for label in range(3)] == [2, 1, 1]
    assert sorted(train_part + val_part) == sorted(samples) and not set(train_part) & set(val_part)
    assert stratified_split(samples, 0.2, seed=0) == (train_part, val_part)
    assert any(stratified_split(samples, 0.2, seed=s)[1] != val_part for s in range(1, 5))
    with pytest.raises(UserError, match="class 'b' has a single image"):
        stratified_split([("a/1.png", 0), ("a/2.png", 0), ("b/1.png", 1)], 0.2, 0, ["a", "b"])


# --- schedules and augmentation ---------------------------------------------------------------------------------


def lrs(config: BaselineConfig, values: list[float] | None = None) -> list[float]:
    """The learning rate of each epoch under ``make_scheduler`` (plateau fed ``values``)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    scheduler = make_scheduler(optimizer, config)
    seen = []
    for epoch in range(config.epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(values[epoch])
        elif scheduler is not None:
            scheduler.step()
    return seen


def test_schedulers_at_start_middle_and_end():
    base = dict(learning_rate=0.1, epochs=10, lr_gamma=0.5)
    assert lrs(BaselineConfig(scheduler="none", **base)) == [0.1] * 10
    step = lrs(BaselineConfig(scheduler="step", lr_step_epochs=4, **base))
    assert step == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 2)
    cosine = lrs(BaselineConfig(scheduler="cosine", **base))
    assert (cosine[0], cosine[5], cosine[9]) == pytest.approx((0.1, 0.05, 0.1 * (1 + math.cos(math.pi * 9 / 10)) / 2))
    # plateau on val loss: no improvement after epoch 2 for 2 epochs -> halved from epoch 6 on (epoch index 5)
    plateau = lrs(BaselineConfig(scheduler="plateau", plateau_patience=2, **base),
                  [1.0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert plateau == pytest.approx([0.1] * 5 + [0.05] * 3 + [0.025] * 2)


@pytest.mark.parametrize("preset", ["none", "flip", "standard", "supcon"])
def test_augmentation_presets_give_normalised_tensors_of_the_requested_size(preset, image_root):
    from PIL import Image

    image = Image.open(sorted((image_root / "train" / "cat").iterdir())[0]).convert("RGB")
    transform = train_transform(preset, 24, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    first = transform(image)
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32
    torch.manual_seed(0)
    assert torch.equal(transform(image), first)  # a function of the seed (resume relies on it)
    if preset != "none":
        assert any(not torch.equal(transform(image), first) for _ in range(5))
    if preset == "standard":  # the experiments' recipe
        assert [type(t).__name__ for t in transform.transforms] == [
            "RandomResizedCrop", "RandomHorizontalFlip", "RandomRotation", "ColorJitter", "ToTensor", "Normalize",
            "RandomErasing"]
    if preset == "supcon":  # supcon-train's own recipe: crops from a fifth of the image up, grey-scale
        from supcon.data import two_view_augmentation

        ops = {type(t).__name__: t for t in transform.transforms}
        assert ops["RandomResizedCrop"].scale == (0.2, 1.0) and ops["RandomGrayscale"].p == 0.2
        assert repr(transform) == repr(two_view_augmentation(24, [0.5] * 3, [0.25] * 3))
