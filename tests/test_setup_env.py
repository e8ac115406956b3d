"""scripts/setup_env.sh, run in a copy of the repository with a stand-in python (nothing is installed): it stops
with one line when the interpreter cannot make a venv, and otherwise installs the extras ruff comes with."""

from __future__ import annotations

import configparser
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: A stand-in for python3 and for the venv's python: logs its arguments; ``-c CODE`` exits with $IMPORT_STATUS;
#: ``-m venv DIR`` makes DIR/bin/python a copy of itself.
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "$CALLS"
if [ "$1" = "-c" ]; then exit "$IMPORT_STATUS"; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
exit 0
"""


def run_setup(tmp_path: Path, import_status: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup_env.sh", tmp_path / "scripts" / "setup_env.sh")
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.log"
    completed = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup_env.sh")], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CALLS": str(calls), "IMPORT_STATUS": str(import_status)})
    return completed, calls.read_text().splitlines() if calls.exists() else []


def test_a_python_without_venv_stops_with_one_line_naming_the_package(tmp_path):
    completed, calls = run_setup(tmp_path, import_status=1)
    assert completed.returncode == 1
    assert completed.stderr.count("\n") == 1
    assert "apt-get install python3-venv" in completed.stderr
    assert not any("-m venv" in call for call in calls)  # stopped before trying
    assert not (tmp_path / ".venv").exists()


def test_the_set_up_installs_the_extra_that_brings_ruff(tmp_path):
    completed, calls = run_setup(tmp_path, import_status=0)
    assert completed.returncode == 0, completed.stderr
    assert any(call.endswith("-m venv .venv") for call in calls)
    installs = [call for call in calls if "pip install" in call and " -e " in call]
    assert len(installs) == 1, calls
    extras = installs[0].partition(".[")[2].partition("]")[0].split(",")
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    installed = "\n".join(parser["options.extras_require"][extra] for extra in extras)
    assert "ruff" in installed  # README: `ruff check .` works after set-up
    assert {"test", "docs"} <= set(extras)
    assert (tmp_path / ".venv" / ".supcon-installed").is_file()
