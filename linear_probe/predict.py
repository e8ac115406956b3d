"""``predict``: classify new images with a run's selected classifier; one CSV row per image.

Columns: ``path``, ``predicted_class``, ``probability_<class>`` for every class, and for two classes
also ``positive_class``, ``positive_probability`` (of that class) and the ``threshold`` used: the
prediction is the positive class when its probability is at least the threshold. The threshold and
the positive class are the run's recorded operating point (``RUN/operating_point.json``, written by
``check-accuracies`` for the model it chose), else 0.5 on the second class; ``--threshold`` overrides
the threshold (:func:`linear_probe.operating_point.resolve_decision`). Images go through the run's eval
transform (resize the short side, centre crop, the run's mean/std), in batches, on the GPU when
there is one. Unreadable files are listed and skipped, never a traceback.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from linear_probe.classifier import RunClassifier, load_run_classifier
from linear_probe.operating_point import Decision, resolve_decision
from supcon.checkpoint import atomic_write_text
from supcon.data import IMG_EXTENSIONS, eval_transform, load_rgb, make_loader
from supcon.errors import UserError
from supcon.frozen import resolve_device
from supcon.metrics import decide

logger = logging.getLogger(__name__)

#: ``predict``'s exit code when some files were unreadable and skipped (the rest were predicted).
EXIT_SKIPPED = 3
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Predictions:
    """What :func:`predict_images` found: one row per readable image, and the skipped files."""

    paths: list[str]
    probabilities: np.ndarray  # [N, C]
    predicted: np.ndarray  # [N] class indices
    class_names: list[str]
    decision: Decision | None  # two classes only
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def rows(self) -> list[dict[str, object]]:
        rows = []
        for path, probabilities, predicted in zip(self.paths, self.probabilities, self.predicted, strict=True):
            row: dict[str, object] = {"path": path, "predicted_class": self.class_names[predicted]}
            row.update({f"probability_{name}": f"{p:.6f}" for name, p in zip(self.class_names, probabilities,
                                                                              strict=True)})
            if self.decision is not None:
                positive = self.decision.positive
                row.update(positive_class=self.class_names[positive],
                           positive_probability=f"{probabilities[positive]:.6f}", threshold=self.decision.threshold)
            rows.append(row)
        return rows

    def to_csv(self) -> str:
        fields = ["path", "predicted_class"] + [f"probability_{name}" for name in self.class_names]
        if self.decision is not None:
            fields += ["positive_class", "positive_probability", "threshold"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows())
        return buffer.getvalue()


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files among ``inputs``: files as given, folders searched recursively (sorted; hidden skipped).

    Raises:
        UserError: an input that does not exist, or no image at all.
    """
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(str(path))
        elif path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            raise UserError(f"no such file or folder: {path}")
    if not found:
        raise UserError(f"no image files (extensions {', '.join(IMG_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(found))


class _TolerantDataset(Dataset):
    """``(image tensor, index, error)``; an unreadable file gives a zero image and its error message."""

    def __init__(self, paths: Sequence[str], transform, size: int):
        self.paths = list(paths)
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index])), index, ""
        except _DECODE_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return torch.zeros(3, self.size, self.size), index, reason


@torch.no_grad()
def classify_paths(classifier: RunClassifier, paths: Sequence[str], device: torch.device, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False
                   ) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    """Class probabilities of the readable ``paths``: ``(kept indices, probabilities [K, C], skipped)``."""
    from tqdm.auto import tqdm

    network = classifier.network.to(device).eval()
    dataset = _TolerantDataset(paths, eval_transform(classifier.size, classifier.mean, classifier.std),
                               classifier.size)
    loader = make_loader(dataset, num_workers, device.type == "cuda", persistent=False, batch_size=batch_size,
                         shuffle=False)
    kept: list[int] = []
    probabilities: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    for images, indices, errors in tqdm(loader, desc="predicting", unit="batch", disable=not progress):
        good = torch.tensor([not e for e in errors], dtype=torch.bool)
        skipped += [(paths[int(i)], e) for i, e in zip(indices, errors, strict=True) if e]
        if good.any():
            logits = network(images[good].to(device, non_blocking=True))
            probabilities.append(classifier.probabilities(logits).cpu())
            kept += [int(i) for i in indices[good]]
    stacked = torch.cat(probabilities).numpy() if probabilities else np.zeros((0, len(classifier.class_names)))
    return kept, stacked, skipped


def predict_images(run_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], checkpoint: str = "selected",
                   threshold: float | None = None, batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                   progress: bool = False) -> Predictions:
    """Classify image files and folders with a run's classifier (see the module docstring).

    Args:
        threshold: two classes: predict the positive class at this probability or above [default: the
            run's recorded operating point, else 0.5]; the threshold used is logged and written per row.

    Raises:
        UserError: bad run or checkpoint, a missing input, no images at all, a threshold outside
            [0, 1], a malformed operating_point.json, or no readable image.
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be within [0, 1], got {threshold}")
    classifier = load_run_classifier(run_dir, checkpoint)
    decision = None
    if len(classifier.class_names) == 2:
        decision = resolve_decision(run_dir, classifier.class_names, classifier.source, threshold)
        logger.info("decision: %s", decision.source)
    paths = collect_images(inputs)
    kept, probabilities, skipped = classify_paths(classifier, paths, resolve_device(device), batch_size,
                                                  num_workers, progress)
    for path, reason in skipped:
        logger.debug("skipped unreadable image %s: %s", path, reason)
    if not kept:
        raise UserError(f"none of the {len(paths)} image files could be read (e.g. {skipped[0][0]}: "
                        f"{skipped[0][1]})")
    predicted = (probabilities.argmax(axis=1) if decision is None
                 else decide(probabilities, decision.positive, decision.threshold))
    return Predictions([paths[i] for i in kept], probabilities, predicted, classifier.class_names, decision, skipped)


def write_predictions(predictions: Predictions, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(predictions.to_csv(), out)
    return out

