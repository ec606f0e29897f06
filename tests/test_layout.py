"""The import graph of maml_stop/ and tasks/: no circle (counting imports inside functions and under
TYPE_CHECKING), no import inside a function but the lazy learn2learn core, and floors that run one way
(tasks -> probe -> data -> decide -> learn -> evaluate / live / online)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("maml_stop", "tasks")
# the one lazy import left: learn2learn is optional (backend torch_func runs without it)
LAZY = {("maml_stop/learn/adapter.py", "maml_stop.learn.l2l"), ("maml_stop/learn/module.py", "maml_stop.learn.l2l")}
FLOORS = ["tasks", "probe", "data", "decide", "learn", "evaluate"]  # live/ and online/ stand above evaluate's floor


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, here: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom) or not node.module or node.level:
        return []
    out = []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.append(sub if sub in modules else node.module)
    return [m for m in out if m in modules and m != here]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    inner: list[tuple[str, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            edges[name].update(_targets(node, name, modules))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                for target in _targets(node, name, modules):
                    inner.append((str(path.relative_to(ROOT)), target))
    return edges, inner


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    edges, _ = _graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_no_import_hidden_inside_a_function():
    _, inner = _graph()
    assert set(inner) <= LAZY, sorted(set(inner) - LAZY)


def _floor(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "tasks":
        return "tasks"
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS + ["live", "online"] else None


def test_floors_run_one_way():
    edges, _ = _graph()
    rank = {f: i for i, f in enumerate(FLOORS)} | {"live": len(FLOORS), "online": len(FLOORS)}
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                    if _floor(a) and _floor(b) and rank[_floor(b)] > rank[_floor(a)])
    assert not upward, upward
    assert not [f"{a} -> {b}" for a, t in edges.items() for b in t
                if _floor(a) in ("live", "online") and _floor(b) == "evaluate"]


def test_no_private_name_crosses_a_folder():
    """A leading-underscore name stays inside its folder, private to its package (issue 31: evaluate/cascade.py
    took decide/policies/cost_aware.py's ``_Learned``, now ``ViewScorer``); within one folder modules may share
    one (the metrics' functional ``_update`` / ``_compute``, as torchmetrics does)."""
    modules = _modules()
    crossing = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module or node.level or node.module not in modules:
                continue
            here, there = path.parent, modules[node.module].parent
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and here != there:
                crossing.append(f"{path.relative_to(ROOT)}: from {node.module} import {', '.join(private)}")
    assert not crossing, crossing
