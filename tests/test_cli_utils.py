"""Helpers shared by the command-line shells: progress bars only at a terminal; every command's ``--help``."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from supcon.cli_utils import show_progress
from tests.conftest import REPO, console_scripts
from tests.probe_helpers import copy_run

SCRIPTS = console_scripts()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_at_a_terminal_and_never_when_quiet():
    assert show_progress(quiet=False, stream=Terminal()) is True
    assert show_progress(quiet=True, stream=Terminal()) is False
    assert show_progress(quiet=False, stream=io.StringIO()) is False  # a log file or a pipe
    assert show_progress(quiet=False, stream=object()) is False  # a stream without isatty


def test_probe_all_into_a_log_file_writes_log_lines_without_bar_redraws(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")  # not probed yet: the nested encoding bars would run
    log = tmp_path / "probe.log"
    with open(log, "w") as stderr:
        completed = subprocess.run(
            [sys.executable, "-c", "from linear_probe.cli import probe_all_main; probe_all_main()",
             "--run", str(run), "--num-workers", "0", "--head-solver", "sgd", "--epochs", "3"],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    text = log.read_text()
    assert completed.returncode == 0, text
    assert "best val accuracy" in text  # the per-checkpoint log lines are there
    assert "\x1b[" not in text and "\r" not in text  # no cursor moves or carriage-return redraws


def test_setup_cfg_lists_the_commands_the_docs_name():
    assert {"supcon-train", "probe-all", "check-accuracies", "baseline-train", "predict", "supcon-export",
            "supcon-report"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_shows_single_percent_signs(name):
    # click does not %-format help text, so a "%%" written for %-formatting reaches the reader doubled
    module, attribute = SCRIPTS[name]
    command = getattr(importlib.import_module(module), attribute)
    result = CliRunner().invoke(command, ["--help"], prog_name=name)
    assert result.exit_code == 0, result.output
    assert f"Usage: {name}" in result.output
    assert "%%" not in result.output


def test_help_imports_neither_torch_nor_timm():
    # --help of every command must not pay for torch/timm (seconds): their imports belong inside the commands
    modules = sorted({module for module, _ in SCRIPTS.values()})
    code = ("import importlib, sys\n"
            f"for module in {modules!r}:\n"
            "    importlib.import_module(module)\n"
            "print(' '.join(sorted(name for name in ('torch', 'timm') if name in sys.modules)))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "", f"importing {modules} loads {completed.stdout.strip()}"
