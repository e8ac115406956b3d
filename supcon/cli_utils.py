"""What every command shares: one-line errors, config resolution (--config, then the command line), logging."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from supcon.config import load_yaml, resolve, yaml_values_for
from supcon.errors import UserError

#: Keys of a run's config.yaml that are facts, not options (so a run's config can seed a new one).
IGNORED_CONFIG_KEYS = ("run_info",)  # supcon.rundir.RUN_INFO_KEY (not imported here: it loads torch)


class OneLineErrorCommand(click.Command):
    """A click command whose errors (bad option or bad input) are one line on stderr, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


def image_check_options(command):
    """The image-folder checks both trainers share: ``--skip-bad-images``, ``--allow-split-class-names`` and
    ``--allow-data-change``."""
    command = click.option(
        "--allow-data-change", is_flag=True,
        help="On --resume, continue although images were added, removed or renamed in the data folder since the "
             "run started (logged and recorded in config.yaml); otherwise such a resume is refused.")(command)
    command = click.option(
        "--allow-split-class-names", is_flag=True,
        help="Accept class folders named like dataset splits (train/val/test): only for a dataset whose classes "
             "really have those names; otherwise a dataset root given as an image folder is refused.")(command)
    return click.option("--skip-bad-images", is_flag=True,
                        help="Skip unreadable images instead of stopping (all are listed in RUN/bad_images.txt)."
                        )(command)


def show_progress(quiet: bool, stream=None) -> bool:
    """Progress bars only for a person at a terminal: off with ``--quiet`` and when stderr is not a TTY.

    A log file or a pipe gets the per-epoch / per-checkpoint log lines instead; tqdm's redraws
    (carriage returns, cursor-up escapes of nested bars) would only clutter it.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


def setup_logging(verbose: bool = False) -> None:
    """Log lines to stderr in a form that does not break tqdm bars."""
    from tqdm.auto import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            try:
                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:  # pragma: no cover
                self.handleError(record)

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    from supcon.distributed import rank as process_rank  # imports torch: not at --help time

    rank = process_rank()
    if rank:  # under torchrun / accelerate launch the other processes only report problems, with their rank
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "timm", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_command_config(ctx: click.Context, cls: type, config_path: str | None, section: str | None = None,
                           skip: tuple[str, ...] = ("config", "verbose")):
    """Build the command's config dataclass: defaults < ``--config`` YAML < options given on the command line.

    Args:
        ctx: the click context (tells which options the user typed).
        cls: the config dataclass.
        config_path: the ``--config`` file, or None.
        section: if the YAML holds a mapping under this key, only that mapping is used.
        skip: parameters that are not config fields.
    """
    yaml_values: dict[str, Any] = {}
    if config_path:
        data = load_yaml(config_path)
        if section and isinstance(data.get(section), dict):
            data = data[section]
        data = {k: v for k, v in data.items() if k not in IGNORED_CONFIG_KEYS}
        yaml_values = yaml_values_for(cls, data, config_path)
    cli_values = {}
    for name, value in ctx.params.items():
        if name in skip:
            continue
        source = ctx.get_parameter_source(name)
        if source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            cli_values[name] = value
    return resolve(cls, yaml_values, cli_values)
