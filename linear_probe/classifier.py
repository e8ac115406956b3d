"""A run's classifier, rebuilt from the run directory: the encoder plus the head that classifies.

For a SupCon run that is a checkpoint's frozen encoder and one of its probe-all linear heads; for a
baseline run, ``best.pth`` (or ``last.pth``). ``supcon-export``, ``predict`` and ``supcon-report``
all start here, so they agree on which network a run means:

* ``selected`` (the default): the (checkpoint, head) that ``check-accuracies`` evaluates, chosen by
  :func:`linear_probe.select.select_best` from validation results only; a baseline's best-by-val epoch.
* ``last``: the run's newest checkpoint (its best head by the same rule); a baseline's ``last.pth``.
* ``EPOCH``: the checkpoint of that backbone epoch; a baseline's ``best.pth`` or ``last.pth`` when
  it holds that epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linear_probe.checkpoints import check_checkpoint, find_checkpoints
from linear_probe.features import FrozenCheckpoint
from linear_probe.heads import HeadRecord, load_head_records, load_head_state
from linear_probe.probe import make_head
from linear_probe.runs import RunInfo, RunKind, resolve_folder
from linear_probe.select import select_best
from supcon.baseline.losses import logits_to_probabilities
from supcon.errors import UserError
from supcon.rundir import LAST, load_supcon_checkpoint

logger = logging.getLogger(__name__)

SELECTED = "selected"


class Classifier(nn.Module):
    """``encoder`` (images -> pooled features) followed by ``head`` (features -> logits)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images)
        return out["features"] if isinstance(out, dict) else out  # the custom baseline nets return a dict

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class RunClassifier:
    """A run's network for one checkpoint choice, with everything needed to feed and describe it."""

    run: RunInfo
    network: Classifier
    class_names: list[str]
    mean: list[float]
    std: list[float]
    size: int
    model_name: str
    family: str  # "timm", "torchvision" or "custom"
    small_input: bool
    #: ``backbone_epoch``, ``head_epoch``, ``checkpoint``, ``val_accuracy``... (goes into config.json).
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> RunKind:
        return self.run.kind

    @property
    def single_logit(self) -> bool:
        """A baseline trained with ``--loss bce``: one logit, the probability of the second class."""
        head = self.network.head
        last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        return last.out_features == 1

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, C]`` from the network's logits (softmax, or sigmoid of one logit)."""
        return logits_to_probabilities(logits)

    def describe(self) -> str:
        """E.g. ``ckpt_epoch_50.pth, head epoch 24`` or ``best.pth (epoch 14)``."""
        src = self.source
        if self.kind is RunKind.BASELINE:
            return f"{src['checkpoint']} (epoch {src['backbone_epoch']})"
        return f"{src['checkpoint']} (backbone epoch {src['backbone_epoch']}), head epoch {src['head_epoch']}"


def parse_checkpoint_choice(value: str | None) -> str | int:
    """``selected``, ``last`` or a backbone epoch (int).

    Raises:
        UserError: anything else.
    """
    value = (value or SELECTED).strip().lower()
    if value in (SELECTED, "last"):
        return value
    if value.isdigit():
        return int(value)
    raise UserError(f"--checkpoint must be 'selected', 'last' or a backbone epoch number, got {value!r}")


def load_run_classifier(run_dir: str | Path, checkpoint: str | int = SELECTED) -> RunClassifier:
    """Rebuild the classifier of ``run_dir`` for a checkpoint choice (see the module docstring).

    The network is on the CPU, in ``eval()``, with frozen parameters.

    Raises:
        UserError: not a run directory, a SupCon run never probed (names the probe-all command), a
            checkpoint that does not exist or has no probe head, an unsafe or mismatched file.
    """
    run = RunInfo.load(run_dir)
    choice = parse_checkpoint_choice(str(checkpoint))
    result = _load_baseline(run, choice) if run.kind is RunKind.BASELINE else _load_supcon(run, choice)
    result.network.requires_grad_(False)
    result.network.eval()
    return result


def _probe_command(run: RunInfo, epoch: int | None = None) -> str:
    bounds = f" --from {epoch} --to {epoch}" if epoch is not None else ""
    return f"probe-all --run {run.run_dir}{bounds}"


def choose_head(run: RunInfo, choice: str | int) -> HeadRecord:
    """The probe record (checkpoint + head) for ``choice``, from validation results only.

    Raises:
        UserError: never probed; no such checkpoint; a checkpoint without a probe head.
    """
    run.require_supcon("this command")
    records = load_head_records(run.probe_dir, run.run_dir)
    if not records:
        raise UserError(f"run {run.run_dir} was never probed (no linear head to classify with); run first: "
                        f"{_probe_command(run)}")
    if choice == SELECTED:
        return select_best(records)
    if choice == "last":
        newest = find_checkpoints(run.run_dir)[-1]
        matching = [r for r in records if r.checkpoint == newest.name]
        if not matching:
            raise UserError(f"the run's newest checkpoint {newest.name} (backbone epoch {newest.backbone_epoch}) "
                            f"was never probed; run: {_probe_command(run, newest.backbone_epoch)}")
        return select_best(matching)
    matching = [r for r in records if r.backbone_epoch == choice and r.steps_into_epoch == 0]
    if not matching:
        available = {ref.backbone_epoch for ref in find_checkpoints(run.run_dir)}
        probed = sorted({r.backbone_epoch for r in records})
        if choice in available:
            raise UserError(f"the checkpoint of backbone epoch {choice} was never probed; run: "
                            f"{_probe_command(run, choice)}")
        raise UserError(f"run {run.run_dir} has no checkpoint of backbone epoch {choice}; probed epochs: "
                        f"{', '.join(map(str, probed))}")
    return select_best(matching)


def _load_supcon(run: RunInfo, choice: str | int) -> RunClassifier:
    record = choose_head(run, choice)
    path = run.run_dir / record.checkpoint
    state = load_supcon_checkpoint(path)
    class_names = run.class_names or record.class_names
    check_checkpoint(state, path, run.model_config, class_names)
    encoder = FrozenCheckpoint(path, state=state).encoder()
    head = make_head(record.feature_dim, len(class_names), seed=0)
    head.load_state_dict(load_head_state(record.path)["state_dict"])
    model_config = state["model_config"]
    source = {
        "kind": run.kind.value, "run": str(run.run_dir.resolve()), "checkpoint": record.checkpoint,
        "checkpoint_sha256": record.checkpoint_stamp.sha256, "backbone_epoch": record.backbone_epoch,
        "steps_into_epoch": record.steps_into_epoch, "head_epoch": record.best_head_epoch,
        "head_file": record.path.name if record.path else None, "val_accuracy": record.best_val_accuracy,
        "val_loss": record.best_val_loss, "probe_settings": record.settings,
    }
    return RunClassifier(run, Classifier(encoder, head), class_names, [float(v) for v in state["mean"]],
                         [float(v) for v in state["std"]], run.size, model_config["model"], "timm",
                         bool(model_config.get("small_input", False)), source)


def _load_baseline(run: RunInfo, choice: str | int) -> RunClassifier:
    from supcon.baseline.models import build_classifier
    from supcon.rundir import BEST, load_baseline_checkpoint

    candidates = [run.run_dir / name for name in (BEST, LAST) if (run.run_dir / name).is_file()]
    if not candidates:
        raise UserError(f"{run.run_dir} has no {BEST} yet (no epoch finished); continue it with "
                        f"baseline-train --resume --run-dir {run.run_dir}")
    if choice == SELECTED:
        path = run.run_dir / BEST
        if not path.is_file():
            raise UserError(f"{run.run_dir} has no {BEST}; continue it with baseline-train --resume --run-dir "
                            f"{run.run_dir}")
        state = load_baseline_checkpoint(path)
        epoch = int(state["best_epoch"])
    elif choice == "last":
        path = candidates[-1]
        state = load_baseline_checkpoint(path)
        epoch = int(state["epoch"])
    else:
        states = {p: load_baseline_checkpoint(p) for p in candidates}
        epochs = {p: int(s["best_epoch"] if p.name == BEST else s["epoch"]) for p, s in states.items()}
        found = [p for p in candidates if epochs[p] == choice]
        if not found:
            kept = ", ".join(f"{p.name}: epoch {e}" for p, e in epochs.items())
            raise UserError(f"baseline run {run.run_dir} keeps no weights of epoch {choice} (only {kept}); "
                            "use --checkpoint selected, last or one of those epochs")
        path, state, epoch = found[0], states[found[0]], choice
    model = build_classifier(state["model_config"])
    model.backbone.load_state_dict(state["encoder"])
    model.head.load_state_dict(state["head"])
    model_config = state["model_config"]
    source = {
        "kind": run.kind.value, "run": str(run.run_dir.resolve()), "checkpoint": path.name, "backbone_epoch": epoch,
        "head_epoch": None, "val_accuracy": state.get("best_val_accuracy") if path.name == BEST else None,
        "description": state.get("description"), "head": model_config.get("head"),
    }
    return RunClassifier(run, Classifier(model.backbone, model.head), list(state["class_names"]),
                         [float(v) for v in state["mean"]], [float(v) for v in state["std"]], int(state["size"]),
                         model_config["model"], model_config.get("family", "timm"),
                         bool(model_config.get("small_input", False)), source)


def resolve_eval_folder(classifier: RunClassifier, which: str, explicit: str | None = None) -> str:
    """The run's ``val`` or ``test`` folder, in the one order of :func:`supcon.rundir.find_split_folder`.

    Raises:
        UserError: none exists.
    """
    recorded = classifier.run.run_info.get(f"{which}_folder")
    return resolve_folder(explicit, classifier.run.train_folder, which, f"--{which}-folder", recorded)
