"""The CLI's layering: its modules import each other only downwards (no circle), with the
shared helpers at the bottom (``cli/common.py``), and commands are found in an explicit table.
Read from the source with ``ast`` (lazy imports inside functions count), as
tests/test_agent_units.py does for the agent package."""

from __future__ import annotations

import ast
from pathlib import Path

import remotedl.cli

CLI = Path(remotedl.cli.__file__).parent


def package_imports(package: Path, prefix: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` (dotted ``prefix``) it imports, at any depth of the
    file. ``from PKG import mod`` counts as importing ``PKG.mod``, not the package's own file."""
    graph: dict[str, set[str]] = {}
    modules = {f"{prefix}.{p.stem}" if p.stem != "__init__" else prefix for p in package.glob("*.py")}
    for path in package.glob("*.py"):
        name = f"{prefix}.{path.stem}" if path.stem != "__init__" else prefix
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                found.update(subs or {node.module})
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith(prefix))
        graph[name] = {d for d in found if d in modules and d != name}
    return graph


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(m: str) -> list[str] | None:
        if m in done:
            return None
        if m in visiting:
            return [*visiting[visiting.index(m) :], m]
        visiting.append(m)
        for d in sorted(graph[m]):
            found = visit(d)
            if found:
                return found
        visiting.pop()
        done.add(m)
        return None

    for m in sorted(graph):
        found = visit(m)
        if found:
            return found
    return None


def test_the_cli_modules_import_only_downwards():
    graph = package_imports(CLI, "remotedl.cli")
    found = circle(graph)
    assert found is None, " -> ".join(found or [])
    # The bottom: common (and app, parsers, statusline) import no command module.
    bottom = {"remotedl.cli.app", "remotedl.cli.parsers", "remotedl.cli.statusline"}
    assert graph["remotedl.cli.common"] <= {"remotedl.cli.app"}
    for m in bottom:
        assert graph[m] == set(), (m, graph[m])
    # Only the dispatcher (the package's own file) reaches the command modules from above.
    assert not any("remotedl.cli" in deps for deps in graph.values())


def test_the_circle_finder_finds_a_circle():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None


def test_commands_are_dispatched_from_an_explicit_table():
    from remotedl.cli import COMMANDS, handler

    for name in COMMANDS:
        fn = handler(name)
        assert callable(fn) and fn.__name__.startswith("cmd_"), name
    source = (CLI / "__init__.py").read_text()
    assert 'getattr(module, "cmd_"' not in source
