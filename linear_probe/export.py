"""``supcon-export``: a run's encoder and classifier as plain timm weights (safetensors), optionally ONNX.

Layout of the output folder::

    DIR/config.json                   timm's hub config (architecture, num_classes 0, mean/std, input size)
                                      + "supcon_export": stem, class names, the run and checkpoint it came from,
                                      and for two classes the positive class and the decision threshold
                                      (the run's operating_point.json when it was chosen for this model)
    DIR/model.safetensors             the encoder: timm model with num_classes=0 (pooled features)
    DIR/classifier/config.json        the same with num_classes = the run's classes and their names
    DIR/classifier/model.safetensors  encoder + the selected linear head as timm's own classifier layer
    DIR/model.onnx, DIR/classifier/model.onnx   with onnx=True: dynamic batch axis, checked with onnxruntime

Both folders load in plain timm, no code of ours::

    timm.create_model(name, num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))
    timm.create_model(name, num_classes=C, pretrained=True,
                      pretrained_cfg_overlay=dict(file="DIR/classifier/model.safetensors", num_classes=C))

(``timm.create_model("local-dir:DIR", pretrained=True)`` works too.) A run trained with
``--small-input`` has a 3x3 stride-1 first convolution and no max-pool, which no timm argument
builds; :data:`SMALL_INPUT_RECIPE` is the documented equivalent (also written into config.json).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from linear_probe.classifier import RunClassifier, load_run_classifier
from linear_probe.operating_point import ARGMAX_THRESHOLD, OperatingPoint, recorded_for
from supcon.checkpoint import atomic_write_text
from supcon.errors import UserError
from supcon.models import adapt_small_input

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"
CLASSIFIER_DIR = "classifier"
ONNX_TOLERANCE = 1e-4

SMALL_INPUT_RECIPE = """\
import safetensors.torch, timm, torch
model = timm.create_model(NAME, num_classes=NUM_CLASSES)
conv = model.get_submodule(model.pretrained_cfg["first_conv"])  # e.g. "conv1"
model.set_submodule(model.pretrained_cfg["first_conv"],
                    torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None))
model.maxpool = torch.nn.Identity()
model.load_state_dict(safetensors.torch.load_file(WEIGHTS))
model.eval()
"""


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    config: dict[str, Any]
    onnx_max_abs_diff: dict[str, float] = field(default_factory=dict)


def timm_classifier_model(classifier: RunClassifier) -> nn.Module:
    """The run's network as one timm model with ``num_classes = C``: its classifier layer holds our head.

    Raises:
        UserError: the backbone is not a timm model, or its head is not one linear layer.
    """
    if classifier.family != "timm":
        raise UserError(f"{classifier.model_name!r} is a {classifier.family} network; supcon-export writes timm "
                        "models only")
    head = classifier.network.head
    if not isinstance(head, nn.Linear):
        raise UserError(f"the run's head is {classifier.source.get('head') or type(head).__name__!r}, not one linear "
                        "layer, so it is not a timm classifier; supcon-export handles linear heads")
    model = timm.create_model(classifier.model_name, num_classes=head.out_features)
    if classifier.small_input:
        adapt_small_input(model, classifier.model_name)
    own_head = model.get_classifier()
    if not isinstance(own_head, nn.Linear) or own_head.in_features != head.in_features:
        raise UserError(f"timm's {classifier.model_name} has no linear classifier on {head.in_features} features; "
                        "cannot write the head into it")
    result = model.load_state_dict(classifier.network.encoder.state_dict(), strict=False)
    head_name = next(name for name, module in model.named_modules() if module is own_head)
    head_keys = {f"{head_name}.{key}" for key in own_head.state_dict()}
    assert not result.unexpected_keys and set(result.missing_keys) == head_keys, result
    own_head.load_state_dict(head.state_dict())
    return model.eval()


def _hub_config(classifier: RunClassifier, num_classes: int, num_features: int,
                point: OperatingPoint | None = None) -> dict[str, Any]:
    """timm's hub ``config.json`` (so ``local-dir:`` loading works) plus our provenance and, for two classes,
    the decision (``point``: the run's recorded operating point for this model, else 0.5 on the second class)."""
    pretrained_cfg = dict(getattr(classifier.network.encoder, "pretrained_cfg", None) or {})
    for key in ("hf_hub_id", "url", "file", "source", "tag", "license", "paper_ids", "origin_url", "description",
                "notes", "state_dict", "hf_hub_filename"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(
        input_size=[3, classifier.size, classifier.size], fixed_input_size=False, mean=classifier.mean,
        std=classifier.std, crop_pct=1.0, crop_mode="center", interpolation="bilinear",
        num_classes=num_classes,
    )
    config: dict[str, Any] = {
        "architecture": classifier.model_name, "num_classes": num_classes, "num_features": num_features,
        "pretrained_cfg": pretrained_cfg,
    }
    if num_classes == len(classifier.class_names):
        config["label_names"] = list(classifier.class_names)
    config["supcon_export"] = {
        "model": classifier.model_name,
        "num_classes": num_classes,
        "class_names": list(classifier.class_names),
        "positive_class": _positive_class(classifier, point),
        "decision_threshold": (None if len(classifier.class_names) != 2
                               else ARGMAX_THRESHOLD if point is None else point.threshold),
        "operating_point": None if point is None else point.to_json(),
        "output": ("features" if not num_classes else "one logit: sigmoid = probability of the positive class"
                   if classifier.single_logit else "logits: softmax = class probabilities"),
        "input_size": classifier.size,
        "mean": classifier.mean,
        "std": classifier.std,
        "eval_transform": f"Resize({classifier.size}) (short side, bilinear), CenterCrop({classifier.size}), "
                          "ToTensor, Normalize(mean, std)",
        "small_input": classifier.small_input,
        "stem": ("3x3 stride-1 first convolution, no max-pool (--small-input): build it with small_input_recipe"
                 if classifier.small_input else "timm's own"),
        "small_input_recipe": SMALL_INPUT_RECIPE if classifier.small_input else None,
        "source": classifier.source,
    }
    return config


def _positive_class(classifier: RunClassifier, point: OperatingPoint | None) -> str | None:
    if len(classifier.class_names) != 2:
        return None
    return classifier.class_names[1] if point is None else point.positive_class


def _write_folder(folder: Path, model: nn.Module, config: dict[str, Any]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    atomic_write_text(json.dumps(config, indent=2) + "\n", folder / CONFIG)
    return {"weights": folder / WEIGHTS, "config": folder / CONFIG}


def export_onnx(model: nn.Module, path: Path, size: int) -> float:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the max abs difference to PyTorch (CPU).

    Raises:
        UserError: the optional packages (onnx, onnxruntime, onnxscript) are missing, or the ONNX
            model's outputs differ from PyTorch's by more than :data:`ONNX_TOLERANCE`.
    """
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--onnx needs the optional packages onnx, onnxscript and onnxruntime: "
                        "pip install 'supcon-pipeline[onnx]'") from None
    model = model.eval()
    example = torch.randn(2, 3, size, size)
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines are the exporter's own progress
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress steps too
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, external_data=False,
                          verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))  # another batch size
    with torch.no_grad():
        expected = model(check).numpy()
    got = session.run(None, {"images": check.numpy()})[0]
    diff = float(abs(got - expected).max())
    if diff > ONNX_TOLERANCE:
        raise UserError(f"the ONNX export {path} differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE}); "
                        "this model does not export cleanly")
    return diff


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "selected",
               onnx: bool = False, force: bool = False) -> ExportResult:
    """Export a run's encoder and classifier (see the module docstring).

    Args:
        checkpoint: ``selected`` (check-accuracies' choice), ``last`` or a backbone epoch.
        onnx: also write ONNX files, checked against onnxruntime.
        force: replace an existing non-empty ``out_dir``.

    Raises:
        UserError: bad run or checkpoint (see :func:`load_run_classifier`), a non-timm network or a
            non-linear head, an existing non-empty ``out_dir`` without ``force``, ONNX problems.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"output folder {out_dir} exists and is not empty; choose another --out or pass --force")
    classifier = load_run_classifier(run_dir, checkpoint)
    point = recorded_for(run_dir, classifier.source) if len(classifier.class_names) == 2 else None
    full = timm_classifier_model(classifier)
    encoder = classifier.network.encoder
    num_features = classifier.network.head.in_features
    # Everything is written to a temporary sibling first: a failure leaves any old export as it was.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = {}
        encoder_config = _hub_config(classifier, 0, num_features, point)
        files.update({f"encoder_{k}": staging / v.name for k, v in
                      _write_folder(staging, encoder, encoder_config).items()})
        classifier_config = _hub_config(classifier, len(classifier.class_names), num_features, point)
        files.update({f"classifier_{k}": staging / CLASSIFIER_DIR / v.name for k, v in
                      _write_folder(staging / CLASSIFIER_DIR, full, classifier_config).items()})
        diffs = {}
        if onnx:
            diffs["encoder"] = export_onnx(encoder, staging / ONNX, classifier.size)
            diffs["classifier"] = export_onnx(full, staging / CLASSIFIER_DIR / ONNX, classifier.size)
            files["encoder_onnx"] = staging / ONNX
            files["classifier_onnx"] = staging / CLASSIFIER_DIR / ONNX
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {k: out_dir / v.relative_to(staging) for k, v in files.items()}
    logger.info("exported %s: %s", run_dir, classifier.describe())
    return ExportResult(out_dir, files, encoder_config, diffs)


def timm_loading_call(config: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """The plain-timm call that rebuilds an export (what the CLI prints and the README shows)."""
    export = config["supcon_export"]
    name, classes = export["model"], len(export["class_names"])
    out_dir = Path(out_dir)
    if export["small_input"]:
        return ("# --small-input stem: no timm argument builds it, so:\n"
                + SMALL_INPUT_RECIPE.replace("NAME", repr(name)).replace("NUM_CLASSES", "0")
                .replace("WEIGHTS", repr(str(out_dir / WEIGHTS)))
                + f"# the classifier: NUM_CLASSES={classes}, WEIGHTS={str(out_dir / CLASSIFIER_DIR / WEIGHTS)!r}")
    return (f"timm.create_model({name!r}, num_classes=0, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out_dir / WEIGHTS)!r}))\n"
            f"timm.create_model({name!r}, num_classes={classes}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out_dir / CLASSIFIER_DIR / WEIGHTS)!r}, num_classes={classes}))")

