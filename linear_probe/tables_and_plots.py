"""Tables (CSV and markdown) and PNG plots of the probe and test results.

Plots are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so no GUI backend or
pyplot global state is involved; every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from linear_probe.checkpoints import format_backbone_epoch
from linear_probe.heads import HeadRecord
from linear_probe.probe import describe_settings
from linear_probe.select import settled_val_accuracy, settled_val_loss
from supcon.checkpoint import atomic_write_bytes, atomic_write_text
from supcon.metrics import INTERVAL_METRICS, OPERATING_METRICS, wilson_interval

PROBE_HEADERS = ["checkpoint", "backbone epoch", "best val accuracy [95% interval]", "head epoch",
                 "settled val accuracy"]
PROBE_CSV_FIELDS = ["checkpoint", "backbone_epoch", "steps_into_epoch", "best_val_accuracy", "best_val_low",
                    "best_val_high", "num_val", "head_epoch", "best_val_loss", "settled_val_accuracy",
                    "settled_val_loss", "settings", "settings_key", "head_file", "seconds"]
COMPARISON_HEADERS = ["bs / backbone epoch / head epoch", "Accuracy", "Precision", "Recall", "F1", "AUC", "Network",
                      "Run", "vs best"]
_INTERVAL_FIELDS = [f"{name}_{end}" for name in INTERVAL_METRICS for end in ("low", "high")]
COMPARISON_CSV_FIELDS = ["run", "kind", "batch_size", "backbone_epoch", "head_epoch", "checkpoint", "val_accuracy",
                         "accuracy", "precision", "recall", "f1", "average", "roc_auc", *_INTERVAL_FIELDS, "num_test",
                         "versus_best_mcnemar_exact_p", "versus_best_only_this_correct",
                         "versus_best_only_best_correct", "versus_best_f1_difference_interval",
                         "versus_best_distinguishable", "network", "test_folder", "operating_point",
                         "positive_class", "threshold",
                         *[f"{name}{end}" for name in OPERATING_METRICS for end in ("", "_low", "_high")]]
#: The table of two-class runs at their operating points, under the comparison table.
OPERATING_HEADERS = ["Run", "Operating point", "Positive class", "Threshold", "Sensitivity", "Specificity",
                     "Balanced accuracy", "AUROC", "AUPRC"]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def percent_interval(value: float | None, interval: Sequence[float] | None, undefined: str = "") -> str:
    """E.g. ``98.61% [97.22, 99.44]``; without an interval the value and ``undefined``."""
    if value is None or interval is None:
        return percent(value) + (undefined if value is not None else "")
    return f"{100 * value:.2f}% [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def val_interval(record: HeadRecord) -> tuple[float, float]:
    """95% Wilson interval of a head's best val accuracy on its val set."""
    return wilson_interval(round(record.best_val_accuracy * record.num_val), record.num_val)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in fields} for row in rows)
    atomic_write_text(buffer.getvalue(), path)


def sort_records(records: Sequence[HeadRecord]) -> list[HeadRecord]:
    return sorted(records, key=lambda r: (r.backbone_epoch, r.steps_into_epoch, r.checkpoint, r.settings_key))


def probe_table(records: Sequence[HeadRecord]) -> tuple[list[dict[str, Any]], str]:
    """The probe table of a run: CSV rows and markdown (a ``probe`` column when settings differ)."""
    records = sort_records(records)
    csv_rows = [{
        "checkpoint": r.checkpoint, "backbone_epoch": r.backbone_epoch, "steps_into_epoch": r.steps_into_epoch,
        "best_val_accuracy": round(r.best_val_accuracy, 6), "best_val_low": round(val_interval(r)[0], 6),
        "best_val_high": round(val_interval(r)[1], 6), "num_val": r.num_val, "head_epoch": r.best_head_epoch,
        "best_val_loss": round(r.best_val_loss, 6), "settled_val_accuracy": round(settled_val_accuracy(r), 6),
        "settled_val_loss": round(settled_val_loss(r), 6), "settings": describe_settings(r.settings),
        "settings_key": r.settings_key,
        "head_file": r.path.name if r.path else "", "seconds": round(r.seconds, 2),
    } for r in records]
    mixed = len({r.settings_key for r in records}) > 1
    headers = PROBE_HEADERS + (["probe"] if mixed else [])
    md_rows = []
    for r in records:
        row = [r.checkpoint, format_backbone_epoch(r.backbone_epoch, r.steps_into_epoch),
               percent_interval(r.best_val_accuracy, val_interval(r)), r.best_head_epoch,
               percent(settled_val_accuracy(r))]
        md_rows.append(row + ([describe_settings(r.settings)] if mixed else []))
    return csv_rows, markdown_table(headers, md_rows)


def _save(figure: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(buffer.getvalue(), path)


def _known(epochs: Sequence[int], values: Sequence[float | None], scale: float = 1.0) -> tuple[list, list]:
    """``(epochs, values)`` where the value was logged (e.g. kNN accuracy only every few epochs)."""
    pairs = [(e, scale * v) for e, v in zip(epochs, values, strict=True) if v is not None]
    return [e for e, _ in pairs], [v for _, v in pairs]


#: The val accuracy axis spans at least this many points, so a one-image change never fills the panel.
MIN_ACCURACY_SPAN = 5.0
#: At most this many epoch ticks; beyond it every k-th checkpoint gets one.
MAX_TICKS = 16


def plot_probe(path: str | os.PathLike, records: Sequence[HeadRecord], curves: dict[str, list],
               auto_epoch: int | None = None, title: str = "") -> Figure:
    """Val accuracy per checkpoint with its 95% interval, over the training loss and the embedding spread.

    Top: each checkpoint's probe val accuracy with its Wilson interval (an SGD head's best over its head
    epochs, beside its settled val accuracy, the default selection's score; an L-BFGS head's one fit,
    which is its score), the band within the noise of the best score, the checkpoint the default rule
    selects, and the online kNN accuracy. Middle: the training loss and the loss of a collapsed
    embedding. Bottom: the spread. ``--from auto``'s epoch is a dotted line named in the legend. Ticks
    sit at the probed checkpoints.

    Returns:
        The figure, already written to ``path`` as a PNG.
    """
    figure = Figure(figsize=(9, 8.5), layout="constrained")
    top, middle, bottom = figure.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    records = sort_records(records)
    _plot_val_accuracy(top, records, curves)
    epochs = curves.get("epoch", [])
    if epochs:
        middle.plot(epochs, curves["loss"], color="tab:blue", label="training loss")
        middle.plot(*_known(epochs, curves["collapsed_loss"]), color="grey", linestyle="--",
                    label="training loss of a collapsed embedding\n(every image mapped to one point)")
        bottom.plot(*_known(epochs, curves["spread"]), color="tab:green")
    middle.set_ylabel("training loss")
    bottom.set_ylabel("embedding spread")
    bottom.set_xlabel("backbone epoch")
    if auto_epoch is not None:
        for axis in (top, middle, bottom):
            axis.axvline(auto_epoch, color="black", linestyle=":",
                         label=f"--from auto: epoch {auto_epoch}" if axis is middle else None)
    # the probed checkpoints, and the epochs the kNN monitor ran (the demo saves and monitors every 5 epochs)
    knn_epochs = _known(curves.get("epoch", []), curves.get("knn_accuracy", []))[0] if epochs else []
    ticks = sorted({r.backbone_epoch for r in records} | set(knn_epochs)
                   | ({auto_epoch} if auto_epoch is not None else set()))
    if ticks:
        step = -(-len(ticks) // MAX_TICKS)
        bottom.set_xticks(ticks[::step])
    else:
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = [], []
    for axis in (top, middle):
        more = axis.get_legend_handles_labels()
        handles += more[0]
        labels += more[1]
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=10)
    if title:
        top.set_title(title, fontsize=12)
    _save(figure, path)
    return figure


def _plot_val_accuracy(axis, records: Sequence[HeadRecord], curves: dict[str, list]) -> None:
    from linear_probe.select import select

    colours = ["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    values = []
    for i, settings_key in enumerate(dict.fromkeys(r.settings_key for r in records)):
        group = [r for r in records if r.settings_key == settings_key]
        epochs = [r.backbone_epoch for r in group]
        best = [100 * r.best_val_accuracy for r in group]
        low_high = [[100 * v for v in val_interval(r)] for r in group]
        errors = [[b - lo for b, (lo, _) in zip(best, low_high, strict=True)],
                  [hi - b for b, (_, hi) in zip(best, low_high, strict=True)]]
        colour = colours[i % len(colours)]
        if _is_lbfgs(group[0]):  # one fit, no head epochs: its val accuracy is also its settled score
            axis.errorbar(epochs, best, yerr=errors, marker="o", color=colour, capsize=3,
                          label="probe: val acc. (L-BFGS head, C chosen on val), 95% interval")
            values += [v for pair in low_high for v in pair]
            continue
        axis.errorbar(epochs, best, yerr=errors, marker="o", color=colour, capsize=3,
                      label=f"probe: best val acc. of {group[0].settings.get('epochs')} head epochs, 95% interval\n"
                            f"({describe_settings(group[0].settings)})")
        settled = [100 * settled_val_accuracy(r) for r in group]
        axis.plot(epochs, settled, marker="s", linestyle="none", markerfacecolor="none", color=colour,
                  label="probe: settled val acc. (last tenth of the head epochs)")
        values += [v for pair in low_high for v in pair] + settled
    epochs = curves.get("epoch", [])
    live = [(e, 100 * a, 100 * lo, 100 * hi) for e, a, lo, hi in zip(
        epochs, *(curves.get(k) or [None] * len(epochs) for k in ("probe_accuracy", "probe_low", "probe_high")),
        strict=True) if a is not None and lo is not None and hi is not None]
    if live:
        axis.errorbar([e for e, *_ in live], [a for _, a, _, _ in live],
                      yerr=[[a - lo for _, a, lo, _ in live], [hi - a for _, a, _, hi in live]], marker="d",
                      linestyle="-", color="tab:green", capsize=2, alpha=0.8,
                      label="live probe during training (L-BFGS head), 95% interval")
        values += [v for _, _, lo, hi in live for v in (lo, hi)]
    knn_epochs, knn = _known(epochs, curves.get("knn_accuracy", [None] * len(epochs)), scale=100)
    if knn:
        axis.plot(knn_epochs, knn, marker="x", linestyle=":", color="tab:orange",
                  label="kNN val acc. (during training)")
        values += knn
    if records:
        selection = select(records)
        scores = selection.smoothed or selection.scores
        # an L-BFGS head has no head epochs to settle over: its score is its one fit's val accuracy
        score = "val acc." if all(_is_lbfgs(r) for r in records) else "settled val acc."
        if selection.smoothed:
            from linear_probe.select import curves_by_settings

            for curve in curves_by_settings(records):
                axis.plot([r.backbone_epoch for r in curve],
                          [100 * scores[f"{r.checkpoint}__{r.settings_key}"] for r in curve], linestyle="--",
                          color="tab:gray", label=f"{score} averaged with the neighbouring checkpoints")
        best_score = 100 * max(scores.values())
        what = ("within one standard error of the best averaged acc." if selection.smoothed
                else f"within the noise (95%) of the best {score}")
        axis.axhspan(best_score - 100 * selection.band, best_score, color="tab:red", alpha=0.08, label=what)
        chosen = selection.record
        axis.plot([chosen.backbone_epoch], [100 * selection.val_accuracy], marker="*", markersize=16,
                  color="gold", markeredgecolor="black", linestyle="none",
                  label=f"check-accuracies' choice ({selection.rule}):\n{chosen.checkpoint}, final head")
        values += [best_score - 100 * selection.band]
    num_val = min((r.num_val for r in records), default=0)
    label = "val accuracy (%)"
    if num_val:
        label += f"\n{num_val} val images, one = {100 / num_val:.2f} points"
    axis.set_ylabel(label)
    if values:
        high = min(100.0, max(values) + 0.5)
        low = min(min(values) - 0.5, high - MIN_ACCURACY_SPAN)
        axis.set_ylim(max(0.0, low), high + 0.3)


def _is_lbfgs(record: HeadRecord) -> bool:
    return record.settings.get("head_solver") == "lbfgs"


def plot_confusion_matrix(path: str | os.PathLike, matrix: Sequence[Sequence[int]], class_names: Sequence[str],
                          title: str = "") -> None:
    n = len(class_names)
    side = max(4.0, 0.5 * n + 2)
    figure = Figure(figsize=(side, side))
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046).set_label("test images")
    if max((len(name) for name in class_names), default=0) > 2:
        axis.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    else:  # single characters (digits, letters) read fine upright
        axis.set_xticks(range(n), labels=list(class_names))
    axis.set_yticks(range(n), labels=list(class_names))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center",
                      color="white" if peak and count > peak / 2 else "black", fontsize=8)
    axis.set_title(title or "confusion matrix", fontsize=10)
    _save(figure, path)


def plot_roc(path: str | os.PathLike, fpr: Sequence[float], tpr: Sequence[float], auc: float,
             positive: str, title: str = "") -> None:
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    axis.plot(fpr, tpr, color="tab:red", label=f"ROC AUC {auc:.4f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel(f"true positive rate (positive: {positive})")
    axis.legend(loc="lower right")
    axis.set_title(title or "ROC curve")
    _save(figure, path)


def comparison_rows(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The cross-run table: CSV rows and markdown, one row per run."""
    md_rows = []
    for r in results:
        bs, epoch, head = (r.get(k) if r.get(k) is not None else "-" for k in ("batch_size", "backbone_epoch",
                                                                              "head_epoch"))
        intervals = r.get("intervals") or {}
        # " [-]": bootstrapped, but a resample lacked a class (AUC on a tiny test set)
        cells = [percent_interval(r[name], intervals.get(name), " [-]" if intervals else "")
                 for name in INTERVAL_METRICS]
        md_rows.append([f"{bs} / {epoch} / {head}", *cells, r["network"], Path(r["run"]).name,
                        r.get("versus_best") or "-"])
    csv_rows = []
    for r in results:
        row = dict(r)
        for name in INTERVAL_METRICS + OPERATING_METRICS:
            low_high = (r.get("intervals") or {}).get(name) or [None, None]
            row[f"{name}_low"], row[f"{name}_high"] = low_high
        csv_rows.append(row)
    return csv_rows, markdown_table(COMPARISON_HEADERS, md_rows)


def operating_point_table(results: Sequence[dict[str, Any]]) -> str:
    """The two-class runs' decisions (threshold on the positive class's probability, chosen on val) and their
    sensitivity, specificity, balanced accuracy, AUROC and AUPRC with intervals; ``""`` when no run has two
    classes."""
    rows = []
    for r in results:
        if r.get("positive_class") is None:
            continue
        intervals = r.get("intervals") or {}
        threshold = "0.5 (arg-max)" if r.get("threshold") is None else f"{r['threshold']:.4g}"
        cells = [percent_interval(r.get(name), intervals.get(name), " [-]" if intervals else "")
                 for name in ("sensitivity", "specificity", "balanced_accuracy", "roc_auc", "auprc")]
        rows.append([Path(r["run"]).name, r.get("operating_point") or "argmax", r["positive_class"], threshold,
                     *cells])
    if not rows:
        return ""
    return ("\nTwo-class runs at their operating point (the threshold on the positive class's probability, "
            "chosen on val; AUROC and AUPRC do not depend on it):\n\n" + markdown_table(OPERATING_HEADERS, rows))
