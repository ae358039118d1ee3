"""The module graph of the four packages: no import cycle, and every cross-package edge downward.

A bundler walks this graph to build one self-contained script, so it must stay a small DAG. Every
import counts, top-level or inside a function; relative imports are resolved.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("pgolf_codec", "pgolf_train", "pgolf_eval", "pgolf")  # lowest first


def _modules() -> dict[str, tuple[Path, bool]]:
    """dotted name -> (file, is a package __init__)."""
    out = {}
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _owner(name: str, modules: dict) -> str | None:
    """The module of ours that `name` (a module or a name inside one) lives in, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def module_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: first line}."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for mod, (path, is_pkg) in modules.items():
        here = mod if is_pkg else mod.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules else base_name
                           for a in node.names]
            for t in targets:
                owner = _owner(t, modules)
                if owner is not None and owner != mod:
                    edges[owner] = min(edges.get(owner, node.lineno), node.lineno)
        graph[mod] = edges
    return graph


def _layer(mod: str) -> int:
    return LAYERS.index(mod.split(".")[0])


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_parsed() -> None:
    graph = module_graph()
    assert "pgolf_train.trainer" in graph and "pgolf_codec.container" in graph
    assert "pgolf_train.model" in graph["pgolf_train.trainer"]  # an absolute import
    assert "pgolf_eval.ttt" in graph["pgolf_eval"]  # a relative one, from a package __init__


# The trainer and the quantizer take their scorer from the layer above (pgolf_train.scoring.Scorer,
# implemented by pgolf_eval.scorer and handed in by pgolf), and distillation receives the trainer's
# train(); so no list of known debt remains: any cycle or upward edge fails.
KNOWN_CYCLES: list[list[str]] = []
KNOWN_UPWARD: set[tuple[str, str]] = set()


def test_no_import_cycle() -> None:
    graph = module_graph()
    cycles = _cycles(graph)
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    detail = ["  " + " <-> ".join(c) + ": " + "; ".join(
        f"{a} -> {b} (line {graph[a][b]})" for a in c for b in c if b in graph[a]) for c in new]
    assert not new, "import cycles:\n" + "\n".join(detail)
    assert [c for c in KNOWN_CYCLES if c not in cycles] == [], "a known cycle is gone: take it off KNOWN_CYCLES"


def test_cross_package_edges_go_down() -> None:
    graph = module_graph()
    upward = {(a, b): line for a, edges in graph.items() for b, line in edges.items() if _layer(b) > _layer(a)}
    new = [f"  {a}:{line} -> {b}" for (a, b), line in sorted(upward.items()) if (a, b) not in KNOWN_UPWARD]
    assert not new, f"imports above their own package ({' < '.join(LAYERS)}):\n" + "\n".join(new)
    assert KNOWN_UPWARD <= set(upward), "a known upward edge is gone: take it off KNOWN_UPWARD"
