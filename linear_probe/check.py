"""``check-accuracies``: each run's best (checkpoint, head) by validation, evaluated once on test.

For a SupCon run the choice is made by :func:`linear_probe.select.select` (``--select``, default
``trend``) from the probe records alone (val accuracies and losses) before the test folder
is read. A baseline run (``run_info.kind: baseline``) is evaluated by
``supcon.baseline.evaluate.predict_run``, which selected its best-by-val epoch during training. All
runs are evaluated before any file is written, so a bad input anywhere leaves every run untouched.

A two-class run is decided at an operating point (``--operating-point``, default ``argmax``): a
threshold on the positive class's probability chosen by :mod:`linear_probe.operating_point` on the
selected model's val predictions (a SupCon run's cached val features through the selected head; a
baseline's best.pth on its val images, ``predict_val``) before its test images are encoded, then
applied unchanged to them. Runs with more classes take the arg-max; any other rule is refused for them.

Every test metric gets a seeded 95% bootstrap interval over the test images (``--bootstrap``), and
runs tested on the same images are compared with the best one image by image (McNemar's exact test,
paired F1 bootstrap; :mod:`linear_probe.compare`).

Outputs: ``RUN/test_metrics.json``, ``RUN/confusion_matrix.png`` (two classes: ``RUN/roc_curve.png``
and ``RUN/operating_point.json``, which predict and supcon-export read) per run, and the comparison
table ``comparison.csv`` / ``comparison.md`` in ``--output`` (default: the runs root, ``./runs``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linear_probe.checkpoints import check_checkpoint
from linear_probe.compare import EXPLANATION, PairedResult, Verdict, compare_to_best, verdict
from linear_probe.config import CheckConfig
from linear_probe.features import FeatureCache, FrozenCheckpoint, FrozenFeatures
from linear_probe.heads import FINAL_STATE_DICT, HEADS_DIR, HeadRecord, load_head_records, load_head_state
from linear_probe.operating_point import (
    ARGMAX,
    OperatingPoint,
    choose_operating_point,
    parse_rule,
    positive_index,
    write_operating_point,
)
from linear_probe.probe import make_head
from linear_probe.runs import PROBE_DIR, RunInfo, RunKind, resolve_folder, scan_checked
from linear_probe.select import RULE_TEXT, Selection, select, settled_val_accuracy
from linear_probe.tables_and_plots import (
    COMPARISON_CSV_FIELDS,
    comparison_rows,
    operating_point_table,
    percent_interval,
    plot_confusion_matrix,
    plot_roc,
    write_csv,
)
from supcon.checkpoint import atomic_write_text
from supcon.data import ImageFolderIndex
from supcon.errors import UserError
from supcon.frozen import resolve_device
from supcon.metrics import TestMetrics, classification_metrics, decide, wilson_interval
from supcon.rundir import BEST, TEST_METRICS_FILE, find_runs, load_supcon_checkpoint

logger = logging.getLogger(__name__)

METRICS_JSON = TEST_METRICS_FILE
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curve.png"
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"


@dataclass
class RunEvaluation:
    """One run's selected model and its test metrics."""

    run_dir: Path
    kind: RunKind
    network: str
    batch_size: int | None
    backbone_epoch: Any
    head_epoch: int | None
    checkpoint: str | None
    val_accuracy: float | None
    test_folder: str
    metrics: TestMetrics
    selection: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = field(default=None, repr=False)
    predictions: np.ndarray | None = field(default=None, repr=False)
    versus_best: PairedResult | None = None
    comparison: str = "-"  # the "vs best" cell when there is no paired result: "best", "other test images", "-"
    chosen: str = ""  # which model was tested, for the plots' titles
    supcon_based: bool = False  # a SupCon run's probe, or a baseline fine-tuned from a SupCon encoder
    verdict: Verdict | None = None
    operating_point: OperatingPoint | None = None  # two classes: the decision threshold chosen on val

    def to_json(self) -> dict[str, Any]:
        metrics = self.metrics.to_dict()
        metrics.pop("roc_curve", None)
        paired = None if self.versus_best is None else self.versus_best.to_dict()
        return {"run": str(self.run_dir), "kind": self.kind.value, "network": self.network,
                "batch_size": self.batch_size, "test_folder": self.test_folder, "selection": self.selection,
                "metrics": metrics,
                "operating_point": None if self.operating_point is None else self.operating_point.to_json(),
                "versus_best": paired, "verdict": None if self.verdict is None else self.verdict.to_dict(),
                "labels": None if self.labels is None else [int(v) for v in self.labels],
                "predictions": None if self.predictions is None else [int(v) for v in self.predictions]}

    def table_row(self) -> dict[str, Any]:
        m = self.metrics
        row = {"run": str(self.run_dir), "kind": self.kind.value, "batch_size": self.batch_size,
               "backbone_epoch": self.backbone_epoch, "head_epoch": self.head_epoch, "checkpoint": self.checkpoint,
               "val_accuracy": self.val_accuracy, "accuracy": m.accuracy, "precision": m.precision,
               "recall": m.recall, "f1": m.f1, "average": m.average, "roc_auc": m.roc_auc, "network": self.network,
               "test_folder": self.test_folder, "num_test": m.num_samples, "intervals": m.intervals,
               "versus_best": self.comparison if self.versus_best is None else self.versus_best.describe(),
               "operating_point": None if self.operating_point is None else self.operating_point.rule,
               "positive_class": m.positive_class, "threshold": m.threshold, "sensitivity": m.sensitivity,
               "specificity": m.specificity, "balanced_accuracy": m.balanced_accuracy, "auprc": m.auprc}
        if self.versus_best is not None:
            row.update({f"versus_best_{k}": v for k, v in self.versus_best.to_dict().items()})
        return row


@dataclass
class CheckResult:
    evaluations: list[RunEvaluation]
    table_markdown: str
    files: dict[str, Path]


@dataclass
class _SupConPlan:
    run: RunInfo
    best: HeadRecord
    selection: Selection
    test_index: ImageFolderIndex
    positive: int | None = None  # two classes: the positive class's index (an operating point is chosen)
    val_index: ImageFolderIndex | None = None  # two classes: where it is chosen


@dataclass
class _BaselinePlan:
    run: RunInfo
    positive: int | None = None


def has_probe_results(run_dir: Path) -> bool:
    return any((run_dir / PROBE_DIR / HEADS_DIR).glob("*.pth"))


def runs_to_check(config: CheckConfig) -> list[RunInfo]:
    """The ``--run`` directories, else every run under the runs root with probe results or of kind baseline.

    Raises:
        UserError: a ``--run`` that is not a run directory, or no run to check.
    """
    if config.runs:
        return [RunInfo.load(r) for r in config.runs]
    runs = []
    for run_dir in find_runs(config.runs_root):
        try:
            run = RunInfo.load(run_dir)
        except UserError as exc:
            logger.warning("skipping %s: %s", run_dir, exc)
            continue
        if run.kind is RunKind.BASELINE or has_probe_results(run_dir):
            runs.append(run)
        else:
            logger.info("skipping %s: not probed yet (probe-all --run %s)", run_dir, run_dir)
    if not runs:
        raise UserError(
            f"no run found under {Path(config.runs_root).resolve()} with probe results or of kind baseline; "
            "run probe-all first, or pass --run DIR"
        )
    return runs


def _plan_supcon(run: RunInfo, config: CheckConfig) -> _SupConPlan:
    records = load_head_records(run.probe_dir, run.run_dir)
    if not records:
        if has_probe_results(run.run_dir):
            raise UserError(f"run {run.run_dir} has probe results only for checkpoints that have changed since; "
                            f"re-run: probe-all --run {run.run_dir}")
        raise UserError(f"run {run.run_dir} was never probed; run first: probe-all --run {run.run_dir}")
    if len({r.val_folder for r in records}) > 1:
        logger.warning("%s: heads were validated on different val folders (%s); their accuracies are compared as "
                       "they are", run.run_dir, ", ".join(sorted({r.val_folder for r in records})))
    selection = select(records, config.select)  # validation results only: the test folder is not even read yet
    best = selection.record
    class_names = run.class_names or best.class_names
    positive = _positive_class(run.run_dir, class_names, config)
    allow = config.allow_split_class_names or run.allows_split_names
    val_index = None if positive is None else scan_checked(best.val_folder, "val folder", class_names, allow)
    test_folder = resolve_folder(config.test_folder, run.train_folder, "test", "--test-folder")
    return _SupConPlan(run, best, selection, scan_checked(test_folder, "test folder", class_names, allow),
                       positive, val_index)


def _positive_class(run_dir: Path, class_names: list[str], config: CheckConfig) -> int | None:
    """The positive class's index of a two-class run (an operating point is chosen for it), else None.

    Raises:
        UserError: an operating point other than argmax, or ``--positive-class``, for a run without two
            classes; a ``--positive-class`` that is not one of the run's classes.
    """
    if len(class_names) != 2:
        described = f"{run_dir} has {len(class_names)} classes ({', '.join(class_names) or 'none recorded'})"
        if parse_rule(config.operating_point).name != ARGMAX:
            raise UserError(f"--operating-point {config.operating_point} needs a two-class run; {described}; "
                            "use --operating-point argmax")
        if config.positive_class is not None:
            raise UserError(f"--positive-class needs a two-class run; {described}")
        return None
    return positive_index(class_names, config.positive_class)


def _baseline_evaluate() -> tuple[Any, Any]:
    """``supcon.baseline.evaluate``'s ``(predict_run, predict_val)``."""
    try:
        from supcon.baseline.evaluate import predict_run, predict_val
    except ImportError as exc:
        raise UserError(f"baseline runs need supcon.baseline.evaluate, which this install lacks ({exc})") from None
    return predict_run, predict_val


def check_accuracies(config: CheckConfig, progress: bool = False) -> CheckResult:
    """Evaluate each run's selected model on its test folder; write per-run files and the comparison table.

    Raises:
        UserError: no run, a never-probed run (names the command to run), missing/empty test folder,
            differing class names, an unsafe or mismatched checkpoint/head; nothing is written then.
    """
    config = replace(config)
    config.validate()
    plans: list[_SupConPlan | _BaselinePlan] = []
    for run in runs_to_check(config):
        if run.kind is RunKind.BASELINE:
            _baseline_evaluate()  # fail early when the baseline package is missing
            plans.append(_BaselinePlan(run, _positive_class(run.run_dir, run.class_names, config)))
        else:
            run.require_supcon("check-accuracies")
            plans.append(_plan_supcon(run, config))

    device = resolve_device(config.device)
    evaluations = [
        _evaluate_baseline(plan, config) if isinstance(plan, _BaselinePlan)
        else _evaluate_supcon(plan, config, device, progress)
        for plan in plans
    ]

    _compare_runs(evaluations, config)
    verdicts = _verdicts(evaluations)
    for evaluation in evaluations:
        _write_run_outputs(evaluation)
    output = Path(config.output or config.runs_root)
    rows = [e.table_row() for e in evaluations]
    csv_rows, markdown = comparison_rows(rows)
    markdown += operating_point_table(rows)
    if len(evaluations) > 1:
        markdown += f"\n{EXPLANATION}\n"
    if verdicts:
        markdown += "\nSupCon against supervised training, on each test folder:\n" + "\n".join(
            f"- {v.sentence()}" for v in verdicts) + "\n"
    notes = [f"- {e.run_dir.name}: {e.selection['note']}" + _advice_sentence(e.selection.get("advice"))
             for e in evaluations if e.selection.get("note")]
    if notes:
        markdown += "\nSelection on val:\n" + "\n".join(notes) + "\n"
    files = {"csv": output / COMPARISON_CSV, "markdown": output / COMPARISON_MD}
    write_csv(files["csv"], csv_rows, COMPARISON_CSV_FIELDS)
    average = evaluations[0].metrics.average
    intervals = (f"; in brackets a 95% bootstrap interval over the test images ({config.bootstrap} resamples, "
                 f"seed {config.bootstrap_seed})" if config.bootstrap else "")
    atomic_write_text(
        f"# Test accuracies\n\nPrecision, recall and F1: {average} average over classes{intervals}. Each SupCon "
        f"run's model was chosen on validation only ({RULE_TEXT[config.select]}).\n\n{markdown}",
        files["markdown"])
    return CheckResult(evaluations, markdown, files)


def _compare_runs(evaluations: list[RunEvaluation], config: CheckConfig) -> None:
    """Set ``versus_best`` on every run tested on the same images as the most accurate run (not on that one)."""
    if len(evaluations) < 2:
        return
    best = max(evaluations, key=lambda e: e.metrics.accuracy)
    for evaluation in evaluations:
        same_images = (evaluation.test_folder == best.test_folder and evaluation.labels is not None
                       and best.labels is not None and np.array_equal(evaluation.labels, best.labels))
        if evaluation is best:
            evaluation.comparison = "best"
            continue
        if not same_images:
            evaluation.comparison = "other test images"
            continue
        point = evaluation.operating_point
        evaluation.versus_best = compare_to_best(
            evaluation.labels, evaluation.predictions, best.predictions, len(evaluation.metrics.class_names),
            config.average, config.bootstrap, config.bootstrap_seed, 1 if point is None else point.positive_index)


def _advice_sentence(advice: str | None) -> str:
    return f" {advice[0].upper()}{advice[1:]}." if advice else ""


def _verdicts(evaluations: list[RunEvaluation]) -> list[Verdict]:
    """Each SupCon-based run against the most accurate other run on the same test images (set on the run too)."""
    verdicts = []
    for evaluation in evaluations:
        if not evaluation.supcon_based or evaluation.labels is None:
            continue
        rivals = [e for e in evaluations if not e.supcon_based and e.labels is not None
                  and e.test_folder == evaluation.test_folder and np.array_equal(e.labels, evaluation.labels)]
        if not rivals:
            continue
        rival = max(rivals, key=lambda e: e.metrics.accuracy)
        evaluation.verdict = verdict(evaluation.run_dir.name, evaluation.labels, evaluation.predictions,
                                     rival.run_dir.name, rival.predictions, (evaluation.selection or {}).get("advice"))
        verdicts.append(evaluation.verdict)
    return verdicts


def _evaluate_supcon(plan: _SupConPlan, config: CheckConfig, device: torch.device,
                     progress: bool) -> RunEvaluation:
    run, best, chosen = plan.run, plan.best, plan.selection
    path = run.run_dir / best.checkpoint
    state = load_supcon_checkpoint(path)
    if not best.checkpoint_stamp.matches(path):
        raise UserError(f"{path} changed while being evaluated; re-run probe-all --run {run.run_dir}")
    class_names = run.class_names or best.class_names
    check_checkpoint(state, path, run.model_config, class_names)
    checkpoint = FrozenCheckpoint(path, device, state, best.checkpoint_stamp.sha256)
    checkpoint.encoder()  # built now, so weights that do not fit are refused before the head is read
    head_state = load_head_state(best.path)
    if chosen.final_head and FINAL_STATE_DICT not in head_state:
        logger.warning("%s holds no final head (written by an older probe-all); testing its best-val head "
                       "instead. probe-all --force --run %s stores final heads.", best.path, run.run_dir)
        chosen.final_head = False
    head = make_head(best.feature_dim, len(class_names), seed=0)
    head.load_state_dict(head_state[FINAL_STATE_DICT if chosen.final_head else "state_dict"])
    head.to(device).eval()
    frozen = FrozenFeatures(FeatureCache(run.cache_dir), run.size, config.encode_batch_size, config.num_workers,
                            progress)
    point = None
    if plan.positive is not None:  # chosen on val before the test images are encoded
        val_labels, val_probabilities = _head_probabilities(frozen, checkpoint, head, plan.val_index, "val images")
        model = {"kind": run.kind.value, "checkpoint": best.checkpoint,
                 "checkpoint_sha256": best.checkpoint_stamp.sha256, "backbone_epoch": best.backbone_epoch,
                 "head_epoch": chosen.head_epoch,
                 "head": "final" if chosen.final_head else "best", "select": chosen.rule}
        point = _choose(run.run_dir, config, val_labels, val_probabilities, class_names, plan.positive, model,
                        plan.val_index.root)
    labels, probabilities = _head_probabilities(frozen, checkpoint, head, plan.test_index, "test images")
    checkpoint.assert_encoder_unchanged()
    metrics = _metrics(labels, probabilities, class_names, config, point)
    model_name = run.model_config.get("model", "?")
    logger.info("%s: %s (backbone epoch %d, head epoch %d, val %.2f%%) -> test accuracy %.2f%%", run.run_dir.name,
                best.checkpoint, best.backbone_epoch, chosen.head_epoch, 100 * chosen.val_accuracy,
                100 * metrics.accuracy)
    head_kind = "final" if chosen.final_head else "best val"
    return RunEvaluation(run.run_dir, run.kind, f"SupCon {model_name}", run.global_batch, best.backbone_epoch,
                         chosen.head_epoch, best.checkpoint, chosen.val_accuracy, plan.test_index.root,
                         metrics, _selection_summary(chosen), labels, _decisions(probabilities, metrics, point),
                         chosen=f"{best.checkpoint}, {head_kind} head (epoch {chosen.head_epoch}), {chosen.rule}"
                         + _threshold_words(point), supcon_based=True, operating_point=point)


def _head_probabilities(frozen: FrozenFeatures, checkpoint: FrozenCheckpoint, head: torch.nn.Module,
                        index: ImageFolderIndex, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [N], class probabilities [N, C])`` of a checkpoint + head on a folder (features from the cache)."""
    features, labels = frozen.of(checkpoint, index, what)
    with torch.no_grad():
        probabilities = torch.softmax(head(features.to(checkpoint.device)), dim=1).cpu().numpy()
    return labels.numpy(), probabilities


def _metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], config: CheckConfig,
             point: OperatingPoint | None) -> TestMetrics:
    """Test metrics at the run's operating point (the arg-max decision without one, or for ``argmax``)."""
    threshold = None if point is None or point.is_argmax else point.threshold
    positive = 1 if point is None else point.positive_index
    return classification_metrics(labels, probabilities, class_names, config.average, config.bootstrap,
                                  config.bootstrap_seed, positive=positive, threshold=threshold)


def _decisions(probabilities: np.ndarray, metrics: TestMetrics, point: OperatingPoint | None) -> np.ndarray:
    positive = 1 if point is None else point.positive_index
    return decide(probabilities, positive, metrics.threshold)


def _threshold_words(point: OperatingPoint | None) -> str:
    return "" if point is None or point.is_argmax else f"\nat {point.describe()} (chosen on val)"


def _selection_summary(chosen: Selection) -> dict[str, Any]:
    """The ``selection`` block of a SupCon run's test_metrics.json (validation facts only)."""
    best = chosen.record
    return {
        "checkpoint": best.checkpoint, "checkpoint_sha256": best.checkpoint_stamp.sha256,
        "backbone_epoch": best.backbone_epoch, "steps_into_epoch": best.steps_into_epoch,
        "head": "final" if chosen.final_head else "best", "head_epoch": chosen.head_epoch,
        "val_accuracy": chosen.val_accuracy, "val_loss": chosen.val_loss,
        "val_accuracy_interval": list(wilson_interval(round(chosen.val_accuracy * best.num_val), best.num_val)),
        "best_val_accuracy": best.best_val_accuracy, "best_head_epoch": best.best_head_epoch,
        "settled_val_accuracy": settled_val_accuracy(best), "num_val": best.num_val, "val_folder": best.val_folder,
        "head_file": str(best.path), "settings": best.settings, "candidates": chosen.candidates,
        "rule": chosen.rule, "rule_text": RULE_TEXT[chosen.rule], "scores": chosen.scores,
        "within_noise": [r.checkpoint for r in chosen.within_noise], "noise_band": chosen.band,
        "note": chosen.note(), "advice": chosen.advice(),
    }


def _evaluate_baseline(plan: _BaselinePlan, config: CheckConfig) -> RunEvaluation:
    run = plan.run
    predict_run, predict_val = _baseline_evaluate()
    loader = {"batch_size": config.encode_batch_size, "allow_split_names": config.allow_split_class_names,
              "num_workers": config.num_workers}
    point = None if plan.positive is None else _baseline_operating_point(run, predict_val(run.run_dir, **loader),
                                                                         plan.positive, config)
    out = predict_run(run.run_dir, test_folder=config.test_folder, **loader)
    class_names = list(out["class_names"])
    labels = np.asarray(out["labels"]).astype(int)
    metrics = _metrics(labels, out["probabilities"], class_names, config, point)
    # A classical baseline (svm/logreg/knn) has neither batch nor epoch: its hyper-parameters were chosen on val.
    epoch = None if out["selected_epoch"] is None else int(out["selected_epoch"])
    batch_size = None if out["batch_size"] is None else int(out["batch_size"])
    rule = ("best validation epoch recorded by baseline-train" if epoch is not None
            else "hyper-parameters chosen on validation by baseline-train")
    selection = {"selected_epoch": epoch, "val_accuracy": float(out["val_accuracy"]), "rule": rule}
    chosen = (f"best.pth (epoch {epoch}, best val epoch)" if epoch is not None
              else "best.pth (hyper-parameters chosen on val)")
    logger.info("%s (%s, epoch %s, val %.2f%%) -> test accuracy %.2f%%", run.run_dir.name, out["network"],
                "-" if epoch is None else epoch, 100 * out["val_accuracy"], 100 * metrics.accuracy)
    return RunEvaluation(run.run_dir, run.kind, str(out["network"]), batch_size, epoch, None, None,
                         float(out["val_accuracy"]), str(out["test_folder"]), metrics, selection, labels,
                         _decisions(np.asarray(out["probabilities"]), metrics, point),
                         chosen=chosen + _threshold_words(point), supcon_based=bool(run.run_info.get("init_from")),
                         operating_point=point)


def _baseline_operating_point(run: RunInfo, val: dict[str, Any], positive: int,
                              config: CheckConfig) -> OperatingPoint:
    """The operating point of a baseline run, chosen on ``predict_val``'s output (its best.pth on its val images)."""
    class_names = list(val["class_names"])
    if run.class_names and class_names != run.class_names:
        raise UserError(f"{run.run_dir}: best.pth holds the classes {class_names}, config.yaml {run.class_names}")
    epoch = val["selected_epoch"]
    model = {"kind": run.kind.value, "checkpoint": BEST, "checkpoint_sha256": None,
             "backbone_epoch": None if epoch is None else int(epoch), "head_epoch": None}
    return _choose(run.run_dir, config, val["labels"], val["probabilities"], class_names, positive, model,
                   str(val["val_folder"]))


def _choose(run_dir: Path, config: CheckConfig, labels: np.ndarray, probabilities: np.ndarray,
            class_names: list[str], positive: int, model: dict[str, Any], val_folder: str) -> OperatingPoint:
    """:func:`choose_operating_point` on a run's val predictions; its errors name the run."""
    try:
        return choose_operating_point(config.operating_point, labels, probabilities, class_names, positive, model,
                                      val_folder)
    except UserError as exc:
        raise UserError(f"{run_dir}: {exc}") from None


def _write_run_outputs(evaluation: RunEvaluation) -> None:
    run_dir, metrics = evaluation.run_dir, evaluation.metrics
    atomic_write_text(json.dumps(evaluation.to_json(), indent=2) + "\n", run_dir / METRICS_JSON)
    if evaluation.operating_point is not None:
        write_operating_point(run_dir, evaluation.operating_point)
    title = f"{run_dir.name}: test accuracy {percent_interval(metrics.accuracy, metrics.intervals.get('accuracy'))}"
    if evaluation.chosen:
        title += f"\n{evaluation.chosen}"
    plot_confusion_matrix(run_dir / CONFUSION_PNG, metrics.confusion_matrix, metrics.class_names, title)
    if metrics.roc_curve is not None:
        plot_roc(run_dir / ROC_PNG, metrics.roc_curve["fpr"], metrics.roc_curve["tpr"], metrics.roc_auc,
                 metrics.positive_class or metrics.class_names[1], f"{run_dir.name}: ROC")
