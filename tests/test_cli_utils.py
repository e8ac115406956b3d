"""Helpers shared by the command-line shells: progress bars only at a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from supcon.cli_utils import show_progress
from tests.probe_helpers import copy_run


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
