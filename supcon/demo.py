"""``supcon-demo``: the whole pipeline on bundled real data (scikit-learn's digits), CPU-sized.

Runs the real commands, in order, as a user would type them:
``supcon-train`` -> ``probe-all --from auto`` -> ``baseline-train`` (a ResNet, and an RBF SVM on the
8x8 pixels) -> ``check-accuracies`` -> ``supcon-export`` -> ``predict`` -> ``supcon-report``.
Re-running it continues or reuses what is already done (every stage resumes or skips).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from supcon.cli_utils import OneLineErrorCommand, setup_logging
from supcon.digits import export_digits

#: Commands that also run as ``python -m linear_probe.use_cli NAME`` (an install that predates their console scripts).
_USE_COMMANDS = ("supcon-export", "predict", "supcon-report")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _command(name: str) -> list[str]:
    """The console script ``name`` from this environment (falls back to PATH, then ``python -m``)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return [str(local)]
    found = shutil.which(name)
    if not found and name in _USE_COMMANDS:
        return [sys.executable, "-m", "linear_probe.use_cli", name]
    if not found:
        raise click.ClickException(f"command {name!r} not found; install the package with pip install -e .")
    return [found]


def _run(step: str, args: list[str], threads: int) -> None:
    command = _command(args[0]) + args[1:]
    click.secho(f"\n==> {step}\n$ {shlex.join([args[0], *args[1:]])}", fg="cyan", err=True)
    start = time.perf_counter()
    # CPU kernels split sums over threads, so the thread count changes the numbers (ResNet-18, one batch of
    # 32 at 32 px: outputs differ by up to 3e-7 and conv1 gradients by 7e-5 between 1 and 2 threads) and
    # the differences compound over training: pin it so a fresh clone can reproduce the README's table
    environment = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    completed = subprocess.run(command, env=environment)
    if completed.returncode != 0:
        raise click.ClickException(f"{step} failed (exit {completed.returncode}); see the messages above")
    click.secho(f"    {step}: {time.perf_counter() - start:.0f} s", fg="cyan", err=True)


@click.command(cls=OneLineErrorCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(file_okay=False), default="demo", show_default=True,
              help="Where the digits folder and the runs go.")
@click.option("--epochs", type=int, default=60, show_default=True, help="SupCon epochs.")
@click.option("--model", default="resnet18", show_default=True, help="timm encoder for SupCon and the baseline.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--size", type=int, default=32, show_default=True, help="Image size the digits are upscaled to.")
@click.option("--baseline-epochs", type=int, default=15, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of supcon-train, probe-all and baseline-train (the digits split stays the same).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="CPU threads of every step (OMP/MKL/OpenBLAS); pinned because CPU numerics depend on it.")
def demo_command(workdir: str, epochs: int, model: str, batch_size: int, size: int, baseline_epochs: int,
                 num_workers: int, seed: int, threads: int):
    """Run the whole pipeline on scikit-learn's handwritten digits (10 classes), on CPU in minutes."""
    setup_logging()
    start = time.perf_counter()
    root = Path(workdir)
    data = export_digits(root / "digits", size=size)
    runs = root / "runs"
    supcon_run = runs / f"supcon_{model}_bs{batch_size}"
    baseline_run = runs / f"baseline_{model}"
    svm_run = runs / "svm_pixels"
    save_freq = max(1, epochs // 12)
    _run("1/8 SupCon pretraining", [
        "supcon-train", "--data-folder", str(data / "train"), "--model", model, "--size", str(size),
        "--batch-size", str(batch_size), "--epochs", str(epochs), "--save-freq", str(save_freq),
        "--knn-every", str(save_freq), "--num-workers", str(num_workers), "--run-dir", str(supcon_run), "--resume",
        "--seed", str(seed),
        # a mirrored digit is not the same digit (or no digit): no flips for this data
        "--no-flip",
    ], threads)
    _run("2/8 linear probes on the checkpoints", [
        # the default head: L-BFGS logistic regression, its regularisation chosen on val (1,078 training
        # images make the features separable, so an unregularised head would fit them with huge weights)
        "probe-all", "--run", str(supcon_run), "--from", "auto",
        "--num-workers", str(num_workers), "--seed", str(seed),
    ], threads)
    _run("3/8 supervised baseline", [
        "baseline-train", "--data-folder", str(data / "train"), "--model", model, "--size", str(size),
        "--epochs", str(baseline_epochs), "--batch-size", "64", "--num-workers", str(num_workers),
        "--run-dir", str(baseline_run), "--resume", "--seed", str(seed),
    ], threads)
    _run("4/8 classical baseline: RBF SVM on the pixels", [
        # the digits' own 8x8 resolution; C and gamma chosen on val (see baseline-train --help)
        "baseline-train", "--model", "svm", "--size", "8", "--data-folder", str(data / "train"),
        "--num-workers", str(num_workers), "--run-dir", str(svm_run), "--resume",
    ], threads)
    _run("5/8 test metrics and comparison", [
        "check-accuracies", "--run", str(supcon_run), "--run", str(baseline_run), "--run", str(svm_run),
        "--output", str(root),
    ], threads)
    export_dir = root / "export"
    _run("6/8 export the selected model (plain timm weights)", [
        "supcon-export", "--run", str(supcon_run), "--out", str(export_dir), "--force",
    ], threads)
    _run("7/8 classify images with it", [
        "predict", "--run", str(supcon_run), str(data / "test"), "--out", str(root / "predictions.csv"),
        "--num-workers", str(num_workers),
    ], threads)
    _run("8/8 report", ["supcon-report", "--run", str(supcon_run), "--run", str(baseline_run)], threads)
    click.echo(f"\nDone in {(time.perf_counter() - start) / 60:.1f} min.")
    click.echo(f"Comparison table: {root / 'comparison.md'}")
    click.echo(f"Plots: {supcon_run / 'probe'} (probe accuracy over the loss), "
               f"{supcon_run}, {baseline_run} and {svm_run} (confusion matrices)")
    click.echo(f"TensorBoard: tensorboard --logdir {runs}")
    click.echo(f"Exported model: {export_dir} (model.safetensors, classifier/); "
               f"predictions: {root / 'predictions.csv'}")
    click.echo(f"Report: {supcon_run / 'report' / 'index.html'} (and {baseline_run / 'report' / 'index.html'})")


main = demo_command
