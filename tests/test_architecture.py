"""The import graph, drawn from the code: the rooms of docs/architecture.md and no circle.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency), so a circle cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("modelpack", "training", "export", "service", "bench")
# What each room may import of the others (docs/architecture.md, "The rooms").
ALLOWED = {
    "modelpack": set(),
    "training": {"modelpack"},
    "export": {"modelpack", "training"},
    "service": {"modelpack"},
    "bench": {"modelpack", "training", "export"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Project modules ``path`` imports (``from x import y`` counts y when y is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        # A submodule importing a name through its own package (``from training.data import
        # cifar`` inside training.data.sources) reaches a sibling, not a cycle through __init__.
        graph[module] = {name for name in _imports(path, module) if name in files
                         and name != module and not module.startswith(name + ".")}
    return graph


GRAPH = _graph()


def test_the_graph_is_read_from_the_code():
    """Guards the test itself: known edges are seen, lazy ones included."""
    assert "modelpack.manifest" in GRAPH["modelpack.runner"]
    assert "export.package" in GRAPH["export.build"]
    assert "training.artifacts" in GRAPH["training.pipeline"]
    assert len(GRAPH) > 60


@pytest.mark.parametrize("room", PACKAGES)
def test_each_room_imports_only_what_it_may(room):
    crossing = sorted(
        f"{module} imports {target}" for module, targets in GRAPH.items()
        if module.split(".")[0] == room for target in targets
        if target.split(".")[0] not in ALLOWED[room] | {room})
    assert not crossing, crossing


def test_no_import_circle_anywhere():
    """Tarjan's strongly connected components over every module: each must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_service_is_imported_only_by_its_entry_points():
    importers = sorted(m for m, targets in GRAPH.items() if not m.startswith("service")
                       and any(t.startswith("service") for t in targets))
    assert importers == []
