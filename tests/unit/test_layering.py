"""Imports point one way: protos <- shared <- services <- magi (operator tooling) <- benchmarks, and no two
modules import each other, even through imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"protos": 0, "shared": 1, "services": 2, "magi": 3, "benchmarks": 4}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports anywhere in its body."""
    files = [p for top in LAYERS for p in (REPO / top).rglob("*.py")]
    modules = {_module(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from shared import bus` names the module shared.bus; `from shared.bus import x` names shared.bus
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[_module(path)] = {m for m in found if m in modules and m != _module(path)}
    return graph


def test_no_module_imports_a_higher_layer():
    upward = sorted((m, t) for m, targets in _graph().items() for t in targets
                    if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]])
    assert not upward, upward


def test_shared_holds_only_what_services_import():
    """shared/ is the services' library: each of its modules is imported by a service or by another shared
    module that is (the operator's tooling lives in magi/)."""
    graph = _graph()
    needed = {t for m, targets in graph.items() if m.startswith("services.") for t in targets if t.startswith("shared.")}
    frontier = list(needed)
    while frontier:
        for t in graph.get(frontier.pop(), ()):
            if t.startswith("shared.") and t not in needed:
                needed.add(t)
                frontier.append(t)
    unused = sorted(m for m in graph if m.startswith("shared.") and m != "shared" and m not in needed)
    assert not unused, f"not used by any service: move to magi/ (operator tooling) or delete: {unused}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (cycle := visit(target, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)
