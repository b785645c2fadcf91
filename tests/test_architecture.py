"""The module map stays as designed: pipelines side by side, callbacks only callbacks, no import cycles."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytorch_lightning as pl

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "siamese_retrieval"
PIPELINES = ("train", "evaluate", "retrieve", "compare")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every siamese_retrieval module `path` imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("siamese_retrieval")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("siamese_retrieval"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_pipelines_never_import_each_other() -> None:
    g = graph()
    for a in PIPELINES:
        for b in PIPELINES:
            assert f"siamese_retrieval.{b}" not in g[f"siamese_retrieval.{a}"] or a == b, f"{a} imports {b}"


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])


def test_callbacks_module_defines_only_lightning_callbacks() -> None:
    import siamese_retrieval.callbacks as callbacks

    defined = [obj for name, obj in vars(callbacks).items()
               if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == callbacks.__name__]
    assert defined, "callbacks.py defines nothing"
    for obj in defined:
        assert inspect.isclass(obj) and issubclass(obj, pl.Callback), f"{obj.__name__} is not a Lightning callback"


def test_the_graph_sees_real_imports() -> None:
    """Guard for the checks above: the parser does find the pipelines' imports."""
    g = graph()
    assert "siamese_retrieval.retrieval.ranking" in g["siamese_retrieval.evaluate"]
    assert "siamese_retrieval.checkpoints" in g["siamese_retrieval.retrieve"]
