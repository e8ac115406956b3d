"""A two-class run's operating point: the decision threshold on the positive class's probability.

``check-accuracies --operating-point RULE`` chooses it on the selected model's val predictions (never
the test folder's), tests the model at it, and records it as ``RUN/operating_point.json``, which
``predict`` and ``supcon-export`` then use by default. The rules (:func:`parse_rule`):

* ``argmax``: the arg-max decision (recorded as threshold 0.5): what the table showed before.
* ``max-f1``: the threshold of the highest val F1 of the positive class.
* ``youden``: the highest val Youden's J = sensitivity + specificity - 1.
* ``recall>=X``: among the thresholds with val recall (sensitivity) >= X, the best val precision.
* ``precision>=X``: among those with val precision >= X, the best val recall.
* ``specificity>=X``: among those with val specificity >= X, the best val recall.

The candidates are the distinct val scores ``s``, each meaning "positive where the probability is >= s"
(so every candidate calls at least one val image positive). Ties on the rule's figure go to the higher
val recall, then the higher val specificity; that pins one candidate. The recorded threshold is the
midpoint between the lowest val score called positive and the highest one called negative (the lowest
score itself when none is called negative): any threshold in between decides val identically, and the
midpoint leaves the same margin on both sides for unseen images.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supcon.errors import UserError

logger = logging.getLogger(__name__)

OPERATING_POINT_FILE = "operating_point.json"
ARGMAX = "argmax"
#: The rules without a target, the default first.
PLAIN_RULES = (ARGMAX, "max-f1", "youden")
#: The rules with a target, ``NAME>=X`` with X in (0, 1].
TARGET_RULES = ("recall", "precision", "specificity")
RULE_FORMS = "argmax, max-f1, youden, recall>=X, precision>=X or specificity>=X (X in (0, 1])"
#: The threshold of the arg-max decision on two classes.
ARGMAX_THRESHOLD = 0.5
#: Val figures within this of a target count as reaching it (9/10 is 0.9 whatever the float rounding).
_TOLERANCE = 1e-9
#: The val figure each rule maximises (the targeted rules: among the candidates that reach the target).
_OBJECTIVE = {"max-f1": "f1", "youden": "youden", "recall": "precision", "precision": "recall",
              "specificity": "recall"}


@dataclass(frozen=True)
class OperatingRule:
    """A parsed ``--operating-point``: ``name`` (``argmax``, ``max-f1``, ``youden``, ``recall``, ``precision``,
    ``specificity``) and, for the last three, the ``target`` they must reach on val."""

    name: str
    target: float | None = None

    def __str__(self) -> str:
        return self.name if self.target is None else f"{self.name}>={self.target:g}"

    def describe(self) -> str:
        """The rule in words, e.g. ``the best val precision with val recall >= 0.9``."""
        if self.name == ARGMAX:
            return "the arg-max decision (threshold 0.5)"
        if self.name == "max-f1":
            return "the threshold of the highest val F1"
        if self.name == "youden":
            return "the threshold of the highest val Youden's J (sensitivity + specificity - 1)"
        return f"the best val {_OBJECTIVE[self.name]} with val {self.name} >= {self.target:g}"


def parse_rule(text: str | OperatingRule) -> OperatingRule:
    """``argmax``, ``max-f1``, ``youden``, ``recall>=X``, ``precision>=X`` or ``specificity>=X`` (X in (0, 1]).

    Raises:
        UserError: anything else (``recall>0.9``, ``recall>=1.5``, ``foo``), naming the accepted forms.
    """
    if isinstance(text, OperatingRule):
        return text
    value = str(text).strip().lower().replace(" ", "")
    if value in PLAIN_RULES:
        return OperatingRule(value)
    match = re.fullmatch(r"([a-z]+)>=([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", value)
    if not match or match.group(1) not in TARGET_RULES:
        raise UserError(f"--operating-point must be one of {RULE_FORMS}, got {text!r}")
    target = float(match.group(2))
    if not 0 < target <= 1:
        raise UserError(f"--operating-point {value}: the target X of {match.group(1)}>=X must be in (0, 1]")
    return OperatingRule(match.group(1), target)


@dataclass
class Candidates:
    """Each distinct val score as a threshold, highest first, and the val counts of "positive at >= it"."""

    thresholds: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    positives: int
    negatives: int

    def figures(self) -> dict[str, np.ndarray]:
        """``recall``, ``precision``, ``specificity``, ``f1`` and ``youden`` of every candidate."""
        tp, fp = self.true_positives.astype(np.float64), self.false_positives.astype(np.float64)
        recall = tp / self.positives
        specificity = 1 - fp / self.negatives
        return {"recall": recall, "precision": tp / (tp + fp), "specificity": specificity,
                "f1": 2 * tp / (tp + fp + self.positives), "youden": recall + specificity - 1}


def candidates(is_positive: np.ndarray, scores: np.ndarray) -> Candidates:
    """The candidate thresholds of val images ``is_positive`` ``[N]`` (bool) with positive-class ``scores`` ``[N]``.

    Raises:
        UserError: val lacks the positive or the negative class (no rule is defined then).
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(is_positive.sum()), int((~is_positive).sum())
    if not positives or not negatives:
        missing = "positive" if not positives else "negative"
        raise UserError(f"the val images hold no image of the {missing} class; an operating point is chosen on "
                        "val images of both classes")
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], is_positive[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]  # the end of each run of equal scores
    return Candidates(ordered[last_of_each], np.cumsum(hits)[last_of_each], np.cumsum(~hits)[last_of_each],
                      positives, negatives)


def choose_threshold(is_positive: np.ndarray, scores: np.ndarray, rule: OperatingRule) -> float:
    """The threshold ``rule`` chooses on val (see the module docstring); ``rule`` is not ``argmax``.

    Args:
        is_positive: ``[N]`` val images of the positive class.
        scores: ``[N]`` their probabilities of the positive class.
        rule: a rule other than ``argmax``.

    Raises:
        UserError: val lacks a class, or no threshold reaches the rule's target on val (names the best
            reachable value).
    """
    table = candidates(is_positive, scores)
    figures = table.figures()
    eligible = np.ones(len(table.thresholds), dtype=bool)
    if rule.target is not None:
        eligible = figures[rule.name] >= rule.target - _TOLERANCE
        if not eligible.any():
            raise UserError(f"--operating-point {rule}: no threshold reaches val {rule.name} {rule.target:g} "
                            f"({table.positives} positive, {table.negatives} negative val images); the best "
                            f"reachable val {rule.name} is {figures[rule.name].max():.4f}")
    keys = [np.where(eligible, figures[name], -np.inf) for name in ("specificity", "recall", _OBJECTIVE[rule.name])]
    chosen = int(np.lexsort(keys)[-1])  # the last key sorts first: the objective, then recall, then specificity
    threshold = float(table.thresholds[chosen])
    if chosen + 1 < len(table.thresholds):
        below = float(table.thresholds[chosen + 1])
        middle = (threshold + below) / 2
        threshold = middle if below < middle <= threshold else threshold
    return threshold


def val_figures(is_positive: np.ndarray, predicted_positive: np.ndarray) -> dict[str, Any]:
    """Counts and sensitivity, specificity, precision and F1 (positive class) of decisions on val."""
    is_positive = np.asarray(is_positive, dtype=bool)
    predicted_positive = np.asarray(predicted_positive, dtype=bool)
    tp = int(np.sum(is_positive & predicted_positive))
    fp = int(np.sum(~is_positive & predicted_positive))
    fn = int(np.sum(is_positive & ~predicted_positive))
    tn = int(np.sum(~is_positive & ~predicted_positive))

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    return {"num_images": len(is_positive), "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "true_negatives": tn, "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


@dataclass
class OperatingPoint:
    """What ``RUN/operating_point.json`` records: the rule, the positive class, the threshold on its
    probability, the val figures there, and which model (checkpoint, head or epoch) it was chosen for."""

    rule: str
    positive_class: str
    positive_index: int
    class_names: list[str]
    threshold: float
    val: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    written_by: str = "check-accuracies"

    @property
    def is_argmax(self) -> bool:
        return self.rule == ARGMAX

    def describe(self) -> str:
        """E.g. ``recall>=0.9: malignant when P(malignant) >= 0.2342``."""
        return f"{self.rule}: {self.positive_class} when P({self.positive_class}) >= {self.threshold:.4g}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rule_text": parse_rule(self.rule).describe(), "decision": self.describe()}


def choose_operating_point(rule: str | OperatingRule, labels: np.ndarray, probabilities: np.ndarray,
                           class_names: list[str], positive: int, model: dict[str, Any] | None = None,
                           val_folder: str | None = None) -> OperatingPoint:
    """The operating point ``rule`` chooses on val ``labels`` ``[N]`` and ``probabilities`` ``[N, 2]``.

    Args:
        rule: an ``--operating-point`` rule (``argmax``: threshold 0.5, the val figures of the arg-max).
        labels: the val images' class ids.
        probabilities: their class probabilities.
        class_names: the two classes.
        positive: the positive class's index.
        model: which model the probabilities are of (checkpoint, head or epoch): recorded with the point.
        val_folder: where the val images are, recorded with the point.

    Raises:
        UserError: val lacks a class (rules other than ``argmax``), or the target is unreachable (see
            :func:`choose_threshold`).
    """
    rule = parse_rule(rule)
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=np.float64)
    is_positive = labels == positive
    if rule.name != ARGMAX and (is_positive.all() or not is_positive.any()):
        missing = class_names[positive] if not is_positive.any() else class_names[1 - positive]
        raise UserError(f"--operating-point {rule}: the val images{f' ({val_folder})' if val_folder else ''} hold "
                        f"no image of the class {missing}; an operating point is chosen on val images of both classes")
    if rule.name == ARGMAX:
        threshold, predicted = ARGMAX_THRESHOLD, probabilities.argmax(axis=1) == positive
    else:
        threshold = choose_threshold(is_positive, probabilities[:, positive], rule)
        predicted = probabilities[:, positive] >= threshold
    val = {"folder": val_folder, **val_figures(is_positive, predicted)}
    return OperatingPoint(str(rule), class_names[positive], positive, list(class_names), threshold, val,
                          dict(model or {}))


def positive_index(class_names: list[str], positive_class: str | None) -> int:
    """The index of the positive class of a two-class run: ``positive_class``, else the second class.

    Raises:
        UserError: ``positive_class`` is not one of ``class_names``.
    """
    if positive_class is None:
        return 1
    if positive_class not in class_names:
        raise UserError(f"--positive-class {positive_class!r} is not a class of the run (its classes: "
                        f"{', '.join(class_names)})")
    return class_names.index(positive_class)


def write_operating_point(run_dir: str | os.PathLike, point: OperatingPoint) -> Path:
    """Write ``RUN/operating_point.json`` atomically (a reader sees the old file or the new one)."""
    from supcon.checkpoint import atomic_write_text  # imports torch: not when the command line is parsed

    path = Path(run_dir) / OPERATING_POINT_FILE
    atomic_write_text(json.dumps(point.to_json(), indent=2) + "\n", path)
    return path


def load_operating_point(run_dir: str | os.PathLike) -> OperatingPoint | None:
    """``RUN/operating_point.json``, or None when the run has none.

    Raises:
        UserError: the file is unreadable or malformed.
    """
    path = Path(run_dir) / OPERATING_POINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        fields = {name: data[name] for name in ("rule", "positive_class", "positive_index", "class_names",
                                                "threshold", "val")}
        point = OperatingPoint(**fields, model=dict(data.get("model") or {}),
                               written_by=str(data.get("written_by", "")))
        parse_rule(point.rule)
        point.threshold = float(point.threshold)
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"{path} is unreadable or malformed ({exc}); re-run check-accuracies --run "
                        f"{Path(run_dir)} to write it again") from None
    return point


#: The keys of a model's description (``RunClassifier.source``) that say which model a threshold belongs to.
MODEL_KEYS = ("kind", "checkpoint", "checkpoint_sha256", "backbone_epoch", "head_epoch")


def model_identity(source: dict[str, Any]) -> dict[str, Any]:
    """The parts of a model's description that identify it (see :data:`MODEL_KEYS`)."""
    return {key: source.get(key) for key in MODEL_KEYS}


@dataclass
class Decision:
    """How ``predict`` decides two classes: ``positive`` where its probability is >= ``threshold``."""

    positive: int
    threshold: float
    source: str  # one line for the log: where the threshold came from


def resolve_decision(run_dir: str | os.PathLike, class_names: list[str], source: dict[str, Any],
                     threshold: float | None = None) -> Decision:
    """The two-class decision of ``predict``: ``threshold`` when given, else the run's recorded operating point
    when it was chosen for this model (``source``), else 0.5 on the second class.

    Raises:
        UserError: a malformed operating_point.json, or one recorded for other class names.
    """
    point = load_operating_point(run_dir)
    if point is not None and list(point.class_names) != list(class_names):
        raise UserError(f"{Path(run_dir) / OPERATING_POINT_FILE} is for the classes {point.class_names}, the model "
                        f"has {class_names}; re-run check-accuracies --run {Path(run_dir)}")
    positive = 1 if point is None else point.positive_index
    name = class_names[positive]
    if threshold is not None:
        recorded = "" if point is None else f" (overrides the recorded operating point {point.describe()})"
        return Decision(positive, threshold, f"--threshold {threshold:g} on P({name}){recorded}")
    if point is None:
        return Decision(positive, ARGMAX_THRESHOLD, f"threshold {ARGMAX_THRESHOLD:g} on P({name}): the run records "
                        "no operating point (check-accuracies --operating-point RULE records one)")
    if not _chosen_for(point, source, run_dir):
        return Decision(positive, ARGMAX_THRESHOLD, f"threshold {ARGMAX_THRESHOLD:g} on P({name}): the recorded "
                        "operating point belongs to another model")
    return Decision(positive, point.threshold, f"threshold {point.threshold:.4g} on P({name}) from "
                    f"{Path(run_dir) / OPERATING_POINT_FILE} ({point.rule}, chosen on val)")


def recorded_for(run_dir: str | os.PathLike, source: dict[str, Any]) -> OperatingPoint | None:
    """The run's recorded operating point if it was chosen for the model ``source`` describes, else None
    (with a warning when one exists for another model).

    Raises:
        UserError: a malformed operating_point.json.
    """
    point = load_operating_point(run_dir)
    return point if point is not None and _chosen_for(point, source, run_dir) else None


def _chosen_for(point: OperatingPoint, source: dict[str, Any], run_dir: str | os.PathLike) -> bool:
    """Whether ``point`` was chosen for the model ``source`` describes; a warning when not."""
    if model_identity(point.model) == model_identity(source):
        return True
    logger.warning("%s was chosen for %s, not for this model (%s): its threshold %.4g is not used (0.5 instead; "
                   "predict --threshold sets one)", Path(run_dir) / OPERATING_POINT_FILE, _model_words(point.model),
                   _model_words(source), point.threshold)
    return False


def _model_words(model: dict[str, Any]) -> str:
    words = f"{model.get('checkpoint')}"
    if model.get("head_epoch") is not None:
        words += f" head epoch {model['head_epoch']}"
    elif model.get("backbone_epoch") is not None:
        words += f" epoch {model['backbone_epoch']}"
    return words
