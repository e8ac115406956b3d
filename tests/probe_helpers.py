"""Helpers shared by the linear-probe tests: run copies, a probed run, file snapshots, CLI calls."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

_PROBED: dict[str, Path] = {}


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run (tests that change a run never touch the session fixture)."""
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def probed_run(trained_run: Path, tmp_path_factory) -> Path:
    """A session-wide copy of ``trained_run`` probed once with the defaults (treat as read-only)."""
    key = str(trained_run)
    if key not in _PROBED:
        from linear_probe.config import ProbeConfig
        from linear_probe.probe_all import probe_all

        run = copy_run(trained_run, tmp_path_factory.mktemp("probed") / "tiny_run")
        probe_all(ProbeConfig(run=str(run), num_workers=0))
        _PROBED[key] = run
    return _PROBED[key]


def snapshot(*folders: Path) -> dict[str, str]:
    """``{path: sha256}`` of every file under ``folders``: equal snapshots mean nothing was written."""
    files = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def invoke(command, args: list[str]):
    """Run a click command in-process; returns click's Result (exit_code, output, stderr)."""
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    """The single ``Error: ...`` line on stderr of a failed command (asserts there is exactly one line)."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line[:2].isdigit()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def edit_checkpoint(path: Path, change) -> None:
    """Load a checkpoint, let ``change(state)`` edit it, save it back (weights_only-loadable)."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def edit_run_config(run: Path, change) -> None:
    data = yaml.safe_load((run / "config.yaml").read_text())
    change(data)
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


class MarkerOnUnpickle:
    """Unpickling this creates ``marker``: a stand-in for a malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious(path: Path, marker: Path) -> None:
    """A torch file whose loading with full unpickling would create ``marker``."""
    torch.save({"format": "supcon-checkpoint", "payload": MarkerOnUnpickle(marker)}, path)


