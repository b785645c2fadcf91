"""The module map stays as designed: imports only point down the layers, pipelines side by side, callbacks only
callbacks, no import cycles, no private name imported from another module."""

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


# ------------------------------------------------------------------------------------------------------ layers
# Low to high: a module imports its own layer and the layers below it, never one above. Every module of the
# package belongs to one (a new top-level module must be placed here). "siamese_retrieval" alone is the package's
# __init__; the other entries are prefixes (a package and everything under it).
LAYERS: dict[str, tuple[str, ...]] = {
    # no package imports but each other: errors, files, threads, progress bars, the trust boundary, the
    # registries, the typed configs, the image tiles every picture is drawn with
    "foundation": ("siamese_retrieval", "errors", "io_utils", "parallel", "progress", "malloc_tuning", "trust",
                   "registry", "configs", "drawing", "image_header"),
    "data": ("data",),  # incl. data.synth, the synthetic city
    "models": ("models",),
    "retrieval": ("retrieval",),
    "services": ("callbacks", "checkpoints", "wandb_runs", "run_outputs", "resume", "benchmarks",
                 "sweeper_storage"),
    "pipelines": ("train", "evaluate", "retrieve", "compare", "entry_points", "cli", "help_text"),
}
# Rules within the layer order: the retrieval engine does not depend on the synthetic city's generator.
EXTRA_RULES: dict[str, tuple[str, ...]] = {
    "siamese_retrieval.retrieval": ("siamese_retrieval.data.synth",),
}


def full(name: str) -> str:
    return name if name == "siamese_retrieval" else f"siamese_retrieval.{name}"


def under(module: str, prefix: str) -> bool:
    if prefix == "siamese_retrieval":  # the package's own __init__, not everything in it
        return module == prefix
    return module == prefix or module.startswith(prefix + ".")


def layer_rules() -> dict[str, tuple[str, ...]]:
    """The table: package prefix -> the prefixes it must not import (every layer above its own, and EXTRA_RULES)."""
    layers = list(LAYERS.values())
    rules = {full(p): tuple(full(q) for above in layers[i + 1:] for q in above) for i, ps in enumerate(layers)
             for p in ps}
    for prefix, forbidden in EXTRA_RULES.items():
        rules[prefix] = rules[prefix] + forbidden
    return rules


def layer_of(module: str) -> str | None:
    return next((name for name, ps in LAYERS.items() if any(under(module, full(p)) for p in ps)), None)


def import_sites(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every siamese_retrieval import in `path`, at any depth (function-level imports too)."""
    sites = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            sites += [(node.lineno, a.name) for a in node.names if a.name.startswith("siamese_retrieval")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("siamese_retrieval"):
            sites += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return sites


def layer_violations(sites: dict[str, list[tuple[str, int, str]]], rules: dict[str, tuple[str, ...]]) -> list[str]:
    """One line per import that a rule forbids: `sites` maps each module to its (file, line, imported module)."""
    found = []
    for module, imports in sorted(sites.items()):
        applying = [(prefix, forbidden) for prefix, forbidden in rules.items() if under(module, prefix)]
        for file, line, imported in imports:
            for prefix, forbidden in applying:
                bad = next((f for f in forbidden if under(imported, f)), None)
                if bad is not None:
                    found.append(f"{file}:{line}: {module} imports {imported} ({prefix} must not import {bad})")
    return found


def package_sites() -> dict[str, list[tuple[str, int, str]]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: [(str(path.relative_to(PACKAGE.parent)), line, m) for line, m in import_sites(path)
                   if m in paths and m != name]
            for name, path in paths.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in graph() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in tests/test_architecture.py): {unplaced}"


def test_imports_only_point_down_the_layers() -> None:
    rules = layer_rules()
    assert rules["siamese_retrieval.data"] == tuple(full(p) for ps in list(LAYERS.values())[2:] for p in ps)
    violations = layer_violations(package_sites(), rules)
    order = " -> ".join(LAYERS)
    assert not violations, f"imports against the layer order ({order}):\n" + "\n".join(violations)


def test_the_layer_rules_catch_an_upward_import() -> None:
    """Guard for the check above: the known kinds of offence are found, and named with their file and line."""
    rules = layer_rules()
    sites = {
        "siamese_retrieval.models.siamese": [("models/siamese.py", 7, "siamese_retrieval.wandb_runs"),
                                             ("models/siamese.py", 8, "siamese_retrieval.retrieval.ranking"),
                                             ("models/siamese.py", 9, "siamese_retrieval.models.embedding")],
        "siamese_retrieval.retrieval.ranking": [("retrieval/ranking.py", 3, "siamese_retrieval.data.synth.generate"),
                                                ("retrieval/ranking.py", 4, "siamese_retrieval.data.conditions")],
        "siamese_retrieval.data.synth.preview": [("data/synth/preview.py", 5, "siamese_retrieval.retrieval.visualize"),
                                                 ("data/synth/preview.py", 6, "siamese_retrieval.drawing")],
        "siamese_retrieval": [("__init__.py", 1, "siamese_retrieval.data")],
    }
    assert layer_violations(sites, rules) == [
        "__init__.py:1: siamese_retrieval imports siamese_retrieval.data (siamese_retrieval must not import "
        "siamese_retrieval.data)",
        "data/synth/preview.py:5: siamese_retrieval.data.synth.preview imports siamese_retrieval.retrieval.visualize "
        "(siamese_retrieval.data must not import siamese_retrieval.retrieval)",
        "models/siamese.py:7: siamese_retrieval.models.siamese imports siamese_retrieval.wandb_runs "
        "(siamese_retrieval.models must not import siamese_retrieval.wandb_runs)",
        "models/siamese.py:8: siamese_retrieval.models.siamese imports siamese_retrieval.retrieval.ranking "
        "(siamese_retrieval.models must not import siamese_retrieval.retrieval)",
        "retrieval/ranking.py:3: siamese_retrieval.retrieval.ranking imports siamese_retrieval.data.synth.generate "
        "(siamese_retrieval.retrieval must not import siamese_retrieval.data.synth)",
    ]
    assert layer_of("siamese_retrieval.data.synth.preview") == "data" and layer_of("siamese_retrieval.cli") == "pipelines"
    assert layer_of("siamese_retrieval.datax") is None


def test_no_module_imports_another_modules_private_names() -> None:
    """A name another module needs is public (or moved to where both can import it)."""
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("siamese_retrieval"):
                private += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "private names imported from another module:\n" + "\n".join(private)
