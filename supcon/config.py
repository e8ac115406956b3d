"""Typed configuration for ``supcon-train``, YAML loading and the helpers shared by every command.

One dataclass holds every option with its default. ``--config file.yaml`` supplies values, the
command line wins. :func:`resolve_train_config` turns the user's config into a new, resolved one
(every automatic option decided) before a run starts; that is what ``config.yaml`` records.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from supcon.errors import UserError
from supcon.launch import DEFAULT_DIST_TIMEOUT

#: ``--sampler`` choices (:mod:`supcon.sampling`): batches at the classes' frequencies, or an equal share per class.
SAMPLERS = ("random", "balanced")
#: Options that may differ between a run and its resumption (they do not change the result).
RUNTIME_KEYS = frozenset(
    {"num_workers", "resume", "run_dir", "config", "skip_bad_images", "allow_split_class_names", "stop_on_collapse",
     "collapse_patience", "keep_last", "allow_data_change", "compile", "grad_checkpointing", "log_every", "knn_every",
     "dataset", "probe_every", "probe_max_images", "dist_timeout"}
)
#: Runtime options that decide where a ``--until plateau`` run stops: they may not change on its resumption.
PLATEAU_KEYS = frozenset({"probe_every", "probe_max_images"})
#: Options of the ``--until plateau`` rule alone: a fixed-length run ignores them (and may resume with other values).
PLATEAU_RULE_KEYS = frozenset({"plateau_patience", "plateau_tolerance"})


def parse_triplet(text: str | list | tuple | None, name: str) -> list[float] | None:
    """Parse an ``"r,g,b"`` string (spaces allowed) or a 3-element list into three positive floats.

    Raises:
        UserError: when the value is not three numbers, or any is not finite and positive
            (a zero std would divide by zero).
    """
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    else:
        parts = list(text)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"--{name} must be three comma-separated numbers like '0.485,0.456,0.406', got {text!r}")
    if len(values) != 3:
        raise UserError(f"--{name} must have exactly 3 values (r,g,b), got {len(values)} in {text!r}")
    if name == "std" and any(not math.isfinite(v) or v <= 0 for v in values):
        raise UserError(f"--std values must be positive, got {text!r}")
    if any(not math.isfinite(v) for v in values):
        raise UserError(f"--{name} values must be finite numbers, got {text!r}")
    return values


def parse_int_list(text: str | list | tuple | int | None, name: str) -> list[int]:
    """Parse ``"700,800,900"`` (or a list) into a list of ints."""
    if text is None or text == "":
        return []
    if isinstance(text, int):
        return [text]
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        return [int(str(p).strip()) for p in parts if str(p).strip()]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated integers like '700,800,900', got {text!r}")


def check_bounds(config, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = ()) -> None:
    """Check numeric options of any command's config against their bounds.

    Raises:
        UserError: naming the first option out of bounds (``--name-with-dashes``) and its value.
    """
    for names, fails, bound in ((at_least_one, lambda v: v < 1, "be at least 1"),
                                (non_negative, lambda v: v < 0, "be >= 0"),
                                (positive, lambda v: not v > 0, "be positive")):
        for name in names:
            value = getattr(config, name)
            if fails(value):
                raise UserError(f"--{name.replace('_', '-')} must {bound}, got {value}")


def require_data_folder(data_folder: str | None) -> None:
    """Raises: UserError when no training folder was given."""
    if not data_folder:
        raise UserError("--data-folder is required (an ImageFolder: one subfolder per class)")


@dataclass
class TrainConfig:
    """Every option of ``supcon-train``; the field names are also the YAML keys."""

    data_folder: str | None = None
    dataset: str = "path"
    val_folder: str | None = None
    model: str = "resnet50"
    pretrained: bool = False
    small_input: bool = False
    zero_init_last: bool = False
    feat_dim: int = 128
    head_bn: bool = True
    method: str = "supcon"
    temp: float = 0.07
    base_temp: float = 0.07
    size: int = 224
    crop_min: float = 0.2
    flip: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    batch_size: int = 32
    sampler: str = "random"
    chunk_size: int | None = None
    memory_size: int = 0
    memory_warmup: int = 0
    epochs: int = 1000
    learning_rate: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    cosine: bool = True
    schedule: str | None = None
    cooldown_fraction: float = 0.2
    until: str = "epochs"
    plateau_patience: float = 0.5
    plateau_tolerance: float = 0.03
    probe_every: int | None = None
    probe_max_images: int = 10000
    lr_decay_epochs: list[int] = field(default_factory=lambda: [700, 800, 900])
    lr_decay_rate: float = 0.1
    warm: bool | None = None
    warm_epochs: int = 10
    warmup_from: float = 0.01
    save_freq: int = 50
    num_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    seed: int = 0
    precision: str | None = None
    channels_last: bool | None = None
    gpu_augment: bool | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    sync_bn: bool = False
    run_dir: str | None = None
    resume: bool = False
    skip_bad_images: bool = False
    allow_split_class_names: bool = False
    allow_data_change: bool = False
    keep_last: int = 0
    log_every: int = 10
    knn_every: int = 10
    knn_k: int = 20
    knn_temperature: float = 0.07
    collapse_patience: int = 3
    stop_on_collapse: bool = False
    dist_timeout: float = DEFAULT_DIST_TIMEOUT

    def validate(self) -> None:
        """Check values that would otherwise fail deep inside training.

        Raises:
            UserError: naming the first offending option.
        """
        require_data_folder(self.data_folder)
        if self.dataset != "path":
            raise UserError(
                f"--dataset {self.dataset!r} is not supported: only 'path' (an image folder given by --data-folder)"
            )
        if self.method not in ("supcon", "simclr"):
            raise UserError(f"--method must be 'supcon' or 'simclr', got {self.method!r}")
        if self.batch_size < 2:
            raise UserError(f"--batch-size must be at least 2 (contrastive loss needs pairs), got {self.batch_size}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UserError(f"--chunk-size must be at least 1 (images per forward pass), got {self.chunk_size}")
        if self.chunk_size is not None and self.chunk_size > self.batch_size:
            raise UserError(f"--chunk-size {self.chunk_size} is larger than --batch-size {self.batch_size}; "
                            "it is the part of the batch that goes through the network at once")
        if self.memory_size < 0 or self.memory_warmup < 0:
            raise UserError(f"--memory-size and --memory-warmup must be >= 0, got {self.memory_size} and "
                            f"{self.memory_warmup}")
        if self.knn_every < 0:
            raise UserError(f"--knn-every must be >= 0 (0 turns the kNN monitor off), got {self.knn_every}")
        self._validate_schedule()
        check_bounds(self, at_least_one=("epochs", "save_freq", "size", "feat_dim", "log_every", "knn_k",
                                         "collapse_patience", "warm_epochs"),
                     positive=("temp", "base_temp", "knn_temperature"))
        if not (math.isfinite(self.warmup_from) and self.warmup_from >= 0):
            raise UserError(f"--warmup-from must be >= 0, got {self.warmup_from}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 < self.lr_decay_rate <= 1:
            raise UserError(f"--lr-decay-rate must be in (0, 1], got {self.lr_decay_rate}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 < self.crop_min <= 1:
            raise UserError(f"--crop-min must be in (0, 1], got {self.crop_min}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.keep_last < 0:
            raise UserError(f"--keep-last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout >= 1):
            raise UserError(f"--dist-timeout must be at least 1 (seconds), got {self.dist_timeout}")
        self.mean = parse_triplet(self.mean, "mean")
        self.std = parse_triplet(self.std, "std")
        self.lr_decay_epochs = parse_int_list(self.lr_decay_epochs, "lr-decay-epochs")


    def _validate_schedule(self) -> None:
        from supcon.schedule import SCHEDULES

        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "cosine" and not self.cosine:
            raise UserError("--schedule cosine contradicts --no-cosine (which means --schedule step); give one")
        if self.until not in UNTIL_CHOICES:
            raise UserError(f"--until must be one of {', '.join(UNTIL_CHOICES)}, got {self.until!r}")
        if self.until == "plateau" and self.schedule not in (None, "wsd"):
            raise UserError(f"--until plateau needs a schedule that can end at any time (--schedule wsd), got "
                            f"--schedule {self.schedule}: the {self.schedule} schedule is set by --epochs")
        if self.until == "plateau" and self.probe_every == 0:
            raise UserError("--until plateau decides on the live probe: --probe-every must be positive, got 0")
        if not 0 < self.cooldown_fraction < 1:
            raise UserError(f"--cooldown-fraction must be in (0, 1), got {self.cooldown_fraction}")
        if not 0 < self.plateau_patience < 1:
            raise UserError(f"--plateau-patience must be in (0, 1), got {self.plateau_patience}")
        if not 0 < self.plateau_tolerance < 1:
            raise UserError(f"--plateau-tolerance must be in (0, 1) (a share of the val images), got "
                            f"{self.plateau_tolerance}")
        if self.probe_every is not None and self.probe_every < 0:
            raise UserError(f"--probe-every must be >= 0 (0 turns the live probe off), got {self.probe_every}")
        if self.probe_max_images < 10:
            raise UserError(f"--probe-max-images must be at least 10, got {self.probe_max_images}")

    @property
    def schedule_kind(self) -> str:
        """``cosine``, ``step`` or ``wsd``: ``--schedule``, else WSD for ``--until plateau``, else by ``--cosine``."""
        if self.schedule is not None:
            return self.schedule
        if self.until == "plateau":
            return "wsd"
        return "cosine" if self.cosine else "step"


#: ``--until`` choices: the fixed ``--epochs``, or the end of the live probe's plateau (``--epochs`` the ceiling).
UNTIL_CHOICES = ("epochs", "plateau")


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def yaml_values_for(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """Keep the keys of ``data`` that are fields of ``cls``; unknown keys are an error.

    Keys may be spelled with dashes or underscores. A config may hold a ``<section>:`` mapping per
    command (e.g. ``train:``, ``probe:``); the caller picks the section first.
    """
    known = config_fields(cls)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"unknown option {key!r} in {source}; known: {', '.join(sorted(known))}")
        values[name] = _typed_yaml_value(key, value, known[name].type, source)
    return values


_SCALAR_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _typed_yaml_value(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check a YAML value against a field annotated ``int``, ``float``, ``bool`` or ``str`` (or ``... | None``).

    The command line gets this from click; without it ``batch_size: abc`` would fail deep inside
    training. Numbers written as strings are accepted (PyYAML reads ``1e-4`` as a string). Other
    annotations (lists, ...) are left to the config's own ``validate``.

    Raises:
        UserError: naming the option, the file and the expected kind.
    """
    options = [part.strip() for part in str(annotation).split("|")]
    kinds = [part for part in options if part != "None"]
    if len(kinds) != 1 or kinds[0] not in _SCALAR_KINDS:
        return value
    kind = kinds[0]
    if value is None and "None" in options:
        return None
    typed = None
    if kind == "bool":
        typed = value if isinstance(value, bool) else None
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        if kind == "str":
            typed = str(value)
        elif kind == "float":
            try:
                typed = float(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            try:
                typed = int(value.strip())
            except ValueError:
                pass
        elif float(value).is_integer():  # not 2.5, which int() would silently truncate
            typed = int(value)
    if typed is None:
        raise UserError(f"option {key!r} in {source} must be {_SCALAR_KINDS[kind]}, got {value!r}")
    return typed


def resolve(cls: type, yaml_values: dict[str, Any], cli_values: dict[str, Any]):
    """Build ``cls`` from defaults, then YAML values, then command-line values (highest priority)."""
    merged = {**yaml_values, **cli_values}
    try:
        return cls(**merged)
    except TypeError as exc:  # pragma: no cover - guarded by yaml_values_for
        raise UserError(str(exc))


def to_yaml_dict(config) -> dict[str, Any]:
    """A plain dict of the config, safe for ``yaml.safe_dump``."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore=RUNTIME_KEYS,
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Names of options whose values differ between two resolved configs, ignoring runtime-only ones.

    ``defaults``: the options' defaults; an option that ``old`` does not record (a run started before
    the option existed) trained as its default, so asking for the default is no difference.
    """
    keys = (set(old) | set(new)) - set(ignore)
    defaults = defaults or {}

    def differs(key: str) -> bool:
        if new.get(key) is None:  # left to "auto": takes the run's recorded, resolved value
            return False
        if key not in old and key in defaults:
            return new[key] != defaults[key]
        return old.get(key) != new[key]

    return sorted(k for k in keys if differs(k))


#: How the learning rate of a run was chosen (recorded in ``run_info.learning_rate_rule``).
LR_RULE_LINEAR = "0.5 x global_batch / 1024"
LR_RULE_GIVEN = "given"


def resolve_train_config(config: TrainConfig, *, precision: str, on_gpu: bool, world_size: int,
                         recorded: dict[str, Any] | None = None,
                         recorded_info: dict[str, Any] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """The config a run trains with: every automatic option decided, as a new object (``config`` is kept).

    Decides the device defaults (``precision``, ``channels_last``, ``gpu_augment``), absolute
    folders (the val folder: :func:`supcon.rundir.find_split_folder`), the learning rate (the linear
    scaling rule of the global batch, unless given) and ``warm`` (on above a global batch of 256).
    A resumed run keeps what it recorded for the options left automatic (``recorded``: its
    ``config.yaml`` options, ``recorded_info``: its ``run_info``), so nothing is re-inferred.
    ``mean``/``std``, when neither given nor recorded, stay None: they come from the images.

    Returns:
        ``(resolved config, facts)``; facts: ``learning_rate_rule``, ``global_batch`` and
        ``auto_warm`` (True when warm-up was switched on by the batch size now).
    """
    from supcon.rundir import find_split_folder
    from supcon.schedule import AUTO_WARM_ABOVE_BATCH, linear_scaled_lr

    recorded, recorded_info = recorded or {}, recorded_info or {}

    def kept(name: str, default: Any) -> Any:
        """The option as given, else as the run recorded it, else ``default``."""
        value = getattr(config, name)
        if value is None:
            value = recorded.get(name)
        return default if value is None else value

    global_batch = config.batch_size * world_size
    data_folder = str(Path(config.data_folder).expanduser().resolve())
    if config.learning_rate is not None:
        rule = LR_RULE_GIVEN
    else:
        rule = recorded_info.get("learning_rate_rule", LR_RULE_LINEAR) if recorded.get("learning_rate") else \
            LR_RULE_LINEAR
    warm = kept("warm", global_batch > AUTO_WARM_ABOVE_BATCH)
    if recorded and not config.val_folder:  # the val folder the run started with (None: it had none)
        val_folder = recorded.get("val_folder")
    else:
        val_folder = find_split_folder("val", config.val_folder, data_folder)
    probe_every = kept("probe_every", config.save_freq if val_folder else 0)
    if config.until == "plateau" and not val_folder:
        raise UserError("--until plateau decides on the live probe's val accuracy: it needs a val folder "
                        "(--val-folder, or a sibling 'val' of the data folder)")
    resolved = dataclasses.replace(
        config, probe_every=probe_every, precision=precision,
        channels_last=on_gpu if config.channels_last is None else config.channels_last,
        gpu_augment=kept("gpu_augment", on_gpu), data_folder=data_folder, val_folder=val_folder,
        learning_rate=kept("learning_rate", linear_scaled_lr(global_batch)), warm=warm,
        mean=kept("mean", None), std=kept("std", None), lr_decay_epochs=list(config.lr_decay_epochs),
    )
    facts = {"learning_rate_rule": rule, "global_batch": global_batch,
             "auto_warm": config.warm is None and recorded.get("warm") is None and warm}
    return resolved, facts
