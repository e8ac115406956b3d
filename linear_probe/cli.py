"""``probe-all`` and ``check-accuracies``: thin click shells over :mod:`linear_probe.probe_all` and :mod:`.check`."""

from __future__ import annotations

import click

from linear_probe.config import AVERAGES, SELECTION_RULES, CheckConfig, ProbeConfig
from supcon.cli_utils import OneLineErrorCommand, resolve_command_config, setup_logging

P = ProbeConfig()
C = CheckConfig()
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
NOT_CONFIG = ("config", "quiet", "verbose")


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", type=str, help="Run directory [default: the most recent SupCon run under --runs-root].")
@click.option("--runs-root", type=str, default=P.runs_root, show_default=True, help="Where runs live.")
@click.option("--from", "from_epoch", type=str,
              help="First backbone epoch to probe, or 'auto' (where the loss curve plateaus) [default: all].")
@click.option("--to", "to_epoch", type=int, help="Last backbone epoch to probe [default: all].")
@click.option("--train-folder", type=str, help="[default: the run's recorded training folder]")
@click.option("--val-folder", type=str,
              help="[default: sibling 'val' of the train folder, else the run's recorded val folder]")
@click.option("--batch-size", type=int, default=P.batch_size, show_default=True, help="Head mini-batch size.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=P.learning_rate, show_default=True)
@click.option("--momentum", type=float, default=P.momentum, show_default=True)
@click.option("--weight-decay", type=float, default=P.weight_decay, show_default=True)
@click.option("--epochs", "--head-epochs", "epochs", type=int, default=P.epochs, show_default=True,
              help="Head epochs (the encoder is frozen).")
@click.option("--cosine/--no-cosine", default=P.cosine, show_default=True, help="Cosine head schedule, else constant.")
@click.option("--augment", is_flag=True,
              help="Classic protocol: fresh augmented crops through the encoder every head epoch (slow).")
@click.option("--force", is_flag=True, help="Re-probe checkpoints already probed with the same settings.")
@click.option("--seed", type=int, default=P.seed, show_default=True, help="Head init, batch order and crops.")
@click.option("--auto-tolerance", type=float, default=P.auto_tolerance, show_default=True,
              help="--from auto: share of the loss range still allowed to fall after the plateau starts.")
@click.option("--encode-batch-size", type=int, default=P.encode_batch_size, show_default=True,
              help="Images per encoder forward pass.")
@click.option("--num-workers", type=int, default=P.num_workers, show_default=True, help="Data-loading processes.")
@click.option("--device", type=str, default=P.device, show_default=True, help="auto (GPU if any), cpu or cuda[:N].")
@click.option("--cache-dir", type=str, help="Feature cache [default: RUN/probe/cache].")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML options (section 'probe:'); the command line wins.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def probe_all_command(ctx: click.Context, config: str | None, quiet: bool, verbose: bool, **_):
    """Train a linear probe on every checkpoint of a run; keep each one's best val accuracy and head."""
    from linear_probe.probe_all import probe_all

    setup_logging(verbose)
    probe_config = resolve_command_config(ctx, ProbeConfig, config, section="probe", skip=NOT_CONFIG)
    result = probe_all(probe_config, progress=not quiet)
    if result.auto is not None:
        click.echo(f"--from auto: backbone epoch {result.auto.epoch}, because {result.auto.reason}")
    click.echo(result.table_markdown)
    if result.records:
        from linear_probe.select import select

        click.echo(f"selection on val (check-accuracies --select within-noise): {select(result.records).note()}")
    click.echo(f"probed {len(result.probed)}, skipped {len(result.skipped)} already probed; results in "
               f"{result.probe_dir} ({', '.join(p.name for p in result.files.values())})")
    return 0


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", "runs", type=str, multiple=True,
              help="Run directory (repeatable) [default: every run under --runs-root with probe results, "
                   "or of kind baseline].")
@click.option("--runs-root", type=str, default=C.runs_root, show_default=True, help="Where runs live.")
@click.option("--test-folder", type=str, help="[default: sibling 'test' of each run's train folder]")
@click.option("--average", type=click.Choice(AVERAGES), default=C.average, show_default=True,
              help="Averaging of precision/recall/F1 over classes (per-class values go to the JSON).")
@click.option("--select", type=click.Choice(SELECTION_RULES), default=C.select, show_default=True,
              help="How a SupCon run's checkpoint is chosen on val: within-noise (the latest of those within one "
                   "standard error of the best settled val accuracy) or max-val-acc (the recorded experiments' rule).")
@click.option("--bootstrap", type=int, default=C.bootstrap, show_default=True,
              help="Bootstrap resamples of the test images for the 95%% intervals and paired F1 differences (0: none).")
@click.option("--bootstrap-seed", type=int, default=C.bootstrap_seed, show_default=True,
              help="Seed of the bootstrap resampling.")
@click.option("--output", type=str, help="Folder of comparison.csv/.md [default: --runs-root].")
@click.option("--encode-batch-size", type=int, default=C.encode_batch_size, show_default=True)
@click.option("--num-workers", type=int, default=C.num_workers, show_default=True, help="Data-loading processes.")
@click.option("--device", type=str, default=C.device, show_default=True, help="auto (GPU if any), cpu or cuda[:N].")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML options (section 'check:'); the command line wins.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def check_accuracies_command(ctx: click.Context, config: str | None, quiet: bool, verbose: bool, **_):
    """Evaluate each run's best-by-validation model once on the test folder; print the comparison table."""
    from linear_probe.check import check_accuracies

    setup_logging(verbose)
    check_config = resolve_command_config(ctx, CheckConfig, config, section="check", skip=NOT_CONFIG)
    result = check_accuracies(check_config, progress=not quiet)
    click.echo(result.table_markdown)
    click.echo(f"table: {result.files['csv']}, {result.files['markdown']}; per run: test_metrics.json, "
               "confusion_matrix.png (roc_curve.png for two classes)")
    return 0


probe_all_main = probe_all_command
check_accuracies_main = check_accuracies_command
