"""Typed options of ``probe-all`` and ``check-accuracies`` (defaults < ``--config`` YAML < command line)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from linear_probe.operating_point import ARGMAX, parse_rule
from supcon.config import check_bounds
from supcon.errors import UserError

#: ``--from auto``: choose the first backbone epoch from the run's loss curve (see ``probe_start``).
AUTO = "auto"

#: ``--head-solver`` values: the recorded SGD protocol, or L-BFGS logistic regression (see ``lbfgs``).
HEAD_SOLVERS = ("sgd", "lbfgs")

#: ``--average`` values (scikit-learn's names); ``binary`` needs two classes.
AVERAGES = ("macro", "micro", "weighted", "binary")

#: ``check-accuracies --select`` rules, the default first (see ``linear_probe.select``).
SELECTION_RULES = ("trend", "within-noise", "max-val-acc")


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass
class ProbeConfig:
    """Every option of ``probe-all``; the field names are also the YAML keys (section ``probe:``).

    The head is L-BFGS logistic regression on the cached features with C chosen on val unless
    ``head_solver`` says ``sgd`` (or ``augment`` asks for fresh crops, which only SGD can train on).
    The SGD options' defaults are those of the recorded experiments: batch 256, LR 0.25, momentum
    0.9, 100 head epochs with a cosine schedule, no weight decay (``configs/probe_from700.yaml``).
    """

    run: str | None = None
    runs_root: str = "runs"
    from_epoch: int | str | None = None
    to_epoch: int | None = None
    train_folder: str | None = None
    val_folder: str | None = None
    batch_size: int = 256
    learning_rate: float = 0.25
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 100
    cosine: bool = True
    augment: bool = False
    head_solver: str | None = None  # None: lbfgs, or sgd with augment (see resolve_head_solver)
    force: bool = False
    seed: int = 0
    auto_tolerance: float = 0.1
    encode_batch_size: int = 256
    num_workers: int = field(default_factory=_default_workers)
    device: str = "auto"
    cache_dir: str | None = None
    allow_split_class_names: bool = False

    def validate(self) -> None:
        """Check the options and normalise ``from_epoch`` to an int (0: all) or ``"auto"``.

        Raises:
            UserError: naming the first offending option.
        """
        if self.from_epoch is None or self.from_epoch == "":
            self.from_epoch = 0
        elif isinstance(self.from_epoch, str) and self.from_epoch.strip().lower() == AUTO:
            self.from_epoch = AUTO
        else:
            try:
                self.from_epoch = int(self.from_epoch)
            except (TypeError, ValueError):
                raise UserError(
                    f"--from must be a backbone epoch (an integer) or 'auto', got {self.from_epoch!r}") from None
            if self.from_epoch < 0:
                raise UserError(f"--from must be >= 0, got {self.from_epoch}")
        if self.to_epoch is not None:
            if self.to_epoch < 0:
                raise UserError(f"--to must be >= 0, got {self.to_epoch}")
            if isinstance(self.from_epoch, int) and self.to_epoch < self.from_epoch:
                raise UserError(f"--to {self.to_epoch} is below --from {self.from_epoch}")
        check_bounds(self, at_least_one=("batch_size", "epochs", "encode_batch_size"))
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        self.head_solver = resolve_head_solver(self)
        if not 0 < self.auto_tolerance < 1:
            raise UserError(f"--auto-tolerance must be in (0, 1), got {self.auto_tolerance}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        validate_device(self.device)


#: The options that only the SGD head reads.
SGD_HEAD_OPTIONS = ("batch_size", "learning_rate", "momentum", "weight_decay", "epochs", "cosine")


def resolve_head_solver(config: ProbeConfig) -> str:
    """The head solver a probe-all config asks for: as given, else ``lbfgs`` (``sgd`` with ``--augment``).

    L-BFGS became the default on 6 Dec 2026: on the quality benchmark's val sets it was 1.9 points more
    accurate than the SGD protocol on average (7 of 9 runs), with its C chosen on the other half of val
    (docs/benchmarks/quality.md, "The probe head").

    Raises:
        UserError: an unknown solver; L-BFGS with ``--augment``; or L-BFGS with an SGD-only option set away
            from its default (it would be ignored).
    """
    solver = config.head_solver
    if solver is None:
        solver = "sgd" if config.augment else "lbfgs"
    if solver not in HEAD_SOLVERS:
        raise UserError(f"--head-solver must be one of {', '.join(HEAD_SOLVERS)}, got {solver!r}")
    if solver == "lbfgs" and config.augment:
        raise UserError("--head-solver lbfgs fits once on the cached features of the un-augmented images; "
                        "drop --augment (or use --head-solver sgd)")
    if solver == "lbfgs":
        defaults = ProbeConfig.__dataclass_fields__
        given = [name for name in SGD_HEAD_OPTIONS if getattr(config, name) != defaults[name].default]
        if given:
            names = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(f"{names} set the SGD head, but the head is L-BFGS logistic regression (the default "
                            "since 6 Dec 2026; C is chosen on val): add --head-solver sgd for the recorded protocol")
    return solver


@dataclass
class CheckConfig:
    """Every option of ``check-accuracies`` (YAML section ``check:``).

    ``operating_point``: how a two-class run's decision threshold is chosen on val
    (:func:`linear_probe.operating_point.parse_rule`); ``positive_class``: its positive class
    [default: the second class].
    """

    runs: list[str] = field(default_factory=list)
    runs_root: str = "runs"
    test_folder: str | None = None
    average: str = "macro"
    select: str = SELECTION_RULES[0]
    operating_point: str = ARGMAX
    positive_class: str | None = None
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    output: str | None = None
    encode_batch_size: int = 256
    num_workers: int = field(default_factory=_default_workers)
    device: str = "auto"
    allow_split_class_names: bool = False

    def validate(self) -> None:
        """Raises: UserError naming the first offending option."""
        self.runs = [str(r) for r in (self.runs or [])]
        if self.average not in AVERAGES:
            raise UserError(f"--average must be one of {', '.join(AVERAGES)}, got {self.average!r}")
        if self.select not in SELECTION_RULES:
            raise UserError(f"--select must be one of {', '.join(SELECTION_RULES)}, got {self.select!r}")
        parse_rule(self.operating_point)
        if self.bootstrap < 0:
            raise UserError(f"--bootstrap must be >= 0 (0: no intervals), got {self.bootstrap}")
        if self.encode_batch_size < 1:
            raise UserError(f"--encode-batch-size must be at least 1, got {self.encode_batch_size}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        validate_device(self.device)


def validate_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")

