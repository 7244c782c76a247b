"""The package's import structure: no cycles, and a charging core that knows no channel.

The graph is built from the source with :mod:`ast`. For cycles it holds every module-level
import, ``if TYPE_CHECKING:`` blocks included (a cycle that only the type checker sees is still
two modules that cannot be understood apart); for the layering rules it holds every import
anywhere in a module, function bodies included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "hal")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements that run on import: the body, and the branches of ``if``/``try`` in it."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
            for handler in node.handlers:
                out += _module_level(handler.body)
    return out


def _imports(tree: ast.Module, module: str, is_package: bool, *, anywhere: bool) -> set[str]:
    found: set[str] = set()
    nodes = ast.walk(tree) if anywhere else _module_level(tree.body)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _target(node, module, is_package)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def import_graph(*, anywhere: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules its import executes (parents of submodules included)."""
    sources = {
        _module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = _imports(tree, name, path.name == "__init__.py", anywhere=anywhere)
        edges: set[str] = set()
        for target in targets:
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in sources and candidate != name:
                    edges.add(candidate)
        # a package's own parents are not cycles through it
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "agent.charging.faults" in graph["agent.charging.connector"]
    assert "hal.interfaces" in _closure(graph, "agent.charging.connector")


def test_no_import_cycle() -> None:
    assert _cycles(import_graph()) == []


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_charging_core_imports_no_channel_reporting_or_maintenance() -> None:
    graph = import_graph(anywhere=True)
    forbidden = ("agent.channels", "agent.maintenance", "agent.commands", "agent.firmware",
                 "agent.cli", "agent.service", "agent.runtime", "agent.emulator", "agent.store")
    for module in [m for m in graph if m.startswith("agent.charging")]:
        bad = sorted(m for m in _closure(graph, module) if m.startswith(forbidden))
        assert bad == [], f"{module} imports {bad}"


def test_hal_imports_nothing_of_the_agent() -> None:
    graph = import_graph(anywhere=True)
    for module in [m for m in graph if m.startswith("hal")]:
        bad = sorted(m for m in _closure(graph, module) if m.startswith("agent"))
        assert bad == [], f"{module} imports {bad}"
