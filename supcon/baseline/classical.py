"""Classical classifiers as baseline runs: ``baseline-train --model svm|logreg|knn`` (scikit-learn).

:func:`fit_classical` extracts the features (:mod:`supcon.baseline.classical_features`), fits every grid
point of the model on the training images and keeps the best on the val folder (else a stratified
``--val-split`` of the training folder, as for the other baselines; :mod:`supcon.baseline.classical_models`),
and writes the run directory. :func:`predict_classical` scores images with a stored model, for
``supcon.baseline.evaluate.predict_run`` (check-accuracies).

Run directory: ``config.yaml`` (every option, ``run_info`` with ``kind: baseline``), ``best.pth``
(what predicts, as tensors: the fitted classifier, the scaler, and for network features the encoder's
config and weights), ``val_grid.csv`` (val accuracy and fit seconds of every grid point).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from supcon.baseline.classical_features import (
    PIXELS,
    build_extractor,
    check_features,
    extract,
    extractor_from_state,
    parse_features,
)
from supcon.baseline.classical_models import classifier_probabilities, describe, fit_and_select
from supcon.baseline.config import CLASSICAL_MODELS, RUNTIME_KEYS, BaselineConfig, is_grid
from supcon.baseline.data import prepare_data
from supcon.checkpoint import atomic_save, atomic_write_text, safe_load
from supcon.config import config_differences, to_yaml_dict
from supcon.errors import UserError
from supcon.frozen import resolve_device
from supcon.rundir import (
    BEST,
    DEFAULT_RUNS_ROOT,
    RUN_INFO_KEY,
    MetricsCSV,
    RunKind,
    has_run_content,
    package_versions,
    read_config,
    write_config,
)

logger = logging.getLogger(__name__)

CLASSICAL_FAMILY = "classical"
CLASSICAL_FORMAT = "supcon-classical-model"
CLASSICAL_VERSION = 1
GRID_CSV = "val_grid.csv"


def is_classical(model: str) -> bool:
    return model in CLASSICAL_MODELS


@dataclass
class ClassicalResult:
    run_dir: Path
    description: str
    val_accuracy: float
    hyperparameters: dict[str, float]
    seconds: float
    already_done: bool = False


def _resolve_run_dir(config: BaselineConfig) -> Path:
    if config.resume and not config.run_dir:
        raise UserError("--resume needs --run-dir (the run to continue)")
    if config.run_dir:
        return Path(config.run_dir)
    kind, value = parse_features(config.features)
    slug = PIXELS if kind == PIXELS else Path(value).name.replace(".pth", "")
    return Path(DEFAULT_RUNS_ROOT) / f"{config.model}_{slug}_baseline_{datetime.now():%Y%m%d-%H%M%S}"


def _check_run_dir(run_dir: Path, config: BaselineConfig) -> bool:
    """True when ``run_dir`` already holds this finished run (``--resume``); refuses to overwrite another."""
    if not has_run_content(run_dir):
        return False
    if not config.resume:
        raise UserError(f"run dir {run_dir} already exists and is not empty; pass --resume to reuse it, or choose "
                        "another --run-dir")
    if (run_dir / "config.yaml").is_file():
        stored = {k: v for k, v in read_config(run_dir).items() if k != RUN_INFO_KEY}
        requested = to_yaml_dict(config)
        diffs = config_differences(stored, requested, ignore=RUNTIME_KEYS | {"mean", "std"})
        if diffs:
            details = ", ".join(f"{k}: run has {stored.get(k)!r}, now {requested.get(k)!r}" for k in diffs[:4])
            raise UserError(f"run dir {run_dir} was started with a different configuration ({details})")
    return (run_dir / BEST).is_file()


def fit_classical(config: BaselineConfig, progress: bool = True) -> ClassicalResult:
    """``baseline-train --model svm|logreg|knn``: extract features, choose on val, save the run.

    Raises:
        UserError: bad options or input (folders, images, ``--features``), or a run dir that holds
            another run, before anything is written.
    """
    from supcon.engine import RunEngine

    config = replace(config)
    config.validate()
    if not is_classical(config.model):
        raise UserError(f"--model {config.model!r} is not a classical model ({', '.join(CLASSICAL_MODELS)})")
    if is_grid(config):
        raise UserError(f"--model {config.model} fits its own grid of hyper-parameters on val and is deterministic; "
                        "drop --seeds and the lists of --optimizer / --learning-rate / --momentum")
    kind, _ = check_features(config)
    engine = RunEngine("fp32", progress)  # the run directory's lock and checks, as for the other trainers
    try:
        return _fit_classical(config, engine, kind, progress)
    finally:
        engine.close()


def _fit_classical(config: BaselineConfig, engine, kind: str, progress: bool) -> ClassicalResult:
    start = time.perf_counter()
    run_dir = engine.choose_run_dir(str(_resolve_run_dir(config)), config.resume, config.model, config.batch_size)
    if _check_run_dir(run_dir, config):
        state = load_classical_checkpoint(run_dir / BEST)
        logger.info("run %s is already done (%s); nothing to do", run_dir, state["description"])
        return ClassicalResult(run_dir, state["description"], float(state["val_accuracy"]),
                               dict(state["hyperparameters"]), 0.0, already_done=True)

    extractor = None
    if kind == "run":  # the run's encoder brings its own preprocessing: no mean/std to compute
        extractor = build_extractor(config, None, None)
        config.mean, config.std = extractor.mean, extractor.std
    data = prepare_data(config, engine)
    if config.mean is None:  # computed on the training part by prepare_data
        config.mean, config.std = data.mean, data.std
    extractor = extractor or build_extractor(config, config.mean, config.std)
    device = resolve_device("auto")
    batch = max(config.batch_size, 256)
    train_x, train_y = extract(extractor, data.train_samples, device, batch, config.num_workers, progress, "train")
    val_x, val_y = extract(extractor, data.val_samples, device, batch, config.num_workers, progress, "val")
    extract_seconds = time.perf_counter() - start
    fit_start = time.perf_counter()
    selection = fit_and_select(config.model, train_x, train_y, val_x, val_y, len(data.classes), extractor.standardize)
    fit_seconds = time.perf_counter() - fit_start
    description = describe(config.model, extractor.description, selection.hyperparameters)
    logger.info("%s: val accuracy %.2f%% (%d grid points in %.1f s; features %d-d in %.1f s)", description,
                100 * selection.val_accuracy, len(selection.grid), fit_seconds, train_x.shape[1], extract_seconds)

    model_config = {"model": config.model, "family": CLASSICAL_FAMILY, "features": config.features,
                    "encoder_config": extractor.encoder_config}
    resolved = to_yaml_dict(config)
    resolved["run_dir"] = str(run_dir)
    run_info = {
        "kind": RunKind.BASELINE.value, "description": description, "class_names": data.classes,
        "num_classes": len(data.classes), "data_folder": data.data_folder, "val_folder": data.val_folder,
        "val_split": data.val_split, "test_folder": data.test_folder, "mean": list(extractor.mean),
        "std": list(extractor.std), "size": extractor.size, "model_config": model_config,
        "features_source": extractor.source, "feature_dim": int(train_x.shape[1]),
        "hyperparameters": selection.hyperparameters, "val_accuracy": selection.val_accuracy,
        "num_train_images": len(data.train_samples), "num_val_images": len(data.val_samples),
        "bad_images_skipped": data.bad_images, "feature_seconds": round(extract_seconds, 3),
        "fit_seconds": round(fit_seconds, 3), "device": str(device), "versions": package_versions(),
    }
    state = {
        "format": CLASSICAL_FORMAT, "version": CLASSICAL_VERSION, "kind": RunKind.BASELINE.value,
        "model_config": model_config, "description": description, "class_names": data.classes,
        "features": extractor.to_state(),
        "classifier": selection.params, "hyperparameters": selection.hyperparameters,
        "val_accuracy": selection.val_accuracy, "num_train_images": len(data.train_samples), "config": resolved,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, resolved, run_info)
    grid_csv = MetricsCSV(run_dir / GRID_CSV, list(selection.grid[0]))
    atomic_write_text("", grid_csv.path)
    for row in selection.grid:
        grid_csv.append(row)
    atomic_save(state, run_dir / BEST)  # last: a run dir with best.pth is complete
    return ClassicalResult(run_dir, description, selection.val_accuracy, selection.hyperparameters,
                           time.perf_counter() - start)


def load_classical_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load (``weights_only``) a classical ``best.pth``.

    Raises:
        UserError: missing, unsafe or corrupt file, or not written by a classical baseline.
    """
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != CLASSICAL_FORMAT:
        raise UserError(f"{path} is not a classical baseline model (no 'format: {CLASSICAL_FORMAT}' entry)")
    return state


def predict_classical(state: dict[str, Any], path: Path, samples: list[tuple[str, int]], batch_size: int = 256,
                      num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities [N, C], labels [N])`` of a classical ``best.pth`` on ``samples`` (``predict_run``'s core).

    Nothing is refit: the stored classifier (fit on the training images with the val-chosen
    hyper-parameters) scores the images' features.
    """
    extractor = extractor_from_state(state, path)
    features, labels = extract(extractor, samples, resolve_device("auto"), batch_size, num_workers, False, "test")
    return classifier_probabilities(features, state["classifier"]).numpy(), labels.numpy()
