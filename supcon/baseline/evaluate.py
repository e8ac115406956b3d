"""Evaluate a baseline network: on the val set during training, and a finished run on a test folder.

:func:`evaluate` is the trainer's validation (loss, accuracy, AUC, F1); :func:`predict_run` is what
check-accuracies and the grid call, with a finished run's best-by-validation network, and
:func:`predict_val` the same network on the run's own val images (where check-accuracies chooses a
two-class run's decision threshold); the run directory alone says how (``best.pth`` carries the model
config, class names, mean/std and input size).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from supcon.baseline.data import stratified_split
from supcon.baseline.losses import ClassifierLoss, logits_to_probabilities
from supcon.baseline.models import build_classifier
from supcon.data import EvalDataset, check_images, eval_transform, make_loader, report_bad_images, scan_image_folder
from supcon.errors import UserError
from supcon.metrics import classification_metrics
from supcon.processes import make_accelerator
from supcon.rundir import (
    BAD_IMAGES_FILE,
    BEST,
    RUN_INFO_KEY,
    RunKind,
    find_split_folder,
    kind_from_run_info,
    load_baseline_checkpoint,
    read_config,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every sample of a prepared ``loader``, gathered from every process, in order."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)["logits"]
        all_logits.append(accelerator.gather_for_metrics(logits.float().contiguous()).cpu())
        all_labels.append(accelerator.gather_for_metrics(labels).cpu())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(model: torch.nn.Module, loss_fn: ClassifierLoss, loader, accelerator: Accelerator) -> dict[str, float]:
    """``loss`` (main output only), ``accuracy``, ``auc`` (NaN if undefined) and macro ``f1`` on ``loader``."""
    logits, labels = predict(model, loader, accelerator)
    metrics = classification_metrics(labels.numpy(), logits_to_probabilities(logits).numpy()).summary()
    metrics["loss"] = float(loss_fn.single(logits, labels).item())
    return metrics


def resolve_test_folder(run_info: dict[str, Any], test_folder: str | os.PathLike | None = None) -> Path:
    """The given folder, else the one the run recorded, else a sibling ``test`` of its data folder
    (:func:`supcon.rundir.find_split_folder`).

    Raises:
        UserError: none of them exists.
    """
    found = find_split_folder("test", test_folder, run_info.get("data_folder"), run_info.get("test_folder"))
    if found is None:
        sibling = Path(run_info["data_folder"]).parent / "test"
        recorded = run_info.get("test_folder")
        what = f"the recorded {recorded} is gone" if recorded else "none was recorded for the run"
        raise UserError(f"no test folder: {what} and {sibling} does not exist; give one (--test-folder)")
    return Path(found)


def predict_run(run_dir: str | os.PathLike, test_folder: str | os.PathLike | None = None, batch_size: int = 256,
                num_workers: int = 0, accelerator: Accelerator | None = None,
                allow_split_names: bool = False) -> dict[str, Any]:
    """Class probabilities of a baseline run's best-by-validation network on a test folder.

    Args:
        run_dir: a run directory written by baseline-train.
        test_folder: the ImageFolder to predict [default: the run's recorded test folder, else a
            sibling ``test`` of its data folder].
        batch_size: images per forward pass.
        num_workers: data-loading processes.
        accelerator: the caller's Accelerator [default: a new one, fp32].
        allow_split_names: accept test class folders named like dataset splits (also when the run was
            trained with ``--allow-split-class-names``).

    Returns:
        ``probabilities`` (``np.ndarray [N, C]``; the single-logit BCE variant gives 2 columns),
        ``labels`` (``np.ndarray [N]``), ``class_names``, ``network`` (e.g. ``"resnet18 (baseline,
        mlp head)"``), ``batch_size`` (the training batch size), ``selected_epoch`` (the best-by-val
        epoch), ``val_accuracy``, ``test_folder`` (absolute), ``paths`` (the images, in order).
        A classical run (``--model svm|logreg|knn``) has ``batch_size`` and ``selected_epoch`` None.

    Raises:
        UserError: not a baseline run, no best.pth, no/empty test folder, class names that differ,
            an unreadable test image.
    """
    best = _load_best(run_dir)
    folder = resolve_test_folder(best.run_info, test_folder)
    allow = allow_split_names or bool(best.config.get("allow_split_class_names"))
    index = scan_image_folder(folder, "test folder", allow_split_names=allow)
    if index.classes != best.class_names:
        raise UserError(f"class names differ between the run {best.class_names} and the test folder "
                        f"{folder} {index.classes}")
    out = _predict_samples(best, index.samples, batch_size, num_workers, accelerator)
    return {**out, "test_folder": str(Path(index.root).resolve())}


def predict_val(run_dir: str | os.PathLike, batch_size: int = 256, num_workers: int = 0,
                accelerator: Accelerator | None = None, allow_split_names: bool = False) -> dict[str, Any]:
    """Class probabilities of a baseline run's best-by-validation network on its own val images.

    The val images are the ones baseline-train validated on: its val folder (as recorded, else a sibling
    ``val`` of the data folder), or its ``--val-split`` of the data folder, drawn again from the recorded
    fraction and seed. Arguments as :func:`predict_run`.

    Returns:
        As :func:`predict_run`, with ``val_folder`` (the folder, or the data folder and the split) in place
        of ``test_folder``.

    Raises:
        UserError: not a baseline run, no best.pth, the val images are gone or changed, an unreadable image.
    """
    best = _load_best(run_dir)
    allow = allow_split_names or bool(best.config.get("allow_split_class_names"))
    samples, where = _val_samples(best, allow)
    out = _predict_samples(best, samples, batch_size, num_workers, accelerator)
    return {**out, "val_folder": where}


@dataclass
class _BestState:
    run_dir: Path
    config: dict[str, Any]
    run_info: dict[str, Any]
    state: dict[str, Any]
    classical: bool

    @property
    def class_names(self) -> list[str]:
        return list(self.state["class_names"])


def _load_best(run_dir: str | os.PathLike) -> _BestState:
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    run_info = config.get(RUN_INFO_KEY) or {}
    kind = kind_from_run_info(run_info, run_dir)
    if kind is not RunKind.BASELINE:
        raise UserError(f"{run_dir} is not a baseline run (its config.yaml records kind '{kind}')")
    classical = (run_info.get("model_config") or {}).get("family") == "classical"  # svm, logreg, knn
    if not (run_dir / BEST).is_file():
        raise UserError(f"{run_dir} has no {BEST} yet (it has not finished an epoch, or its fit); continue it with "
                        f"baseline-train --resume --run-dir {run_dir}")
    if classical:
        from supcon.baseline.classical import load_classical_checkpoint

        state = load_classical_checkpoint(run_dir / BEST)
    else:
        state = load_baseline_checkpoint(run_dir / BEST)
    return _BestState(run_dir, config, run_info, state, classical)


def _val_samples(best: _BestState, allow_split_names: bool) -> tuple[list[tuple[str, int]], str]:
    """The run's val images and where they are (see :func:`predict_val`)."""
    run_info, run_dir = best.run_info, best.run_dir
    split = run_info.get("val_split")
    if not split:
        folder = find_split_folder("val", None, run_info.get("data_folder"), run_info.get("val_folder"))
        if folder is None:
            raise UserError(f"the val folder of {run_dir} ({run_info.get('val_folder')}) is gone")
        index = scan_image_folder(folder, "val folder", allow_split_names=allow_split_names)
        if index.classes != best.class_names:
            raise UserError(f"class names differ between the run {best.class_names} and the val folder "
                            f"{folder} {index.classes}")
        return index.samples, str(Path(index.root).resolve())
    data_folder = run_info.get("data_folder")
    index = scan_image_folder(data_folder, "data folder", allow_split_names=allow_split_names)
    samples = stratified_split(index.samples, split["fraction"], split["seed"], index.classes)[1]
    expected = split.get("num_val", run_info.get("num_val_images"))
    if index.classes != best.class_names or (expected is not None and len(samples) != int(expected)):
        raise UserError(f"the val split of {run_dir} cannot be drawn again from {data_folder}: its images changed "
                        f"since training ({len(samples)} val images now, {expected} then)")
    return samples, f"{data_folder} (val split {split['fraction']:g}, seed {split['seed']})"


def _predict_samples(best: _BestState, samples: list[tuple[str, int]], batch_size: int, num_workers: int,
                     accelerator: Accelerator | None) -> dict[str, Any]:
    """``predict_run``'s result (without the folder) for ``samples`` of the run's classes."""
    state, run_info = best.state, best.run_info
    paths = [p for p, _ in samples]
    report_bad_images(check_images(paths, False, num_workers, progress=False).bad, skip=False,
                      list_path=best.run_dir / BAD_IMAGES_FILE)
    if best.classical:  # no batch, no epochs: its hyper-parameters were chosen on val
        from supcon.baseline.classical import predict_classical

        probabilities, labels = predict_classical(state, best.run_dir / BEST, samples, batch_size, num_workers)
        return {"probabilities": probabilities, "labels": labels, "class_names": best.class_names,
                "network": state["description"], "batch_size": None, "selected_epoch": None,
                "val_accuracy": float(state["val_accuracy"]), "paths": paths}

    model = build_classifier(state["model_config"])
    model.backbone.load_state_dict(state["encoder"])
    model.head.load_state_dict(state["head"])
    accelerator = accelerator or make_accelerator("fp32")
    dataset = EvalDataset(samples, eval_transform(int(state["size"]), state["mean"], state["std"]))
    loader = make_loader(dataset, num_workers, accelerator.device.type == "cuda", batch_size=batch_size)
    model, loader = accelerator.prepare(model, loader)
    logits, labels = predict(model, loader, accelerator)
    return {
        "probabilities": logits_to_probabilities(logits).numpy(),
        "labels": labels.numpy(),
        "class_names": best.class_names,
        "network": state.get("description") or run_info.get("description"),
        "batch_size": int(best.config.get("batch_size", 0)),
        "selected_epoch": int(state["best_epoch"]),
        "val_accuracy": float(state["val_accuracy"]),
        "paths": paths,
    }
