"""``probe-all`` and ``check-accuracies``: thin click shells over :mod:`linear_probe.probe_all` and :mod:`.check`."""

from __future__ import annotations

import click

from linear_probe.config import AVERAGES, HEAD_SOLVERS, SELECTION_RULES, CheckConfig, ProbeConfig
from linear_probe.operating_point import RULE_FORMS, parse_rule
from supcon.cli_utils import OneLineErrorCommand, resolve_command_config, setup_logging, show_progress
from supcon.errors import UserError

P = ProbeConfig()
C = CheckConfig()
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
NOT_CONFIG = ("config", "quiet", "verbose")


def _shared_options(defaults, section: str):
    """The options both commands end with: loader processes, device, split-named classes, --config, --quiet,
    --verbose."""
    options = [
        click.option("--num-workers", type=int, default=defaults.num_workers, show_default=True,
                     help="Data-loading processes."),
        click.option("--device", type=str, default=defaults.device, show_default=True,
                     help="auto (GPU if any), cpu or cuda[:N]."),
        click.option("--allow-split-class-names", is_flag=True,
                     help="Accept class folders named like dataset splits (train/val/test) [default: as the run "
                          "was trained]."),
        click.option("--config", type=click.Path(dir_okay=False),
                     help=f"YAML options (section '{section}:'); the command line wins."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--verbose", is_flag=True, help="Debug logging."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


class OperatingPointRule(click.ParamType):
    """``--operating-point``: refused by the parser, in one line, unless :func:`parse_rule` accepts it."""

    name = "RULE"

    def convert(self, value, param, ctx):
        try:
            return str(parse_rule(value))
        except UserError as exc:
            self.fail(str(exc).removeprefix("--operating-point "), param, ctx)


def _command_config(ctx: click.Context, cls: type, section: str, config_path: str | None, verbose: bool):
    setup_logging(verbose)
    return resolve_command_config(ctx, cls, config_path, section=section, skip=NOT_CONFIG)


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", type=str, help="Run directory [default: the most recent SupCon run under --runs-root].")
@click.option("--runs-root", type=str, default=P.runs_root, show_default=True, help="Where runs live.")
@click.option("--from", "from_epoch", type=str,
              help="First backbone epoch to probe, or 'auto' (where the loss curve plateaus) [default: all].")
@click.option("--to", "to_epoch", type=int, help="Last backbone epoch to probe [default: all].")
@click.option("--train-folder", type=str, help="[default: the run's recorded training folder]")
@click.option("--val-folder", type=str,
              help="[default: the run's recorded val folder, else a sibling 'val' of the train folder]")
@click.option("--batch-size", type=int, default=P.batch_size, show_default=True, help="SGD head: mini-batch size.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=P.learning_rate, show_default=True)
@click.option("--momentum", type=float, default=P.momentum, show_default=True)
@click.option("--weight-decay", type=float, default=P.weight_decay, show_default=True)
@click.option("--epochs", "--head-epochs", "epochs", type=int, default=P.epochs, show_default=True,
              help="SGD head: epochs (the encoder is frozen).")
@click.option("--cosine/--no-cosine", default=P.cosine, show_default=True,
              help="SGD head: cosine schedule, else constant.")
@click.option("--augment", is_flag=True,
              help="Classic protocol: fresh augmented crops through the encoder every head epoch (slow).")
@click.option("--head-solver", type=click.Choice(HEAD_SOLVERS), default=P.head_solver,
              help="lbfgs: logistic regression by L-BFGS on the cached features, C chosen on val from 1e-4..1e4 "
                   "(the SimCLR/CLIP linear evaluation; seconds); sgd: the recorded protocol (the options above) "
                   "[default: lbfgs; sgd with --augment].")
@click.option("--force", is_flag=True, help="Re-probe checkpoints already probed with the same settings.")
@click.option("--seed", type=int, default=P.seed, show_default=True, help="Head init, batch order and crops.")
@click.option("--auto-tolerance", type=float, default=P.auto_tolerance, show_default=True,
              help="--from auto: share of the loss range still allowed to fall after the plateau starts.")
@click.option("--encode-batch-size", type=int, default=P.encode_batch_size, show_default=True,
              help="Images per encoder forward pass.")
@click.option("--cache-dir", type=str, help="Feature cache [default: RUN/probe/cache].")
@_shared_options(P, "probe")
@click.pass_context
def probe_all_command(ctx: click.Context, config: str | None, quiet: bool, verbose: bool, **_):
    """Train a linear probe on every checkpoint of a run; keep each one's best val accuracy and head."""
    from linear_probe.probe_all import probe_all

    result = probe_all(_command_config(ctx, ProbeConfig, "probe", config, verbose), progress=show_progress(quiet))
    if result.auto is not None:
        click.echo(f"--from auto: backbone epoch {result.auto.epoch}, because {result.auto.reason}")
    click.echo(result.table_markdown)
    if result.corrupt:
        click.echo(f"not probed, unreadable (corrupt or truncated; left as they are): {', '.join(result.corrupt)}")
    if result.gone:
        click.echo(f"not probed, deleted while probe-all ran (a training's --keep-last): {', '.join(result.gone)}")
    if result.records:
        from linear_probe.select import DEFAULT_RULE, select

        selection = select(result.records)
        click.echo(f"selection on val (check-accuracies --select {DEFAULT_RULE}): {selection.note()}")
        if selection.advice():
            click.echo(selection.advice())
    click.echo(f"probed {len(result.probed)}, skipped {len(result.skipped)} already probed; results in "
               f"{result.probe_dir} ({', '.join(p.name for p in result.files.values())})")
    return 0


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT)
@click.option("--run", "runs", type=str, multiple=True,
              help="Run directory (repeatable) [default: every run under --runs-root with probe results, "
                   "or of kind baseline].")
@click.option("--runs-root", type=str, default=C.runs_root, show_default=True, help="Where runs live.")
@click.option("--test-folder", type=str,
              help="[default: the run's recorded test folder, else a sibling 'test' of its train folder]")
@click.option("--average", type=click.Choice(AVERAGES), default=C.average, show_default=True,
              help="Averaging of precision/recall/F1 over classes (per-class values go to the JSON).")
@click.option("--select", type=click.Choice(SELECTION_RULES), default=C.select, show_default=True,
              help="How a SupCon run's checkpoint is chosen on val: trend (settled val accuracy averaged over "
                   "neighbouring checkpoints; the latest within one standard error of the best), within-noise (the "
                   "lowest val loss of those within the 95% interval of the best) or max-val-acc (the recorded "
                   "experiments' rule).")
@click.option("--operating-point", type=OperatingPointRule(), default=C.operating_point, show_default=True,
              help=f"Two-class runs: how the decision threshold on the positive class's probability is chosen on "
                   f"the selected model's val predictions, then applied unchanged to test: {RULE_FORMS}. "
                   "recall>=X: the best val precision among the thresholds with val recall >= X; precision>=X and "
                   "specificity>=X: the best val recall. Recorded in RUN/operating_point.json for predict and "
                   "supcon-export.")
@click.option("--positive-class", type=str,
              help="Two-class runs: the positive class's name [default: the second class in sorted order].")
@click.option("--bootstrap", type=int, default=C.bootstrap, show_default=True,
              help="Bootstrap resamples of the test images for the 95% intervals and paired F1 differences (0: none).")
@click.option("--bootstrap-seed", type=int, default=C.bootstrap_seed, show_default=True,
              help="Seed of the bootstrap resampling.")
@click.option("--output", type=str, help="Folder of comparison.csv/.md [default: --runs-root].")
@click.option("--encode-batch-size", type=int, default=C.encode_batch_size, show_default=True)
@_shared_options(C, "check")
@click.pass_context
def check_accuracies_command(ctx: click.Context, config: str | None, quiet: bool, verbose: bool, **_):
    """Evaluate each run's best-by-validation model once on the test folder; print the comparison table."""
    from linear_probe.check import check_accuracies

    result = check_accuracies(_command_config(ctx, CheckConfig, "check", config, verbose),
                              progress=show_progress(quiet))
    click.echo(result.table_markdown)
    click.echo(f"table: {result.files['csv']}, {result.files['markdown']}; per run: test_metrics.json, "
               "confusion_matrix.png (two classes: roc_curve.png, operating_point.json)")
    return 0


probe_all_main = probe_all_command
check_accuracies_main = check_accuracies_command
