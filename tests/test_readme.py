"""The README's option tables agree with each command's --help: every option listed, no stale ones, same defaults."""

from __future__ import annotations

import configparser
import importlib
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def console_scripts() -> dict[str, click.Command]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    commands = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        module, attribute = target.split(":")
        commands[name] = getattr(importlib.import_module(module), attribute)
    return commands


COMMANDS = console_scripts()


def option_table(command: str) -> list[tuple[list[str], str]]:
    """``(options named in the first cell, default cell)`` per row of the table in the README's ``### command``."""
    match = re.search(rf"^### {re.escape(command)}\n(.*?)(?=^##)", README, flags=re.S | re.M)
    assert match, f"README.md has no '### {command}' section"
    rows = []
    for line in match.group(1).splitlines():
        if not line.startswith("| `-"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # not at \|
        options = re.findall(r"(--[a-z][a-z0-9-]*)", cells[0])
        rows.append((options, cells[1] if len(cells) > 1 else ""))
    assert rows, f"README.md's '### {command}' section has no option table"
    return rows


def parameters(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_of_the_help_is_in_the_readme_table_and_no_other(name):
    command = COMMANDS[name]
    listed = {option for options, _ in option_table(name) for option in options}
    known = {opt for p in parameters(command) for opt in (*p.opts, *p.secondary_opts)}
    help_text = CliRunner().invoke(command, ["--help"], terminal_width=200).output
    missing = [p.opts[0] for p in parameters(command) if p.opts[0] not in listed]
    assert not missing, f"README.md's {name} table lacks {missing}"
    stale = sorted(listed - known)
    assert not stale, f"README.md's {name} table lists {stale}, which {name} --help does not have"
    assert all(p.opts[0] in help_text for p in parameters(command))


def _literal(cell: str) -> str | None:
    """A default cell that states a value (a number or a `word`), else None (e.g. 'computed', 'auto')."""
    cell = cell.strip()
    if re.fullmatch(r"-?[0-9][0-9.e-]*", cell):
        return cell
    quoted = re.fullmatch(r"`([^`]*)`", cell)
    return quoted.group(1) if quoted else None


def _same(readme_value: str, default) -> bool:
    try:
        return float(readme_value) == float(default)
    except (TypeError, ValueError):
        return readme_value == str(default)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_readme_defaults_are_the_commands_defaults(name):
    by_option = {p.opts[0]: p for p in parameters(COMMANDS[name])}
    checked = 0
    for options, default_cell in option_table(name):
        primary = [o for o in options if o in by_option]
        values = [v.strip() for v in default_cell.split(", ")]
        if len(primary) != len(values):
            continue
        for option, value in zip(primary, values):
            literal = _literal(value)
            default = by_option[option].default
            if literal is None or isinstance(default, bool) or not isinstance(default, (int, float, str)):
                continue
            assert _same(literal, default), f"README.md: {name} {option} default {literal!r}, --help says {default!r}"
            checked += 1
    assert checked, f"no default of {name} was compared: the table's default column is not read"
