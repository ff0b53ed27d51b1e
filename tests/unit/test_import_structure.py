"""The shape of the tree: no import cycles, and a shared library that knows no service.

Reads each module's imports with :mod:`ast` (nothing is imported), so these
checks cost milliseconds and see every import, including those inside
functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import CODE_PACKAGES as PACKAGES
from tests.support import LIBRARY_PACKAGE as LIBRARY
from tests.support import REPO_ROOT as ROOT
from tests.support import SERVICE_PACKAGES as SERVICES
from tests.support import TOOLING_PACKAGES as TOOLING


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports (``from pkg import mod`` resolves to ``pkg.mod``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, pending = stack[-1]
            if not pending:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = pending.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_the_walker_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walker_resolves_imports() -> None:
    graph = import_graph()
    assert "services.wire" in graph["services.connection"]
    assert "services.process" in graph["rtmctl.launcher"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_shared_library_imports_no_service_and_no_tooling() -> None:
    graph = import_graph()
    offenders = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name == LIBRARY or name.startswith(LIBRARY + ".")
        for target in targets
        if target.split(".")[0] in (*SERVICES, *TOOLING)
    ]
    assert offenders == []


def test_services_import_no_tooling() -> None:
    graph = import_graph()
    offenders = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.split(".")[0] in SERVICES
        for target in targets
        if target.split(".")[0] in TOOLING
    ]
    assert offenders == []
