"""Typed configuration of ``baseline-train``, and its expansion into a grid of single runs.

``optimizer``, ``learning_rate`` and ``momentum`` may each hold several values (``"sgd,adam"`` on
the command line, a list in YAML) and ``seeds`` a count or a list: the command then trains one run
per combination (see :mod:`supcon.baseline.grid`). :func:`expand_grid` turns such a config into
single-valued configs; :meth:`BaselineConfig.validate` checks one of them.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field, replace
from typing import Any

from supcon.config import SAMPLERS, check_bounds, parse_triplet, require_data_folder
from supcon.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "plateau", "cosine")
LOSSES = ("ce", "bce")
#: Classifier heads (built by :func:`supcon.baseline.models.make_classifier_head`); here, not in
#: ``models``, so that ``baseline-train --help`` need not import torch and timm.
HEADS = ("linear", "mlp", "mlp-dropout")
AUGMENTATIONS = ("none", "flip", "standard", "supcon")
MONITORS = ("val_loss", "val_accuracy")
#: ``--class-weights``: none, or scikit-learn's ``balanced`` (n_images / (n_classes * n_images_of_the_class)).
CLASS_WEIGHTS = ("none", "balanced")
#: scikit-learn classifiers on pixels or frozen features (see :mod:`supcon.baseline.classical`).
CLASSICAL_MODELS = ("svm", "logreg", "knn")
#: Options that may change between a run and its resumption (they do not change the result).
RUNTIME_KEYS = frozenset({"num_workers", "resume", "run_dir", "config", "skip_bad_images", "allow_split_class_names",
                          "allow_data_change", "seeds", "test_folder"})


@dataclass
class BaselineConfig:
    """Every option of ``baseline-train``; the field names are also the YAML keys."""

    data_folder: str | None = None
    val_folder: str | None = None
    test_folder: str | None = None
    val_split: float = 0.2
    split_seed: int = 0
    model: str = "resnet18"
    features: str = "pixels"
    pretrained: bool = False
    pretrained_file: str | None = None
    init_from: str | None = None
    small_input: bool = False
    head: str | None = None
    head_hidden: int | None = None
    freeze: int = 0
    loss: str = "ce"
    class_weights: str = "none"
    aux_weight: float = 0.3
    optimizer: Any = "adam"
    learning_rate: Any = 1e-3
    momentum: Any = 0.9
    betas: Any = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    scheduler: str = "none"
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    plateau_patience: int = 5
    epochs: int = 50
    patience: int = 0
    monitor: str = "val_loss"
    augment: str = "standard"
    size: int = 224
    mean: Any = None
    std: Any = None
    batch_size: int = 32
    sampler: str = "random"
    num_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    seed: int = 0
    seeds: Any = None
    precision: str | None = None
    run_dir: str | None = None
    resume: bool = False
    skip_bad_images: bool = False
    allow_split_class_names: bool = False
    allow_data_change: bool = False

    def validate(self) -> None:
        """Check one run's values (a grid is expanded first) and parse the text forms.

        Raises:
            UserError: naming the first offending option.
        """
        require_data_folder(self.data_folder)
        self.optimizer = _single(self.optimizer, "optimizer", str)
        self.learning_rate = _single(self.learning_rate, "learning-rate", float)
        self.momentum = _single(self.momentum, "momentum", float)
        for name, choices in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("loss", LOSSES),
                              ("augment", AUGMENTATIONS), ("monitor", MONITORS), ("sampler", SAMPLERS),
                              ("class_weights", CLASS_WEIGHTS)):
            if getattr(self, name) not in choices:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, name)!r}")
        if self.features != "pixels" and self.model not in CLASSICAL_MODELS:
            raise UserError(f"--features applies to the classical models ({', '.join(CLASSICAL_MODELS)}); "
                            f"--model {self.model} learns its own features")
        self._refuse_network_options_for_classical()
        if self.head is not None and self.head not in HEADS:
            raise UserError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.pretrained and self.pretrained_file:
            raise UserError("give --pretrained (download ImageNet weights) or --pretrained-file, not both")
        if self.init_from and (self.pretrained or self.pretrained_file):
            raise UserError("--init-from starts the backbone from a SupCon checkpoint; it cannot be combined with "
                            f"{'--pretrained' if self.pretrained else '--pretrained-file'}")
        if self.init_from and self.model in CLASSICAL_MODELS:
            raise UserError(f"--init-from fine-tunes a network; --model {self.model} is a classical classifier "
                            "(use --features run:RUN for a SupCon run's frozen features)")
        if self.batch_size < 2:
            raise UserError(
                f"--batch-size must be at least 2 (BatchNorm needs 2 images per batch), got {self.batch_size}")
        check_bounds(self, at_least_one=("epochs", "size", "lr_step_epochs", "plateau_patience"),
                     non_negative=("freeze", "patience", "num_workers", "aux_weight", "weight_decay"))
        if self.head_hidden is not None and self.head_hidden < 1:
            raise UserError(f"--head-hidden must be at least 1, got {self.head_hidden}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.lr_gamma <= 1:
            raise UserError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if not 0 < self.val_split < 1:
            raise UserError(f"--val-split must be a fraction in (0, 1), got {self.val_split}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        self.betas = _parse_betas(self.betas)
        self.mean = parse_triplet(self.mean, "mean")
        self.std = parse_triplet(self.std, "std")
        if (self.mean is None) != (self.std is None):
            raise UserError("give both --mean and --std, or neither (they are then computed from the data folder)")

    def _refuse_network_options_for_classical(self) -> None:
        """``--sampler`` and ``--class-weights`` shape a network's batches and loss; a classical model has neither."""
        if self.model not in CLASSICAL_MODELS:
            return
        for name, default in (("sampler", "random"), ("class_weights", "none")):
            if getattr(self, name) != default:
                option = name.replace("_", "-")
                raise UserError(f"--{option} {getattr(self, name)} applies to the networks; --model {self.model} is a "
                                f"classical classifier (fitted on all training images at once)")


def _single(value: Any, name: str, kind: type) -> Any:
    values = _parse_list(value, name, kind)
    if len(values) != 1:
        raise UserError(f"--{name} has {len(values)} values; several values make a grid (expand it first)")
    return values[0]


def _parse_list(value: Any, name: str, kind: type) -> list:
    """``"sgd,adam"``, ``"1e-4, 1e-3"``, a YAML list or a single value -> a list of ``kind``."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]").split(",")]
    else:
        parts = [value]
    try:
        values = [kind(p.strip().lower() if isinstance(p, str) and kind is str else p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(
            f"--{name} must be one or more comma-separated {kind.__name__} values, got {value!r}") from None
    if not values or any(v == "" for v in values):
        raise UserError(f"--{name} has an empty value in {value!r}")
    if len(set(values)) != len(values):
        raise UserError(f"--{name} lists a value twice: {value!r}")
    return values


def _parse_betas(value: Any) -> list[float]:
    try:
        betas = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise UserError(f"--betas must be two numbers like '0.9,0.999', got {value!r}") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"--betas must be two numbers in [0, 1) like '0.9,0.999', got {value!r}")
    return betas


def grid_seeds(config: BaselineConfig) -> list[int]:
    """``--seeds 3`` -> ``[seed, seed+1, seed+2]``; ``--seeds 0,4,7`` -> those; none -> ``[seed]``."""
    if config.seeds is None:
        return [int(config.seed)]
    if isinstance(config.seeds, int) or (isinstance(config.seeds, str) and "," not in config.seeds):
        try:
            count = int(config.seeds)
        except ValueError:
            raise UserError(f"--seeds must be a count (e.g. 3) or a list (e.g. 0,1,2), got {config.seeds!r}") from None
        if count < 1:
            raise UserError(f"--seeds must be at least 1, got {count}")
        return [int(config.seed) + i for i in range(count)]
    return _parse_list(config.seeds, "seeds", int)


def is_grid(config: BaselineConfig) -> bool:
    """True when the config asks for several runs (or for seeds explicitly)."""
    return config.seeds is not None or any(
        len(_parse_list(getattr(config, name), name.replace("_", "-"), kind)) > 1
        for name, kind in (("optimizer", str), ("learning_rate", float), ("momentum", float)))


def expand_grid(config: BaselineConfig) -> list[BaselineConfig]:
    """One single-valued config per optimizer x learning rate x momentum x seed (in that order).

    Momentum applies to SGD only; Adam/AdamW cells ignore the momentum axis (their ``betas`` play
    that part), so they are not repeated per momentum.

    Raises:
        UserError: a malformed list.
    """
    optimizers = _parse_list(config.optimizer, "optimizer", str)
    rates = _parse_list(config.learning_rate, "learning-rate", float)
    momenta = _parse_list(config.momentum, "momentum", float)
    seeds = grid_seeds(config)
    cells, seen = [], set()
    for optimizer, rate, momentum, seed in itertools.product(optimizers, rates, momenta, seeds):
        if optimizer != "sgd":
            momentum = momenta[0]
        key = (optimizer, rate, momentum, seed)
        if key in seen:
            continue
        seen.add(key)
        cells.append(replace(config, optimizer=optimizer, learning_rate=rate, momentum=momentum, seed=seed,
                             seeds=None))
    return cells
