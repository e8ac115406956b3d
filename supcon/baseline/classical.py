"""Classical classifiers as baseline runs: ``baseline-train --model svm|logreg|knn`` (scikit-learn).

The features are one of:

- ``pixels`` (default): the images through the evaluation transform (resize the short side to
  ``--size``, centre crop, normalise with the per-channel mean/std), flattened. ``--size`` must be
  small (at most :data:`MAX_PIXEL_SIZE`): 8 for scikit-learn's 8x8 digits.
- ``timm:NAME``: the pooled features of a frozen timm backbone at ``--size`` (weights from
  ``--pretrained-file``, or ``--pretrained`` to download them).
- ``run:RUN``: the frozen encoder of one of our SupCon runs (the checkpoint ``check-accuracies`` would
  choose from its probe results, else its newest ``ckpt_epoch_N.pth``), or ``run:FILE.pth``, at the
  size and mean/std that run recorded.

Network features are standardised per dimension with the training set's mean and std; pixels
are not (they share one unit, and per-pixel scaling blows up the near-constant border pixels:
on the demo's 8 px digits it lowered the best val accuracy of the SVM from 100% to 99.4%, of kNN
from 99.2% to 97.2%).

Hyper-parameters are chosen on the val folder (else a stratified ``--val-split`` of the training
folder, as for the other baselines) from small fixed grids, the first (simplest) setting winning a tie:

- ``svm``: RBF kernel, C in :data:`SVM_C_GRID` x gamma = factor / (D x Var(X)) for factor in
  :data:`SVM_GAMMA_FACTORS` (scikit-learn's ``"scale"`` gamma times 0.1..10); smaller C, then smaller
  gamma, first.
- ``logreg``: multinomial logistic regression by L-BFGS, C in ``linear_probe.lbfgs.C_GRID``
  (1e-4..1e4, half-decade steps) on standardised features, ties to the lower val cross-entropy, then
  smaller C (the SimCLR/CLIP linear evaluation, shared with ``probe-all --head-solver lbfgs``).
- ``knn``: k in :data:`KNN_K_GRID`, Euclidean distance, uniform votes; larger k first.

Each grid point is fit on the training images only, so the chosen one is the final model: nothing is
refit on validation images. ``best.pth`` stores what predicts, as tensors (so it loads with
``torch.load(weights_only=True)``; no scikit-learn object is pickled): the SVM's support vectors,
dual coefficients, intercepts, per-class support counts and gamma; the logistic regression's weights
and biases; the kNN's training features and labels; the scaler's mean/std; and for network features the
encoder's config and weights. :func:`predict_classical` rebuilds the predictions from them
(tested equal to scikit-learn's own); ``supcon.baseline.evaluate.predict_run`` calls it for
check-accuracies. The SVM gives no calibrated probabilities (scikit-learn's
Platt scaling would need an inner cross-validation); ``check-accuracies`` gets a softmax of its
one-vs-rest scores (scikit-learn's ``decision_function``), whose arg-max is the SVM's prediction and
whose order gives the ROC curve.

Run directory: ``config.yaml`` (every option, ``run_info`` with ``kind: baseline``), ``best.pth``,
``val_grid.csv`` (val accuracy and fit seconds of every grid point).
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
import torch
from torch import nn

from supcon.baseline.config import CLASSICAL_MODELS, RUNTIME_KEYS, BaselineConfig, is_grid
from supcon.baseline.train import prepare_data
from supcon.checkpoint import atomic_save, safe_load
from supcon.config import config_differences, to_yaml_dict
from supcon.errors import UserError
from supcon.rundir import (
    BEST,
    DEFAULT_RUNS_ROOT,
    RUN_INFO_KEY,
    MetricsCSV,
    epoch_checkpoints,
    has_run_content,
    load_supcon_checkpoint,
    read_config,
)

logger = logging.getLogger(__name__)

CLASSICAL_FAMILY = "classical"
CLASSICAL_FORMAT = "supcon-classical-model"
CLASSICAL_VERSION = 1
GRID_CSV = "val_grid.csv"
PIXELS = "pixels"
#: Largest ``--size`` for pixel features (64 x 64 x 3 = 12,288 numbers per image).
MAX_PIXEL_SIZE = 64
SVM_C_GRID = (0.1, 1.0, 10.0, 100.0)
#: Multiples of scikit-learn's ``gamma="scale"``, 1 / (features x variance of the training features).
SVM_GAMMA_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
#: Largest first: on a val tie the smoother classifier wins.
KNN_K_GRID = (21, 15, 11, 7, 5, 3, 1)
#: Rows of test/val features scored at once (bounds the kernel/distance matrices' memory).
CHUNK = 4096
NAMES = {"svm": "RBF SVM", "logreg": "logistic regression", "knn": "kNN"}


def is_classical(model: str) -> bool:
    return model in CLASSICAL_MODELS


# --------------------------------------------------------------------------------------------- features


@dataclass
class Extractor:
    """What turns images into feature vectors: an encoder (``nn.Flatten`` for pixels) and its preprocessing."""

    encoder: nn.Module
    size: int
    mean: list[float]
    std: list[float]
    encoder_config: dict[str, Any] | None  # None: pixels
    description: str  # e.g. "8 px pixels", "resnet50 features (pretrained)"
    source: dict[str, Any]

    @property
    def standardize(self) -> bool:
        return self.encoder_config is not None

    def to_state(self) -> dict[str, Any]:
        state = {"encoder_config": self.encoder_config, "size": self.size, "mean": self.mean, "std": self.std,
                 "source": self.source}
        if self.encoder_config is not None:
            state["encoder"] = {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}
        return state


def parse_features(text: str) -> tuple[str, str | None]:
    """``pixels`` -> ``("pixels", None)``; ``timm:NAME`` / ``run:PATH`` -> ``(kind, NAME or PATH)``.

    Raises:
        UserError: anything else.
    """
    text = (text or PIXELS).strip()
    if text == PIXELS:
        return PIXELS, None
    kind, _, value = text.partition(":")
    if kind in ("timm", "run") and value.strip():
        return kind, value.strip()
    raise UserError(f"--features must be 'pixels', 'timm:MODEL' (e.g. timm:resnet50) or 'run:RUN' (a supcon-train "
                    f"run directory or checkpoint), got {text!r}")


def check_features(config: BaselineConfig) -> tuple[str, str | None]:
    """The parsed ``--features``, checked before any image is read.

    Raises:
        UserError: a malformed value, pixels at a large ``--size``, or a missing ``--pretrained-file``.
    """
    kind, value = parse_features(config.features)
    if kind == PIXELS and config.size > MAX_PIXEL_SIZE:
        raise UserError(f"--features pixels at --size {config.size} gives {3 * config.size ** 2:,} numbers per "
                        f"image; give a small --size (at most {MAX_PIXEL_SIZE}, e.g. 8 for 8x8 digits)")
    if config.pretrained_file and not Path(config.pretrained_file).is_file():
        raise UserError(f"--pretrained-file not found: {config.pretrained_file}")
    return kind, value


def build_extractor(config: BaselineConfig, mean: list[float] | None, std: list[float] | None) -> Extractor:
    """The feature extractor ``config.features`` names (frozen, in ``eval()``).

    ``mean``/``std``: the training folder's (used by pixels and timm features; a SupCon run brings its own).

    Raises:
        UserError: a too-large ``--size`` for pixels, an unknown timm model, a missing weights file, or a
            run/checkpoint that cannot be read.
    """
    from supcon.models import build_encoder

    kind, value = check_features(config)
    if kind == PIXELS:
        return Extractor(nn.Flatten(), config.size, list(mean), list(std), None, f"{config.size} px pixels",
                         {"features": PIXELS})
    if kind == "timm":
        encoder = build_encoder(value, pretrained=config.pretrained, small_input=config.small_input,
                                pretrained_file=config.pretrained_file)
        weights = "pretrained" if config.pretrained or config.pretrained_file else "random init"
        if weights == "random init":
            logger.warning("timm:%s has no weights (give --pretrained-file or --pretrained): its features are "
                           "those of a randomly initialised network", value)
        encoder_config = {"model": value, "small_input": bool(config.small_input), "zero_init_last": False}
        source = {"features": f"timm:{value}", "pretrained": bool(config.pretrained),
                  "pretrained_file": str(Path(config.pretrained_file).resolve()) if config.pretrained_file else None}
        return Extractor(_frozen(encoder), config.size, list(mean), list(std), encoder_config,
                         f"{value} features ({weights})", source)
    return _run_extractor(value)


def _frozen(encoder: nn.Module) -> nn.Module:
    encoder.requires_grad_(False)
    return encoder.eval()


def _run_checkpoint(path: Path) -> Path:
    """A SupCon run's checkpoint to take features from: the one chosen on val by its probes, else the newest."""
    from linear_probe.heads import load_head_records
    from linear_probe.runs import PROBE_DIR
    from linear_probe.select import select_best

    if path.is_file():
        return path
    if not (path / "config.yaml").is_file():
        raise UserError(f"--features run:{path}: not a run directory nor a checkpoint file")
    records = load_head_records(path / PROBE_DIR, path)
    if records:
        best = select_best(records)
        logger.info("run:%s: using %s, the checkpoint its probes chose on val (%.2f%%)", path, best.checkpoint,
                    100 * best.best_val_accuracy)
        return path / best.checkpoint
    numbered = epoch_checkpoints(path)
    if not numbered:
        raise UserError(f"--features run:{path}: the run has no ckpt_epoch_N.pth checkpoint")
    chosen = list(numbered.values())[-1]
    logger.info("run:%s: not probed; using its newest checkpoint %s", path, chosen.name)
    return chosen


def _run_extractor(value: str) -> Extractor:
    from linear_probe.checkpoints import FileStamp, build_frozen_encoder

    path = _run_checkpoint(Path(value).expanduser())
    state = load_supcon_checkpoint(path)
    encoder = build_frozen_encoder(state, path)
    model_config = state["model_config"]
    encoder_config = {"model": model_config["model"], "small_input": bool(model_config.get("small_input", False)),
                      "zero_init_last": bool(model_config.get("zero_init_last", False))}
    size = int((state.get("config") or {}).get("size") or read_config(path.parent).get("size"))
    epoch = int(state.get("epoch", 0))
    source = {"features": f"run:{value}", "checkpoint": str(path.resolve()),
              "checkpoint_sha256": FileStamp.of(path).sha256, "backbone_epoch": epoch}
    return Extractor(encoder, size, list(state["mean"]), list(state["std"]), encoder_config,
                     f"SupCon {encoder_config['model']} epoch {epoch} features", source)


def extractor_from_state(state: dict[str, Any], path: Path) -> Extractor:
    """Rebuild the extractor a classical ``best.pth`` recorded."""
    from linear_probe.checkpoints import build_frozen_encoder

    features = state["features"]
    if features["encoder_config"] is None:
        encoder: nn.Module = nn.Flatten()
    else:
        encoder = build_frozen_encoder({"model_config": features["encoder_config"], "encoder": features["encoder"]},
                                       path)
    return Extractor(encoder, int(features["size"]), list(features["mean"]), list(features["std"]),
                     features["encoder_config"], state.get("description", ""), dict(features["source"]))


def extract(extractor: Extractor, samples: list[tuple[str, int]], device: torch.device, batch_size: int,
            num_workers: int, progress: bool, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D] float64 on the CPU, labels [N])`` of ``samples``."""
    from linear_probe.features import encode_samples
    from supcon.data import eval_transform

    encoder = extractor.encoder.to(device)
    features, labels = encode_samples(encoder, samples, eval_transform(extractor.size, extractor.mean, extractor.std),
                                      device, batch_size, num_workers, progress, desc=f"features of {what}")
    return features.double(), labels


# ------------------------------------------------------------------------------------------- classifiers


def svm_scores(features: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """scikit-learn's ``SVC.decision_function`` (one-vs-rest shape) from the stored tensors, ``[N, C]``.

    libsvm's one-vs-one layout: for classes ``i < j`` (pair ``p`` in that order), the decision is
    ``sum(dual_coef[j-1, SV of i] * K) + sum(dual_coef[i, SV of j] * K) + intercept[p]``; positive
    votes for ``i``. The votes plus the summed confidences squashed to (-1/3, 1/3) give the
    one-vs-rest scores (scikit-learn's ``_ovr_decision_function``). Two classes: scikit-learn stores
    the negated coefficients, and the score pair is ``[-d/2, d/2]`` of its decision ``d``.
    """
    support = params["support_vectors"].double()
    dual = params["dual_coef"].double()
    intercept = params["intercept"].double()
    counts = [int(c) for c in params["n_support"]]
    num_classes = len(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    squared = torch.cdist(features.double(), support).square()
    kernel = torch.exp(-float(params["gamma"]) * squared)
    if num_classes == 2:
        decision = kernel @ dual[0] + intercept[0]
        return torch.stack([-decision / 2, decision / 2], dim=1)
    votes = torch.zeros(features.shape[0], num_classes, dtype=torch.float64)
    confidence = torch.zeros_like(votes)
    pair = 0
    for i in range(num_classes):
        for j in range(i + 1, num_classes):
            rows_i, rows_j = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
            decision = kernel[:, rows_i] @ dual[j - 1, rows_i] + kernel[:, rows_j] @ dual[i, rows_j] + intercept[pair]
            votes[:, i] += (decision >= 0).double()
            votes[:, j] += (decision < 0).double()
            confidence[:, i] += decision
            confidence[:, j] -= decision
            pair += 1
    return votes + confidence / (3 * (confidence.abs() + 1))


def knn_probabilities(features: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Share of each class among the ``k`` nearest training features (Euclidean), ``[N, C]``."""
    bank = params["train_features"].double()
    labels = params["train_labels"].long()
    k = min(int(params["k"]), bank.shape[0])
    nearest = torch.cdist(features.double(), bank).topk(k, dim=1, largest=False).indices
    votes = torch.nn.functional.one_hot(labels[nearest], int(params["num_classes"])).double()
    return votes.mean(dim=1)


def classifier_probabilities(features: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Class probabilities ``[N, C]`` (an SVM: softmax of its scores) of raw features, in chunks."""
    from linear_probe.lbfgs import linear_scores

    outputs = []
    for start in range(0, features.shape[0], CHUNK):
        x = features[start:start + CHUNK].double()
        if params.get("scaler_mean") is not None:
            x = (x - params["scaler_mean"].double()) / params["scaler_std"].double()
        if params["model"] == "svm":
            outputs.append(torch.softmax(svm_scores(x, params), dim=1))
        elif params["model"] == "knn":
            outputs.append(knn_probabilities(x, params))
        else:
            outputs.append(torch.softmax(linear_scores(x, params["weight"].double(), params["bias"].double()), dim=1))
    return torch.cat(outputs)


def _accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities.argmax(1) == labels.long()).double().mean().item())


@dataclass
class Selection:
    """The chosen classifier (as tensors), its hyper-parameters, val accuracy, and every grid point's result."""

    params: dict[str, Any]
    hyperparameters: dict[str, float]
    val_accuracy: float
    grid: list[dict[str, Any]]


def fit_and_select(model: str, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                   val_y: torch.Tensor, num_classes: int, standardize: bool) -> Selection:
    """Fit every grid point of ``model`` on the training features; keep the best by val accuracy.

    Args:
        model: ``svm``, ``logreg`` or ``knn``.
        train_x, train_y: ``[N, D]`` features and ``[N]`` labels the classifier is fit on.
        val_x, val_y: the validation features and labels that choose the grid point.
        num_classes: classes of the task.
        standardize: scale each dimension by the training mean/std first (svm and knn; logreg always does).
    """
    from linear_probe.lbfgs import fit_logistic_regression, standardizer

    if model == "logreg":
        fit = fit_logistic_regression(train_x, train_y, val_x, val_y, num_classes)
        grid = [{"C": c, "val_accuracy": round(a, 6), "val_loss": round(v, 6)}
                for c, a, v in zip(fit.c_grid, fit.val_accuracy_per_c, fit.val_loss_per_c)]
        params = {"model": "logreg", "num_classes": num_classes, "weight": fit.weight.double(),
                  "bias": fit.bias.double(), "scaler_mean": None, "scaler_std": None}
        return Selection(params, {"C": fit.c}, fit.val_accuracy, grid)

    x = train_x.double().numpy()
    scaler: dict[str, Any] = {"scaler_mean": None, "scaler_std": None}
    if standardize:
        mean, std = standardizer(x)
        x = (x - mean) / std
        scaler = {"scaler_mean": torch.from_numpy(mean), "scaler_std": torch.from_numpy(std)}
    y = train_y.numpy()
    grid: list[dict[str, Any]] = []
    best: Selection | None = None
    for hyper in _grid_points(model, x):
        start = time.perf_counter()
        params = {"model": model, "num_classes": num_classes, **scaler, **_fit_params(model, hyper, x, y, num_classes)}
        val_accuracy = _accuracy(classifier_probabilities(val_x, params), val_y)
        grid.append({**hyper, "val_accuracy": round(val_accuracy, 6),
                     "seconds": round(time.perf_counter() - start, 4)})
        if best is None or val_accuracy > best.val_accuracy:
            best = Selection(params, hyper, val_accuracy, grid)
    return best


def _grid_points(model: str, x: np.ndarray) -> list[dict[str, float]]:
    if model == "knn":
        return [{"k": k} for k in KNN_K_GRID if k <= x.shape[0]]
    scale = 1.0 / (x.shape[1] * max(float(x.var()), 1e-12))
    return [{"C": c, "gamma": float(f"{factor * scale:.6g}")} for c in SVM_C_GRID for factor in SVM_GAMMA_FACTORS]


def _fit_params(model: str, hyper: dict[str, float], x: np.ndarray, y: np.ndarray,
                num_classes: int) -> dict[str, Any]:
    """Fit one grid point; returns the tensors that predict."""
    if model == "knn":
        return {"k": int(hyper["k"]), "train_features": torch.from_numpy(x), "train_labels": torch.from_numpy(y)}
    from sklearn.svm import SVC

    missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise UserError(f"the SVM needs training images of every class; class indices {missing} have none")
    svm = SVC(C=hyper["C"], kernel="rbf", gamma=hyper["gamma"]).fit(x, y)
    return {"support_vectors": torch.from_numpy(svm.support_vectors_),
            "dual_coef": torch.from_numpy(svm.dual_coef_), "intercept": torch.from_numpy(svm.intercept_),
            "n_support": torch.from_numpy(svm.n_support_.astype(np.int64)), "gamma": float(hyper["gamma"])}


def describe(model: str, extractor_description: str, hyperparameters: dict[str, float]) -> str:
    """The Network column, e.g. ``RBF SVM on 8 px pixels (baseline, C 1, gamma 0.00347)``."""
    values = ", ".join(f"{k} {v:g}" for k, v in hyperparameters.items())
    return f"{NAMES[model]} on {extractor_description} (baseline, {values})"


# ------------------------------------------------------------------------------------------------ runs


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
    from supcon.checkpoint import atomic_write_text
    from supcon.rundir import package_versions, write_config

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
    from linear_probe.config import resolve_device

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
        "kind": "baseline", "description": description, "class_names": data.classes,
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
        "format": CLASSICAL_FORMAT, "version": CLASSICAL_VERSION, "kind": "baseline", "model_config": model_config,
        "description": description, "class_names": data.classes, "features": extractor.to_state(),
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
    from linear_probe.config import resolve_device

    extractor = extractor_from_state(state, path)
    features, labels = extract(extractor, samples, resolve_device("auto"), batch_size, num_workers, False, "test")
    return classifier_probabilities(features, state["classifier"]).numpy(), labels.numpy()
