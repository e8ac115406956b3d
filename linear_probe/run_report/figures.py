"""The report's figures (matplotlib ``Figure`` + Agg canvas, no pyplot state), each saved as a PNG.

Every figure has a title, labelled axes and, where colours mean something, a legend with the class
names. Confusion matrix and ROC are :mod:`linear_probe.tables_and_plots`'s plots.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from supcon.checkpoint import atomic_write_bytes


def _save(figure: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(buffer.getvalue(), path)


def _column(rows: Sequence[dict[str, str]], key: str) -> list[float | None]:
    values = []
    for row in rows:
        try:
            values.append(float(row[key]) if row.get(key) not in (None, "") else None)
        except ValueError:
            values.append(None)
    return values


def _plot_known(axis, epochs, values, **style) -> bool:
    pairs = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None and math.isfinite(v)]
    if pairs:
        axis.plot([e for e, _ in pairs], [v for _, v in pairs], **style)
    return bool(pairs)


def plot_supcon_curves(path: str | os.PathLike, rows: Sequence[dict[str, str]], plateau: Any | None,
                       first_probed: int | None, selected_epoch: int | None, title: str) -> None:
    """Loss (with the collapsed level), LR, kNN accuracy and spread per epoch, with the plateau and ``--from``."""
    epochs = [int(float(r["epoch"])) for r in rows]
    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    (loss_ax, lr_ax), (knn_ax, spread_ax) = axes
    _plot_known(loss_ax, epochs, _column(rows, "loss"), color="tab:blue", label="training loss")
    _plot_known(loss_ax, epochs, _column(rows, "collapsed_loss"), color="tab:blue", linestyle="--", alpha=0.5,
                label="collapsed level log(2B-1)")
    loss_ax.set(title="SupCon training loss", ylabel="loss")
    _plot_known(lr_ax, epochs, _column(rows, "lr"), color="tab:purple", label="learning rate")
    lr_ax.set(title="learning rate", ylabel="LR")
    if not _plot_known(knn_ax, epochs, [None if v is None else 100 * v for v in _column(rows, "knn_accuracy")],
                       color="tab:orange", marker="x", label="kNN val accuracy"):
        knn_ax.text(0.5, 0.5, "kNN monitor off", transform=knn_ax.transAxes, ha="center")
    knn_ax.set(title="online kNN accuracy (val)", ylabel="accuracy (%)", xlabel="backbone epoch")
    _plot_known(spread_ax, epochs, _column(rows, "spread"), color="tab:green", label="spread")
    spread_ax.set(title="embedding spread (0 = collapsed)", ylabel="mean per-dim std", xlabel="backbone epoch")
    marks = []
    if plateau is not None:
        marks.append((plateau.loss_epoch, "tab:red", ":", f"loss plateau (epoch {plateau.loss_epoch})"))
        if plateau.knn_epoch is not None:
            marks.append((plateau.knn_epoch, "tab:orange", ":", f"kNN plateau (epoch {plateau.knn_epoch})"))
    if first_probed is not None:
        marks.append((first_probed, "black", "--", f"first probed checkpoint (--from {first_probed})"))
    if selected_epoch is not None:
        marks.append((selected_epoch, "tab:green", "-", f"selected checkpoint (epoch {selected_epoch})"))
    mark_lines = []
    for axis in axes.flat:
        if axis.get_legend_handles_labels()[0] and axis is loss_ax:
            axis.legend(fontsize=8, loc="upper right")
        mark_lines = [axis.axvline(epoch, color=colour, linestyle=style, linewidth=1.4, label=label)
                      for epoch, colour, style, label in marks]
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if mark_lines:
        figure.legend(mark_lines, [m[3] for m in marks], loc="outside lower center", ncol=min(4, len(marks)),
                      fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def plot_baseline_curves(path: str | os.PathLike, rows: Sequence[dict[str, str]], best_epoch: int | None,
                         title: str) -> None:
    """Train/val loss, val accuracy and LR per epoch of a baseline run, with its best epoch."""
    epochs = [int(float(r["epoch"])) for r in rows]
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3, sharex=True)
    _plot_known(loss_ax, epochs, _column(rows, "train_loss"), color="tab:blue", marker=".", label="train loss")
    _plot_known(loss_ax, epochs, _column(rows, "val_loss"), color="tab:red", marker=".", label="val loss")
    loss_ax.set(title="loss", ylabel="cross-entropy", xlabel="epoch")
    _plot_known(acc_ax, epochs, [None if v is None else 100 * v for v in _column(rows, "train_accuracy")],
                color="tab:blue", marker=".", label="train accuracy")
    _plot_known(acc_ax, epochs, [None if v is None else 100 * v for v in _column(rows, "val_accuracy")],
                color="tab:red", marker=".", label="val accuracy")
    acc_ax.set(title="accuracy", ylabel="accuracy (%)", xlabel="epoch")
    _plot_known(lr_ax, epochs, _column(rows, "lr"), color="tab:purple", marker=".", label="learning rate")
    lr_ax.set(title="learning rate", ylabel="LR", xlabel="epoch")
    for axis in (loss_ax, acc_ax, lr_ax):
        if best_epoch:
            axis.axvline(best_epoch, color="tab:green", label=f"selected epoch {best_epoch}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    _save(figure, path)


def plot_probe_accuracy(path: str | os.PathLike, epochs: Sequence[int], accuracies: Sequence[float],
                        selected_epoch: int, title: str) -> None:
    """Best probe val accuracy per checkpoint, the selected one marked."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axis = figure.subplots()
    axis.plot(epochs, [100 * a for a in accuracies], marker="o", color="tab:red", label="best probe val accuracy")
    chosen = [100 * a for e, a in zip(epochs, accuracies, strict=True) if e == selected_epoch]
    if chosen:
        axis.plot([selected_epoch], [max(chosen)], marker="*", markersize=16, color="tab:green", linestyle="none",
                  label=f"selected (epoch {selected_epoch})")
    axis.set(title=title, xlabel="backbone epoch", ylabel="val accuracy (%)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)


def _class_colours(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def plot_embedding_maps(path: str | os.PathLike, panels: Sequence[tuple[str, np.ndarray]], labels: np.ndarray,
                        class_names: Sequence[str], method: str, title: str) -> None:
    """Side-by-side 2-D maps (one per checkpoint), points coloured by class, one legend."""
    count = len(panels)
    figure = Figure(figsize=(4.2 * count + 1.6, 4.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, count))
    colours = _class_colours(len(class_names))
    for axis, (panel_title, coords) in zip(axes, panels, strict=True):
        for index, name in enumerate(class_names):
            chosen = labels == index
            axis.scatter(coords[chosen, 0], coords[chosen, 1], s=9, color=colours[index], label=name, alpha=0.8)
        axis.set(title=panel_title, xlabel=f"{method} 1", ylabel=f"{method} 2", xticks=[], yticks=[])
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right center", title="class", markerscale=2)
    figure.suptitle(title)
    _save(figure, path)


def plot_stage_maps(path: str | os.PathLike, image: np.ndarray, stages: Sequence[tuple[str, np.ndarray]],
                    title: str, channels: int = 8) -> None:
    """One image's activations: a row per encoder stage, its most active channels (and their mean)."""
    rows = len(stages)
    figure = Figure(figsize=(1.35 * (channels + 2), 1.45 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, channels + 2, squeeze=False)
    for row, (name, activation) in enumerate(stages):  # activation [C, H, W]
        strength = activation.reshape(activation.shape[0], -1).mean(1)
        order = np.argsort(-strength)[:channels]
        # one colour scale per row, so a weak channel looks weak (and a 1x1 map still shows its value)
        scale = {"cmap": "viridis", "vmin": 0.0, "vmax": float(max(activation[order].max(), 1e-8))}
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f"{name}\n{activation.shape[0]}x{activation.shape[1]}x{activation.shape[2]}",
                                fontsize=8)
        axes[row, 1].imshow(activation.mean(0), cmap="viridis", vmin=0.0)
        if row == 0:
            axes[row, 0].set_title("input", fontsize=8)
            axes[row, 1].set_title("mean of all", fontsize=8)
        for col, channel in enumerate(order):
            axes[row, col + 2].imshow(activation[channel], **scale)
            axes[row, col + 2].set_title(f"ch {channel}", fontsize=7)
        for col in range(len(order) + 2, channels + 2):
            axes[row, col].set_visible(False)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def plot_cams(path: str | os.PathLike, images: np.ndarray, maps: np.ndarray, captions: Sequence[str],
              wrong: Sequence[bool], title: str, columns: int = 6) -> None:
    """Grad-CAM overlays, one tile per image with its true/predicted class; wrong ones framed red."""
    count = len(images)
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(2.2 * columns, 2.55 * rows + 0.6), layout="constrained")
    axes = np.atleast_2d(figure.subplots(rows, columns, squeeze=False))
    for index, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if index >= count:
            axis.set_visible(False)
            continue
        axis.imshow(images[index])
        axis.imshow(maps[index], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axis.set_title(captions[index], fontsize=7, color="tab:red" if wrong[index] else "black")
        for spine in axis.spines.values():
            spine.set_color("tab:red" if wrong[index] else "tab:green")
            spine.set_linewidth(3)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)
