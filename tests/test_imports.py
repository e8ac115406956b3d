"""The import graph of ``supcon/`` and ``linear_probe/``: no cycle, and nothing in ``supcon`` imports ``linear_probe``.

Every import statement counts, at module level and inside functions, read with ``ast`` (nothing is imported).
An edge goes to the module an import names (``from pkg import mod`` -> ``pkg.mod``; ``from pkg.mod import
name`` -> ``pkg.mod``); the parent packages Python runs first are not edges of their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import console_scripts

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("supcon", "linear_probe")
LOWER, UPPER = PACKAGES  # linear_probe may use supcon, never the reverse


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """``{"supcon.baseline.cli": path, "supcon.baseline": .../__init__.py, ...}`` under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of ``modules`` (None: another library)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """``{imported module: line}`` of every import statement in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from pkg import mod`` names the submodule; ``from pkg.mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            module = _known(target, modules)
            if module and module != name:
                found.setdefault(module, node.lineno)
    return found


def import_graph(root: Path = REPO, packages=PACKAGES) -> dict[str, dict[str, int]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """``module:line imports target`` for every import from the lower package into the upper one."""
    return [f"{name}:{line} imports {target}" for name, targets in sorted(graph.items())
            if name.split(".")[0] == LOWER for target, line in sorted(targets.items())
            if target.split(".")[0] == UPPER]


def describe_cycle(group: list[str], graph: dict[str, dict[str, int]]) -> str:
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in group for b in group if b in graph[a]]
    return "; ".join(edges)


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe_cycle(group, graph) for group in found)


def test_supcon_never_imports_linear_probe():
    graph = import_graph()
    upward = upward_imports(graph)
    assert not upward, "supcon imports linear_probe: " + "; ".join(upward)


def test_only_entry_points_import_a_command_shell():
    """The modules behind the console scripts (``supcon.cli``, ``linear_probe.use_cli``, ...) are shells over the
    library: nothing imports them but a ``__main__`` entry point (``python -m linear_probe.run_report``)."""
    shells = {module for module, _ in console_scripts().values()}
    graph = import_graph()
    assert shells <= set(graph), f"console scripts outside {PACKAGES}: {sorted(shells - set(graph))}"
    importers = [f"{name}:{line} imports {target}" for name, targets in sorted(graph.items())
                 if name.rpartition(".")[2] != "__main__" for target, line in sorted(targets.items())
                 if target in shells]
    assert not importers, "library modules import a command shell: " + "; ".join(importers)
    assert "linear_probe.use_cli" in graph["linear_probe.run_report.__main__"]  # the one entry point that does


def test_the_walk_sees_imports_inside_functions_and_both_kinds_of_fault(tmp_path):
    graph = import_graph()
    # a few imports that sit inside functions in the real code: the walk must see them
    assert "supcon.baseline.classical" in graph["supcon.baseline.cli"]  # inside baseline_command
    assert "linear_probe.export" in graph["linear_probe.use_cli"]  # inside export_command
    assert "linear_probe.run_report.figures" in graph["linear_probe.run_report.build"]  # from pkg import mod

    # a made-up pair of packages: a cycle through an import inside a function (relative, ``from . import``),
    # and an upward import inside a function that also closes a cycle with a module-level import
    for package, files in {
        "supcon": {"__init__.py": "", "a.py": "def f():\n    from . import b\n", "b.py": "from supcon.a import f\n",
                   "c.py": "def g():\n    from linear_probe.top import h\n"},
        "linear_probe": {"__init__.py": "", "top.py": "import supcon.c\n\n\ndef h():\n    pass\n"},
    }.items():
        (tmp_path / package).mkdir()
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    fake = import_graph(tmp_path)
    assert cycles(fake) == [["linear_probe.top", "supcon.c"], ["supcon.a", "supcon.b"]]
    assert upward_imports(fake) == ["supcon.c:2 imports linear_probe.top"]
