"""Commands that use a run's selected model: ``supcon-export``, ``predict`` and ``supcon-report``.

Thin click shells over :mod:`linear_probe.export`, :mod:`linear_probe.predict` and
:mod:`linear_probe.run_report`, whose library modules never import this one; only the entry point
``linear_probe/run_report/__main__.py`` does, so that ``python -m linear_probe.run_report`` is ``supcon-report``.
``python -m linear_probe.use_cli NAME ...`` runs the command NAME (an install older than these console scripts
has no ``supcon-export`` on its PATH).
"""

from __future__ import annotations

import click

from supcon.cli_utils import OneLineErrorCommand, setup_logging, show_progress

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
CHECKPOINT_HELP = ("'selected' (the checkpoint + head check-accuracies selects, by validation only), 'last' "
                   "(the newest checkpoint), or a backbone epoch.")


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", "run_dir", required=True, help="Run directory (SupCon, probed; or baseline).")
@click.option("--checkpoint", default="selected", show_default=True, help=CHECKPOINT_HELP)
@click.option("--out", "out_dir", required=True, help="Output folder (model.safetensors, config.json, classifier/).")
@click.option("--onnx", is_flag=True, help="Also write ONNX files (dynamic batch), checked with onnxruntime.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def export_command(run_dir: str, checkpoint: str, out_dir: str, onnx: bool, force: bool, verbose: bool):
    """Export a run's encoder and classifier as timm weights (safetensors) that load in plain timm."""
    from linear_probe.export import export_run, timm_loading_call

    setup_logging(verbose)
    result = export_run(run_dir, out_dir, checkpoint, onnx=onnx, force=force)
    source = result.config["supcon_export"]["source"]
    click.echo(f"exported {source['checkpoint']} of {run_dir} to {result.out_dir}:")
    for path in result.files.values():
        click.echo(f"  {path}")
    export = result.config["supcon_export"]
    if export["decision_threshold"] is not None:
        recorded = export["operating_point"]
        click.echo(f"decision: {export['positive_class']} when P({export['positive_class']}) >= "
                   f"{export['decision_threshold']:.4g} ("
                   + (f"operating point {recorded['rule']}, chosen on val" if recorded else "no operating point "
                      "recorded for this model: check-accuracies --operating-point RULE records one") + ")")
    for name, diff in result.onnx_max_abs_diff.items():
        click.echo(f"ONNX {name}: max abs difference to PyTorch {diff:.2e} (onnxruntime, CPU)")
    click.echo("load it with timm:\n" + timm_loading_call(result.config, result.out_dir))
    return 0


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", "run_dir", required=True, help="Run directory (SupCon, probed; or baseline).")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", default="predictions.csv", show_default=True, help="CSV file to write.")
@click.option("--checkpoint", default="selected", show_default=True, help=CHECKPOINT_HELP)
@click.option("--threshold", type=float,
              help="Two classes: predict the positive class when its probability is at least this [default: the "
                   "run's operating point recorded by check-accuracies (RUN/operating_point.json), else 0.5 on the "
                   "second class].")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="Data-loading processes.")
@click.option("--device", default="auto", show_default=True, help="auto (GPU if any), cpu or cuda[:N].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def predict_command(run_dir: str, images: tuple[str, ...], out: str, checkpoint: str, threshold: float | None,
                    batch_size: int, num_workers: int, device: str, quiet: bool, verbose: bool):
    """Classify IMAGES (files or folders, searched recursively) with a run's selected classifier.

    Writes one CSV row per image: path, predicted class, the probability of every class (two classes:
    also the positive class, its probability and the threshold, logged too). Unreadable files are listed and
    skipped; the exit code is then 3.
    """
    from linear_probe.predict import EXIT_SKIPPED, predict_images, write_predictions

    setup_logging(verbose)
    predictions = predict_images(run_dir, images, checkpoint, threshold, batch_size, num_workers, device,
                                 progress=show_progress(quiet))
    path = write_predictions(predictions, out)
    click.echo(f"{len(predictions.paths)} images classified -> {path}")
    if predictions.skipped:
        click.echo(f"skipped {len(predictions.skipped)} unreadable file(s):", err=True)
        for skipped, reason in predictions.skipped:
            click.echo(f"  {skipped}: {reason}", err=True)
        return EXIT_SKIPPED
    return 0


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", "runs", multiple=True, required=True,
              help="Run directory (repeatable); each gets RUN/report/index.html with the comparison of all.")
@click.option("--val-folder", help="[default: the run's recorded val folder, else a sibling 'val' of its train folder]")
@click.option("--test-folder",
              help="[default: the run's recorded test folder, else a sibling 'test' of its train folder]")
@click.option("--earlier-checkpoints", type=int, default=3, show_default=True,
              help="Earlier checkpoints whose val embeddings are mapped beside the selected one's.")
@click.option("--feature-map-images", type=int, default=3, show_default=True,
              help="Val images whose per-stage feature maps are shown.")
@click.option("--cam-images", type=int, default=12, show_default=True,
              help="Test images with Grad-CAM maps (the wrongly classified first).")
@click.option("--max-map-points", type=int, default=2000, show_default=True,
              help="At most this many val images in the embedding maps (a random subset beyond).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="Data-loading processes.")
@click.option("--device", default="auto", show_default=True, help="auto (GPU if any), cpu or cuda[:N].")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def report_command(runs: tuple[str, ...], verbose: bool, **options):
    """Write RUN/report/index.html: curves, probe accuracy, test metrics, embedding maps, feature maps, Grad-CAM."""
    from linear_probe.run_report import ReportConfig, build_reports

    setup_logging(verbose)
    pages = build_reports(ReportConfig(runs=list(runs), **options))
    for page in pages:
        click.echo(f"report: {page}")
    return 0


export_main = export_command
predict_main = predict_command
report_main = report_command

#: The commands by their console-script names, for ``python -m linear_probe.use_cli NAME``.
COMMANDS = {"supcon-export": export_command, "predict": predict_command, "supcon-report": report_command}

if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m linear_probe.use_cli {{{'|'.join(COMMANDS)}}} [OPTIONS]")
    name = sys.argv.pop(1)
    COMMANDS[name].main(prog_name=name)
