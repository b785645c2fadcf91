"""One registry per extension point: a component is registered where it is defined, with a decorator.

    from siamese_retrieval.registry import ENCODERS

    @ENCODERS.register("plain_cnn")
    class PlainCNN(nn.Module): ...

Everything that needs to know the components reads these registries instead of keeping its own list: the
trust allowlist (trust.py: a registered class may be named by a `_target_` in a checkpoint), the config
choices (`aggregation.name`, `data.layout`, `rerank=`...), the layout and re-ranker dispatch, and the metric
lists (METRICS: the results table's rows and the W&B best-value summaries). A researcher's component registers
itself the same way from their own module (examples/).

Each registry knows the package(s) that define its built-in components and imports them on first use, so
`names()` is complete without anyone keeping a mirror list. This module imports nothing heavy: asking a
registry for its names is what imports torch, not importing the registry.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from siamese_retrieval.errors import ConfigError, UnknownComponent

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, the object, and what its registry records about it."""

    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The dotted path a `_target_` names it by."""
        return f"{self.obj.__module__}.{self.obj.__qualname__}"


class Registry:
    """Named components of one kind; `homes` are the modules or packages whose import registers the built-ins.

    `trusted`: whether a registered object may be named by a `_target_` read from a file (trust.py). Only
    registries of buildable components are; METRICS describes what is logged and is not an allowlist."""

    def __init__(self, kind: str, homes: tuple[str, ...] = (), trusted: bool = True) -> None:
        self.kind = kind
        self.homes = homes
        self.trusted = trusted
        self._entries: dict[str, Entry] = {}
        self._loaded = False
        _ALL[kind] = self

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the class or function under `name` (default: its own name, lower-case)."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", "").lower()
            if not key:
                raise ValueError(f"{self.kind} registry: give a name for {obj!r}")
            old = self._entries.get(key)
            if old is not None and old.target != Entry(key, obj).target:
                raise ValueError(f"{self.kind} {key!r} is already registered by {old.target}")
            self._entries[key] = Entry(key, obj, dict(meta))
            return obj

        return add

    def load(self) -> "Registry":
        """Import the built-in components' modules (once): each home is a module, or a package and every module
        below it."""
        if not self._loaded:
            self._loaded = True
            for home in self.homes:
                module = importlib.import_module(home)
                for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{home}."):
                    importlib.import_module(info.name)
        return self

    def names(self) -> tuple[str, ...]:
        return tuple(self.load()._entries)

    def entries(self) -> Iterator[Entry]:
        return iter(tuple(self.load()._entries.values()))

    def __contains__(self, name: object) -> bool:
        return name in self.load()._entries

    def entry(self, name: str, key: str | None = None) -> Entry:
        """The entry called `name`; `key` (the config key that chose it) words the one-line error."""
        self.load()
        found = self._entries.get(str(name)) if isinstance(name, str) else None
        if found is None:
            raise unknown_component(key or self.kind, name, self.names())
        return found

    def get(self, name: str, key: str | None = None) -> Any:
        return self.entry(name, key).obj


class MetricRegistry(Registry):
    """METRICS: one entry per metric FAMILY, registered where it is computed. A family is what a logged name
    means once its stage and cut-off are stripped: `val/precision@10`, `test/before_rerank/precision@1` and
    `precision@5` are all "precision". Everything that needs to know about metrics reads it: the results table
    (run_outputs.shown_metrics), the W&B best-value summaries (best_mode, callbacks.BestValSummary), and
    compare.py's bold best mean (metrics.json's `directions`).

        @METRICS.register("recall", higher_is_better=True, at_k=True, shown=("recall@1", "recall@5"), row=20,
                          description="fraction of queries with a positive in the top k")

    higher_is_better  the direction of "best" (W&B summary max / min)
    at_k              logged as `<name>@<k>` (a cut-off, or range_acc's margin)
    shown             the names (no stage prefix) the results table shows as rows, in this order; `<name>@*`:
                      every `<name>@<k>` the run logged (streaming mAP@k), after the fixed rows; () = not shown
    row               where the family's rows go in the table (ascending); needed only when `shown`
    description       one line: what the number is
    """

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        if not isinstance(meta.get("higher_is_better"), bool) or not isinstance(meta.get("at_k"), bool):
            raise ValueError(f"metric {name!r}: give higher_is_better=True/False and at_k=True/False")
        shown = meta.setdefault("shown", ())
        if isinstance(shown, str) or not all(isinstance(n, str) for n in shown):
            raise ValueError(f"metric {name!r}: shown must be a tuple of metric names, got {shown!r}")
        meta["shown"] = tuple(shown)
        if shown and not isinstance(meta.get("row"), (int, float)):
            raise ValueError(f"metric {name!r}: a shown metric needs row=<number> (its place in the results table)")
        if not isinstance(meta.get("description"), str) or not meta["description"].strip():
            raise ValueError(f"metric {name!r}: give a one-line description")
        return super().register(name, **meta)

    def family(self, metric: str) -> Entry | None:
        """The family of a logged metric name (any `stage/` or `before_rerank/` path before it, any `@k` after
        it); None for what is not a registered metric (counts, timings, `train/loss_<term>`...)."""
        base = str(metric).rsplit("/", 1)[-1].split("@", 1)[0]
        return self.load()._entries.get(base)

    def best_mode(self, metric: str) -> str | None:
        """"max" or "min" by the metric's family (`val/recall@5` -> recall: max; `val/loss` -> loss: min); None
        for a name of no registered family (counts, timings, `train/loss_<term>`)."""
        family = self.family(metric)
        return None if family is None else "max" if family.meta["higher_is_better"] else "min"

    def unregister(self, name: str) -> None:
        """Remove a family (a test's temporary one)."""
        self._entries.pop(name, None)


def unknown_component(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> UnknownComponent:
    """A name no registry holds, in one line: `key='x': must be one of a, b, c (did you mean b?)` (the nearest
    name), then the one override that loads a component of the user's own module (it registers itself when
    imported; `csv_places` is near `gsv_cities` but is the user's)."""
    text = f"{key}={value!r}: must be one of {', '.join(choices)}"
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return UnknownComponent(text + (f" (did you mean {close[0]}?)" if close else "")
                            + "; a component registered by your own module loads with imports=[your_module]")


def import_user_modules(names: Any) -> None:
    """Import the modules the user lists in `imports=[...]` (their own encoders, layouts, re-rankers register
    themselves on import). The user composed the list: it is trusted. A module that fails to import is one line."""
    for name in list(names or []):
        try:
            importlib.import_module(str(name))
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported the same way
            raise ConfigError(f"imports: cannot import {str(name)!r}: {type(exc).__name__}: {exc}") from None


_ALL: dict[str, Registry] = {}

# The extension points. A new built-in component is one decorated class in one of these homes (+ one yaml).
ENCODERS = Registry("encoder", ("siamese_retrieval.models",))
# Chosen by name, never by a `_target_` (trusted=False): a file cannot make the trust check accept their builders.
AGGREGATIONS = Registry("aggregation head", ("siamese_retrieval.models.cnn", "siamese_retrieval.models.aggregation",
                                             "siamese_retrieval.models.vpr_heads"), trusted=False)
KEYPOINT_POOLINGS = Registry("keypoint pooling", ("siamese_retrieval.models.keypoint_set",), trusted=False)
INPUTS = Registry("input builder", ("siamese_retrieval.data.inputs",))
LOSSES = Registry("loss", ("siamese_retrieval.models",))  # losses and miners (a miner wraps a loss)
MODULES = Registry("lightning module", ("siamese_retrieval.models.siamese",))
CALLBACKS = Registry("callback", ("siamese_retrieval.models.aggregation_fitting",))
LAYOUTS = Registry("dataset layout", ("siamese_retrieval.data.layouts", "siamese_retrieval.data.gsv_cities"),
                   trusted=False)
RERANKERS = Registry("re-ranker", ("siamese_retrieval.retrieval.rerankers",), trusted=False)
# metric families: the ranking metrics, the pair scores' range accuracy, the loss (SiameseModule.compute_loss)
METRICS = MetricRegistry("metric", ("siamese_retrieval.retrieval.metrics", "siamese_retrieval.models.pair_metrics",
                                    "siamese_retrieval.models.siamese"), trusted=False)


def registered_target(target: str) -> Entry | None:
    """The entry a `_target_` path names, in any registry; None when it is not registered.

    Only this package's own modules are imported to find out (they are this package's code); a foreign
    module is never imported here, so a name read from a file cannot make this import anything new.
    """
    if target.startswith("siamese_retrieval."):
        module = target.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    trusted = (entry for registry in _ALL.values() if registry.trusted for entry in registry._entries.values())
    return next((entry for entry in trusted if entry.target == target), None)
