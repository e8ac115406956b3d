"""``supcon-report``: ``RUN/report/index.html`` for each run given, with the figures also as PNGs.

Per run: configuration and timing; the training curves (loss with the collapsed level, LR, kNN,
spread; the ``--from auto`` plateau, the first probed and the selected checkpoint); probe accuracy per
checkpoint; the selected classifier's test metrics, confusion matrix and ROC (two classes); a 2-D map
of the val embeddings of the selected checkpoint beside a few earlier ones; per-stage feature maps of
a few val images; Grad-CAM maps of test images, the wrongly classified first; and the comparison
table of all the runs given. The model is the one ``check-accuracies`` evaluates (selection by
validation only) and the test metrics are computed the same way, so the numbers agree.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linear_probe.checkpoints import find_checkpoints
from linear_probe.classifier import RunClassifier, load_run_classifier, resolve_eval_folder
from linear_probe.features import FeatureCache, FrozenCheckpoint, FrozenFeatures, folder_fingerprint
from linear_probe.heads import load_head_records
from linear_probe.predict import classify_paths
from linear_probe.probe import describe_settings
from linear_probe.probe_start import choose_from_run
from linear_probe.run_report import figures
from linear_probe.run_report.network_views import (
    class_activation_maps,
    embedding_map,
    embedding_method,
    has_stages,
    stage_activations,
    to_display,
)
from linear_probe.run_report.page import Section, render
from linear_probe.runs import RunInfo, RunKind, scan_checked
from linear_probe.tables_and_plots import plot_confusion_matrix, plot_roc
from supcon.checkpoint import atomic_write_text
from supcon.data import EvalDataset, ImageFolderIndex, eval_transform
from supcon.errors import UserError
from supcon.frozen import encode_samples, resolve_device
from supcon.metrics import TestMetrics, classification_metrics
from supcon.rundir import METRICS_FILE, MetricsCSV

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"


@dataclass
class ReportConfig:
    """Options of ``supcon-report``."""

    runs: list[str] = field(default_factory=list)
    val_folder: str | None = None
    test_folder: str | None = None
    earlier_checkpoints: int = 3
    feature_map_images: int = 3
    cam_images: int = 12
    max_map_points: int = 2000
    batch_size: int = 128
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if not self.runs:
            raise UserError("give at least one --run DIR")
        for name in ("earlier_checkpoints", "feature_map_images", "cam_images"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.max_map_points < 10:
            raise UserError("--max-map-points must be >= 10")


@dataclass
class _RunTest:
    """A run's selected classifier and its test-folder results (for its page and the comparison table)."""

    classifier: RunClassifier
    index: ImageFolderIndex
    paths: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    metrics: TestMetrics


def _test_results(classifier: RunClassifier, config: ReportConfig, device: torch.device) -> _RunTest:
    folder = resolve_eval_folder(classifier, "test", config.test_folder)
    index = scan_checked(folder, "test folder", classifier.class_names, classifier.run.allows_split_names)
    paths = [p for p, _ in index.samples]
    kept, probabilities, skipped = classify_paths(classifier, paths, device, config.batch_size, config.num_workers)
    if skipped:
        raise UserError(f"unreadable test image {skipped[0][0]}: {skipped[0][1]}; fix or remove it")
    labels = np.array([label for _, label in index.samples])
    metrics = classification_metrics(labels, probabilities, classifier.class_names)
    return _RunTest(classifier, index, paths, labels, probabilities, metrics)


def build_reports(config: ReportConfig, progress: bool = False) -> list[Path]:
    """Write ``RUN/report/index.html`` (+ PNGs) for every run in ``config.runs``; returns the pages.

    Raises:
        UserError: no run, not a run directory, a SupCon run never probed, missing/empty val or test
            folder, class names that differ, an unreadable test image. Checked for every run before
            any report is written.
    """
    config.validate()
    device = resolve_device(config.device)
    classifiers = [load_run_classifier(run) for run in config.runs]
    for classifier in classifiers:  # the folders of every run, before any work
        resolve_eval_folder(classifier, "val", config.val_folder)
        resolve_eval_folder(classifier, "test", config.test_folder)
    tests = [_test_results(c, config, device) for c in classifiers]
    pages = []
    for test in tests:
        start = time.perf_counter()
        pages.append(_build_one(test, tests, config, device))
        logger.info("report of %s: %s (%.0f s)", test.classifier.run.run_dir, pages[-1], time.perf_counter() - start)
    return pages


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _run_label(classifier: RunClassifier) -> str:
    if classifier.kind is RunKind.BASELINE:
        return str(classifier.source.get("description") or f"{classifier.model_name} (baseline)")
    return f"SupCon {classifier.model_name}"


def _comparison(tests: list[_RunTest], current: _RunTest) -> Section:
    section = Section("Comparison of the runs")
    rows = []
    for test in tests:
        c, m = test.classifier, test.metrics
        head = c.source.get("head_epoch")
        rows.append([c.run.run_dir.name, _run_label(c),
                     f"{c.run.global_batch} / {c.source['backbone_epoch']} / {head if head is not None else '-'}",
                     _percent(c.source.get("val_accuracy")), _percent(m.accuracy), _percent(m.precision),
                     _percent(m.recall), _percent(m.f1), "-" if m.roc_auc is None else f"{m.roc_auc:.4f}",
                     m.num_samples])
    section.table(["run", "network", "bs / backbone epoch / head epoch", "val accuracy", "test accuracy",
                   "precision (macro)", "recall (macro)", "F1 (macro)", "ROC AUC", "test images"], rows,
                  highlight=tests.index(current))
    section.text("Each run's model is chosen on validation only (as check-accuracies does) and evaluated once on "
                 "its test folder; this run is highlighted.", note=True)
    return section


def _config_section(run: RunInfo, classifier: RunClassifier) -> Section:
    section = Section("Configuration and timing")
    keys = ["model", "pretrained", "small_input", "size", "batch_size", "epochs", "learning_rate", "optimizer",
            "temp", "method", "head", "freeze", "loss", "weight_decay", "cosine", "scheduler", "crop_min", "flip",
            "augment", "precision", "seed"]
    rows = [[k, run.config[k]] for k in keys if k in run.config]
    info = run.run_info
    rows += [["classes", ", ".join(classifier.class_names)], ["mean / std", f"{classifier.mean} / {classifier.std}"],
             ["training folder", run.train_folder], ["processes / global batch",
                                                      f"{info.get('num_processes', 1)} / {run.global_batch}"],
             ["device", info.get("device", "-")]]
    section.table(["setting", "value"], rows)
    metrics_rows = _metrics_rows(run)
    seconds = [float(r["epoch_seconds"]) for r in metrics_rows if r.get("epoch_seconds") not in (None, "")]
    speed = [float(r["images_per_s"]) for r in metrics_rows if r.get("images_per_s") not in (None, "")]
    timing = [["epochs logged", len(metrics_rows)],
              ["training time", f"{sum(seconds) / 60:.1f} min ({np.mean(seconds):.1f} s/epoch)" if seconds else "-"],
              ["throughput", f"{np.mean(speed):.0f} images/s (mean over epochs)" if speed else "-"]]
    if run.kind is RunKind.SUPCON:
        records = load_head_records(run.probe_dir, run.run_dir)
        timing.append(["probing", f"{len(records)} heads, {sum(r.seconds for r in records):.0f} s"])
    section.table(["timing", "value"], timing)
    versions = info.get("versions") or {}
    if versions:
        section.text("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), note=True)
    return section


def _metrics_rows(run: RunInfo) -> list[dict[str, str]]:
    path = run.run_dir / METRICS_FILE
    return MetricsCSV(path, []).read() if path.is_file() else []


def _curves_section(test: _RunTest, out: Path) -> Section:
    c, run = test.classifier, test.classifier.run
    section = Section("Training curves")
    rows = _metrics_rows(run)
    if not rows:
        return section.text(f"{run.run_dir / METRICS_FILE} is missing: no curves.", note=True)
    png = out / "curves.png"
    if c.kind is RunKind.BASELINE:
        figures.plot_baseline_curves(png, rows, c.source["backbone_epoch"], f"{run.run_dir.name}: baseline training")
        return section.figures([(png, "loss, accuracy and learning rate per epoch; green: the selected epoch")])
    try:
        plateau = choose_from_run(run.run_dir)
    except UserError as exc:
        plateau = None
        section.text(f"No plateau: {exc}", note=True)
    records = load_head_records(run.probe_dir, run.run_dir)
    first = min(r.backbone_epoch for r in records)
    figures.plot_supcon_curves(png, rows, plateau, first, c.source["backbone_epoch"],
                               f"{run.run_dir.name}: SupCon training")
    section.figures([(png, "loss with its collapsed level, learning rate, online kNN accuracy and spread; dotted: "
                           "the --from auto plateau, dashed: the first probed checkpoint, green: the selected one")])
    if plateau is not None:
        section.text(f"--from auto would start at epoch {plateau.epoch}: {plateau.reason}.", note=True)
    return section


def _probe_section(test: _RunTest, out: Path) -> Section:
    c, run = test.classifier, test.classifier.run
    section = Section("Probe accuracy per checkpoint")
    records = load_head_records(run.probe_dir, run.run_dir)
    best_per_checkpoint: dict[tuple[int, int], Any] = {}
    for r in records:
        key = (r.backbone_epoch, r.steps_into_epoch)
        if key not in best_per_checkpoint or r.best_val_accuracy > best_per_checkpoint[key].best_val_accuracy:
            best_per_checkpoint[key] = r
    ordered = [best_per_checkpoint[k] for k in sorted(best_per_checkpoint)]
    png = out / "probe_accuracy.png"
    figures.plot_probe_accuracy(png, [r.backbone_epoch for r in ordered], [r.best_val_accuracy for r in ordered],
                                c.source["backbone_epoch"], f"{run.run_dir.name}: linear probe per checkpoint")
    section.figures([(png, "best val accuracy of the linear head per checkpoint; star: the selected checkpoint")])
    selected = next((i for i, r in enumerate(ordered) if r.checkpoint == c.source["checkpoint"]), None)
    section.table(["checkpoint", "backbone epoch", "best val accuracy", "head epoch", "val loss", "probe"],
                  [[r.checkpoint, r.backbone_epoch, _percent(r.best_val_accuracy), r.best_head_epoch,
                    f"{r.best_val_loss:.4f}", describe_settings(r.settings)] for r in ordered], highlight=selected)
    return section


def _test_section(test: _RunTest, out: Path) -> Section:
    c, m = test.classifier, test.metrics
    section = Section("Test metrics of the selected model")
    section.text(f"Selected: {c.describe()} (val accuracy {_percent(c.source.get('val_accuracy'))}); test folder "
                 f"{test.index.root}, {m.num_samples} images.")
    section.table(["accuracy", "precision (macro)", "recall (macro)", "F1 (macro)", "ROC AUC"],
                  [[_percent(m.accuracy), _percent(m.precision), _percent(m.recall), _percent(m.f1),
                    "-" if m.roc_auc is None else f"{m.roc_auc:.4f}"]])
    section.table(["class", "precision", "recall", "F1", "test images"],
                  [[name, _percent(v["precision"]), _percent(v["recall"]), _percent(v["f1"]), v["support"]]
                   for name, v in m.per_class.items()])
    images = [(out / "confusion_matrix.png", "confusion matrix (rows: true class, columns: predicted)")]
    plot_confusion_matrix(images[0][0], m.confusion_matrix, m.class_names,
                          f"{c.run.run_dir.name}: test accuracy {100 * m.accuracy:.2f}%")
    if m.roc_curve is not None:
        images.append((out / "roc_curve.png", f"ROC curve, positive class {m.class_names[1]}"))
        plot_roc(images[1][0], m.roc_curve["fpr"], m.roc_curve["tpr"], m.roc_auc, m.class_names[1],
                 f"{c.run.run_dir.name}: ROC")
    return section.figures(images)


def _map_sample(index: ImageFolderIndex, limit: int, seed: int) -> list[int]:
    if len(index.samples) <= limit:
        return list(range(len(index.samples)))
    return sorted(np.random.default_rng(seed).choice(len(index.samples), limit, replace=False).tolist())


def _embedding_panels(test: _RunTest, val: ImageFolderIndex, config: ReportConfig,
                      device: torch.device) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(panel title, features, labels)]``: earlier checkpoints first, the selected one last."""
    c = test.classifier
    transform = eval_transform(c.size, c.mean, c.std)
    if c.kind is RunKind.BASELINE:
        features, labels = encode_samples(_FeatureEncoder(c.network).to(device), val.samples, transform, device,
                                          config.batch_size, config.num_workers)
        return [(f"{c.source['checkpoint']} (epoch {c.source['backbone_epoch']})", features, labels)]
    run = c.run
    records = load_head_records(run.probe_dir, run.run_dir)
    accuracy = {}
    for r in records:
        accuracy[r.checkpoint] = max(accuracy.get(r.checkpoint, 0.0), r.best_val_accuracy)
    refs = [ref for ref in find_checkpoints(run.run_dir) if ref.backbone_epoch < c.source["backbone_epoch"]]
    if refs and config.earlier_checkpoints:
        picks = np.unique(np.linspace(0, len(refs) - 1, min(config.earlier_checkpoints, len(refs))).round())
        refs = [refs[int(i)] for i in picks]
    else:
        refs = []
    selected_path = run.run_dir / c.source["checkpoint"]
    panels = []
    fingerprint = folder_fingerprint(val)
    frozen = FrozenFeatures(FeatureCache(run.cache_dir), c.size, config.batch_size, config.num_workers)
    for name, path, epoch in [(r.name, r.path, r.backbone_epoch) for r in refs] + [
            (c.source["checkpoint"], selected_path, c.source["backbone_epoch"])]:
        features, labels = frozen.of(FrozenCheckpoint(path, device), val, "val images for the embedding map",
                                     fingerprint)
        probe = f", probe val {_percent(accuracy[name])}" if name in accuracy else ""
        selected = " - selected" if path == selected_path else ""
        panels.append((f"epoch {epoch}{probe}{selected}", features, labels))
    return panels


class _FeatureEncoder(torch.nn.Module):
    """A classifier's feature extractor as a module (for :func:`encode_samples`)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        return self.network.features(images)


def _embedding_section(test: _RunTest, val: ImageFolderIndex, out: Path, config: ReportConfig,
                       device: torch.device) -> Section:
    c = test.classifier
    method = embedding_method()
    section = Section(f"Val embeddings over training ({method})")
    panels = _embedding_panels(test, val, config, device)
    chosen = _map_sample(val, config.max_map_points, config.seed)
    maps = [(title, embedding_map(features[chosen].numpy(), config.seed, method))
            for title, features, _ in panels]
    labels = panels[-1][2][chosen].numpy()
    png = out / "embeddings.png"
    figures.plot_embedding_maps(png, maps, labels, c.class_names, method,
                                f"{c.run.run_dir.name}: {method} of the encoder's val features, by class")
    section.figures([(png, f"{method} of the L2-normalised encoder features of {len(chosen)} val images, coloured "
                           "by their true class; left to right: earlier checkpoints, the selected one last")])
    if method == "t-SNE":
        section.text("t-SNE keeps neighbourhoods, not distances between clusters; install umap-learn for UMAP.",
                     note=True)
    return section


def _val_examples(val: ImageFolderIndex, count: int) -> list[int]:
    """One image per class in turn (first of each class), ``count`` in all."""
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(val.samples):
        by_class.setdefault(label, []).append(i)
    picks, round_ = [], 0
    while len(picks) < min(count, len(val.samples)):
        for label in sorted(by_class):
            if round_ < len(by_class[label]) and len(picks) < count:
                picks.append(by_class[label][round_])
        round_ += 1
    return picks


def _feature_map_section(test: _RunTest, val: ImageFolderIndex, out: Path, config: ReportConfig) -> Section:
    c = test.classifier
    section = Section("Feature maps per encoder stage")
    if not has_stages(c.network.encoder):
        return section.text(f"{c.model_name} is not a timm encoder; its stages are not listed, so no feature maps.",
                            note=True)
    picks = _val_examples(val, config.feature_map_images)
    dataset = EvalDataset([val.samples[i] for i in picks], eval_transform(c.size, c.mean, c.std))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    stages = stage_activations(c.network.encoder.cpu(), images)
    display = to_display(images, c.mean, c.std)
    files = []
    for n, index in enumerate(picks):
        path, label = val.samples[index]
        png = out / f"feature_maps_{n + 1}.png"
        figures.plot_stage_maps(png, display[n], [(name, act[n].numpy()) for name, act in stages],
                                f"{Path(path).name} (class {c.class_names[label]}): each stage's 8 most active "
                                "channels")
        files.append((png, f"val image {Path(path).name}, class {c.class_names[label]}"))
    section.figures(files)
    section.text("Rows: the encoder's stages (name, channels x height x width); first column the input, then the "
                 "mean over all channels, then the channels with the highest mean activation, on one colour scale "
                 "per row (dark: 0, yellow: the row's largest value).", note=True)
    return section


def _cam_section(test: _RunTest, out: Path, config: ReportConfig) -> Section:
    c = test.classifier
    section = Section("Class-activation maps (Grad-CAM) on test images")
    predicted = test.probabilities.argmax(1)
    wrong = [i for i in range(len(test.labels)) if predicted[i] != test.labels[i]]
    right = [i for i in range(len(test.labels)) if predicted[i] == test.labels[i]]
    rng = np.random.default_rng(config.seed)
    picks = wrong[:config.cam_images]
    if len(picks) < config.cam_images and right:
        extra = rng.choice(right, min(len(right), config.cam_images - len(picks)), replace=False)
        picks += sorted(int(i) for i in extra)
    if not picks:
        return section.text("no test images", note=True)
    dataset = EvalDataset([test.index.samples[i] for i in picks], eval_transform(c.size, c.mean, c.std))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    layer, maps = class_activation_maps(c.network, images, [int(predicted[i]) for i in picks])
    captions = [f"true {c.class_names[test.labels[i]]} / pred {c.class_names[predicted[i]]}\n"
                f"p={test.probabilities[i, predicted[i]]:.2f} {Path(test.paths[i]).name}" for i in picks]
    png = out / "grad_cam.png"
    figures.plot_cams(png, to_display(images, c.mean, c.std), maps, captions, [i in wrong for i in picks],
                      f"{c.run.run_dir.name}: Grad-CAM of the predicted class at {layer} ({len(wrong)} of "
                      f"{len(test.labels)} test images wrong; wrong ones first, red)")
    section.figures([(png, "where the selected classifier looked for its predicted class (red: high); red frames: "
                           "wrongly classified, green: correct")])
    return section


def _build_one(test: _RunTest, tests: list[_RunTest], config: ReportConfig, device: torch.device) -> Path:
    c = test.classifier
    run = c.run
    out = run.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    val = scan_checked(resolve_eval_folder(c, "val", config.val_folder), "val folder", c.class_names,
                       c.run.allows_split_names)
    # Results first (the comparison and the selected model's test metrics), then how they came about.
    sections = [_comparison(tests, test), _test_section(test, out), _curves_section(test, out)]
    if c.kind is RunKind.SUPCON:
        sections.append(_probe_section(test, out))
    sections += [_embedding_section(test, val, out, config, device), _feature_map_section(test, val, out, config),
                 _cam_section(test, out, config), _config_section(run, c)]
    subtitle = (f"{_run_label(c)} - {run.run_dir.resolve()} - selected {c.describe()} - written "
                f"{time.strftime('%Y-%m-%d %H:%M')} by supcon-report")
    page = out / INDEX
    atomic_write_text(render(f"Run report: {run.run_dir.name}", subtitle, sections), page)
    return page
