"""The docs agree with the code: every command's page lists every option of its --help with the same default;
the README stays short; every relative link resolves; the module maps list every module; the site builds."""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import console_scripts

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
README_LIMIT_BYTES = 15 * 1024
#: The markdown files whose relative links must resolve: the README, the site's pages, the folders' READMEs.
FOLDER_READMES = [REPO / folder / "README.md" for folder in ("supcon", "linear_probe", "benchmarks")]
LINKED_FILES = sorted([README, *DOCS.rglob("*.md"), *(p for p in FOLDER_READMES if p.exists())])
#: What a default cell says for the loader processes, whose default is computed from the machine.
CORES_RULE = "min(8, cores)"


COMMANDS: dict[str, click.Command] = {name: getattr(importlib.import_module(module), attribute)
                                     for name, (module, attribute) in console_scripts().items()}


def command_page(command: str) -> Path:
    return DOCS / "commands" / f"{command}.md"


def split_cell(cell: str, count: int) -> list[str]:
    """A default cell's values, one per option of the row: split at ', ' outside backticks and parentheses."""
    if count == 1:
        return [cell.strip()]
    values, current, depth, in_code, i = [], "", 0, False, 0
    while i < len(cell):
        char = cell[i]
        if char == "`":
            in_code = not in_code
        elif not in_code and char in "()":
            depth += 1 if char == "(" else -1
        if not in_code and depth == 0 and cell.startswith(", ", i):
            values.append(current.strip())
            current, i = "", i + 2
            continue
        current += char
        i += 1
    values.append(current.strip())
    return values


def option_table(command: str) -> list[tuple[list[str], str]]:
    """``(options named in the first cell, default cell)`` per row of the table under the page's ``## Options``."""
    page = command_page(command)
    assert page.exists(), f"{command} has no page: {page.relative_to(REPO)}"
    match = re.search(r"^## Options\n(.*?)(?=^## |\Z)", page.read_text(), flags=re.S | re.M)
    assert match, f"{page.relative_to(REPO)} has no '## Options' section"
    rows = []
    for line in match.group(1).splitlines():
        if not line.startswith("| `-"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # not at \|
        options = re.findall(r"(--[a-z][a-z0-9-]*)", cells[0])
        rows.append((options, cells[1] if len(cells) > 1 else ""))
    assert rows, f"{page.relative_to(REPO)} has no option table"
    return rows


def parameters(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


_DEFAULTS_ON_OTHER_CORES = """
import json, os, sys
os.cpu_count = lambda: 5
sys.path.insert(0, sys.argv[1])
from tests.test_docs import COMMANDS, parameters
print(json.dumps({name: {p.opts[0]: repr(p.default) for p in parameters(c)} for name, c in COMMANDS.items()}))
"""


@functools.cache
def machine_dependent_defaults() -> set[tuple[str, str]]:
    """(command, option) pairs whose --help default follows the number of cores: it moves when os.cpu_count does."""
    result = subprocess.run([sys.executable, "-c", _DEFAULTS_ON_OTHER_CORES, str(REPO)], capture_output=True,
                            text=True, check=True, cwd=REPO, timeout=300)
    other = json.loads(result.stdout)
    return {(name, p.opts[0]) for name, command in COMMANDS.items() for p in parameters(command)
            if other[name][p.opts[0]] != repr(p.default)}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_of_the_help_is_on_the_command_page_and_no_other(name):
    command = COMMANDS[name]
    listed = {option for options, _ in option_table(name) for option in options}
    known = {opt for p in parameters(command) for opt in (*p.opts, *p.secondary_opts)}
    help_text = CliRunner().invoke(command, ["--help"], terminal_width=200).output
    missing = [p.opts[0] for p in parameters(command) if p.opts[0] not in listed]
    assert not missing, f"docs/commands/{name}.md lacks {missing}"
    stale = sorted(listed - known)
    assert not stale, f"docs/commands/{name}.md lists {stale}, which {name} --help does not have"
    assert all(p.opts[0] in help_text for p in parameters(command))


def _literal(value: str) -> str | None:
    """A value that states a number or a `word` (a trailing '(...)' note aside), else None ('computed', 'auto')."""
    value = re.sub(r"\s*\([^`]*\)$", "", value.strip())
    if re.fullmatch(r"-?[0-9][0-9.e-]*", value):
        return value
    quoted = re.fullmatch(r"`([^`]*)`", value)
    return quoted.group(1) if quoted else None


def _same(page_value: str, default) -> bool:
    try:
        return float(page_value) == float(default)
    except (TypeError, ValueError):
        return page_value == str(default)


def default_problem(command: str, option: click.Option, value: str) -> str | None:
    """Why ``value`` (the page's default cell for ``option``) does not say what --help's default is, or None."""
    default = option.default
    if not value:
        return "an empty default cell (write 'none' where there is none)"
    if option.required:
        return None if value == "required" else f"{value!r}, but the option is required: write 'required'"
    if option.is_flag and not option.secondary_opts:  # a plain switch: off unless given
        return None if value.startswith("off") else f"{value!r} for a switch that is off unless given"
    if isinstance(default, bool):
        expected = ("on", option.opts[0].lstrip("-")) if default else ("off",)
        return None if value.startswith(expected) else f"{value!r}, but the default is {'on' if default else 'off'}"
    if isinstance(default, (int, float, str)):
        if (command, option.opts[0]) in machine_dependent_defaults():
            cores = min(8, os.cpu_count() or 1)
            if value != CORES_RULE or default != cores:
                return f"{value!r}: the default follows the machine's cores ({default!r} here); write {CORES_RULE!r}"
            return None
        literal = _literal(value)
        if literal is None:
            return f"{value!r} where --help has the value {default!r}: state it"
        return None if _same(literal, default) else f"{literal!r}, --help says {default!r}"
    return None  # no fixed default (decided at run time): the page describes it


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_command_page_gives_every_default_as_the_help_does(name):
    by_option = {p.opts[0]: p for p in parameters(COMMANDS[name])}
    problems, compared = [], 0
    for options, default_cell in option_table(name):
        primary = [o for o in options if o in by_option]
        values = split_cell(default_cell, len(primary))
        if len(values) != len(primary):
            problems.append(f"{', '.join(primary)}: {len(primary)} options but {len(values)} defaults "
                            f"({default_cell!r}); one default per option")
            continue
        for option, value in zip(primary, values):
            problem = default_problem(name, by_option[option], value)
            if problem:
                problems.append(f"{option}: {problem}")
            compared += 1
    assert not problems, f"docs/commands/{name}.md:\n" + "\n".join(problems)
    assert compared >= len(by_option), f"docs/commands/{name}.md: not every default was compared"


class _ConfigLoader(yaml.SafeLoader):
    """Reads mkdocs.yml, whose ``!relative`` tag plain YAML does not know."""


_ConfigLoader.add_constructor("!relative", lambda loader, node: loader.construct_scalar(node))


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        items = entry.values() if isinstance(entry, dict) else [entry]
        for item in items:
            pages.extend(nav_pages(item) if isinstance(item, list) else [item])
    return pages


def test_every_command_page_is_in_the_site_and_every_page_exists():
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_ConfigLoader)
    pages = nav_pages(config["nav"])
    assert all((DOCS / page).is_file() for page in pages), [p for p in pages if not (DOCS / p).is_file()]
    assert {f"commands/{name}.md" for name in COMMANDS} <= set(pages)
    assert "guides/several-gpus-or-nodes.md" in pages


def test_the_readme_is_at_most_15_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move reference text to docs/"


# --- links ------------------------------------------------------------------------------------------------

def _prose(text: str) -> str:
    """The markdown without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^ *(```|~~~).*?^ *\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slugs(heading: str) -> set[str]:
    """A heading's anchor as Python-Markdown's toc (the site) and as GitHub spell it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    site = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip())
    github = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    return {site, github}


def with_snippets(text: str) -> str:
    """``--8<-- "file"`` and ``--8<-- "file:section"`` lines replaced by what pymdownx.snippets includes."""

    def include(match: re.Match) -> str:
        name, _, section = match.group(1).partition(":")
        included = (REPO / name).read_text()
        if section:
            part = re.search(rf"\[start:{section}\].*?\n(.*?)^.*\[end:{section}\]", included, flags=re.S | re.M)
            included = part.group(1) if part else ""
        return included

    return re.sub(r'^--8<-- "([^"]+)"$', include, text, flags=re.M)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^ *(```|~~~).*?^ *\1", "", with_snippets(path.read_text()), flags=re.S | re.M)
    return {slug for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M) for slug in _slugs(heading)}


def relative_links(path: Path) -> list[str]:
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(path.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, ...


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            broken.append(f"{link}: no such file")
        elif target.startswith("/"):
            broken.append(f"{link}: absolute; links must be relative files")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{link}: {resolved.relative_to(REPO)} has no heading #{anchor}")
    assert not broken, f"{path.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_readme_links_into_the_docs_for_every_command():
    links = {link.partition("#")[0] for link in relative_links(README)}
    missing = [name for name in COMMANDS if f"docs/commands/{name}.md" not in links]
    assert "docs/commands/index.md" in links and len(missing) < len(COMMANDS), missing


# --- one source for each number -----------------------------------------------------------------------------

def tables(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_the_readme_results_table_is_a_copy_of_one_on_a_docs_page():
    """The README's one results table comes from a docs page that says how it was measured; it is copied, not
    re-typed, and no other measurement table lives in the README."""
    readme = README.read_text()
    results = re.search(r"^## Results\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    assert results, "README.md has no '## Results' section"
    shown = tables(results.group(1))
    assert shown, "README.md's Results section has no table"
    pages = "\n".join(tables("\n".join(p.read_text() for p in DOCS.rglob("*.md"))))
    for table in shown:
        body = "\n".join(line for line in table.splitlines()[2:])  # the rows: a header may be reworded
        assert body in pages, f"README.md's results table is on no docs page:\n{table}"
    elsewhere = tables(readme.replace(results.group(1), ""))
    assert all("%" not in table for table in elsewhere), "a measurement table outside README's Results section"


# --- module maps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["supcon", "linear_probe"])
def test_the_module_map_lists_every_module_and_no_other(package):
    """``PACKAGE/README.md`` has a table row per module (``| `name.py` |``), subpackages under a ``### `pkg/sub/` ``
    heading."""
    root = REPO / package
    listed, folder = set(), root
    for line in (root / "README.md").read_text().splitlines():
        heading = re.match(r"^#+ .*?`([\w/]+)/`", line)
        if heading:
            folder = REPO / heading.group(1)
        row = re.match(r"^\| `([\w.]+\.py)` \|", line)
        if row:
            listed.add(str((folder / row.group(1)).relative_to(REPO)))
    modules = {str(p.relative_to(REPO)) for p in root.rglob("*.py") if p.name != "__init__.py"}
    assert not modules - listed, f"{package}/README.md does not list {sorted(modules - listed)}"
    assert not listed - modules, f"{package}/README.md lists {sorted(listed - modules)}, which do not exist"


def test_the_linear_probe_docstring_names_every_module_and_no_other():
    """``linear_probe/__init__.py``'s map: a bullet per module (``- ``name``:``), dotted below the package
    (``run_report.build``); ``__init__`` and ``__main__`` need none."""
    root = REPO / "linear_probe"
    text = ast.get_docstring(ast.parse((root / "__init__.py").read_text()))
    named = set(re.findall(r"^\s*- ``([\w.]+)``", text, flags=re.M))
    existing = {".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")}
    modules = {name for name in existing if name.rpartition(".")[2] not in ("__init__", "__main__")}
    packages = {name.removesuffix(".__init__") for name in existing if name.endswith(".__init__")}
    assert not modules - named, f"linear_probe/__init__.py's docstring does not name {sorted(modules - named)}"
    unknown = named - existing - packages
    assert not unknown, f"linear_probe/__init__.py's docstring names {sorted(unknown)}, which do not exist"


# --- the site ---------------------------------------------------------------------------------------------

def test_the_site_builds_with_strict_links(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page or anchor, a missing snippet fails."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in COMMANDS:
        assert (tmp_path / "site" / "commands" / name / "index.html").is_file()
    page = (tmp_path / "site" / "development" / "index.html").read_text()
    assert "gpu_augment.py" in page and "--8&lt;--" not in page  # the module maps were included, not quoted
