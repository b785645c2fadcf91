"""Benchmarks named on the command line: `NAME:ROOT`, NAME a data config (vpr_folder, msls_official, msls_city,
gsv_cities, one of yours) and ROOT its data.root. evaluate.py / train.py `benchmarks=[...]` rank a model on each;
train.py `benchmark_monitor=NAME` validates on one every epoch (callbacks.BenchmarkMetrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from siamese_retrieval.errors import ConfigError, first_line


def parse_benchmark(entry: Any) -> tuple[str, str]:
    """`NAME:ROOT` -> (NAME, ROOT); anything else is one ConfigError line."""
    text = str(entry)
    name, sep, root = text.partition(":")
    if not sep or not name or not root:
        raise ConfigError(f"benchmarks: {text!r} must be NAME:ROOT, a data config and its root "
                          f"(e.g. vpr_folder:/data/pitts30k)")
    return name.strip(), root.strip()


def benchmark_entries(entries: Any) -> list[tuple[str, str, str]]:
    """(label, NAME, ROOT) of every entry, all checked first. The label names its row and its monitor: NAME, or
    NAME-<root folder> where NAME is given more than once (vpr_folder:/data/pitts30k,vpr_folder:/data/tokyo247)."""
    parsed = [parse_benchmark(e) for e in entries or []]
    names = [n for n, _ in parsed]
    labels = [n if names.count(n) == 1 else f"{n}-{Path(r).name}" for n, r in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"benchmarks: {sorted(lb for lb in labels if labels.count(lb) > 1)[0]} is given twice")
    return [(label, n, r) for label, (n, r) in zip(labels, parsed)]


def benchmark_data(name: str, root: str) -> DictConfig:
    """The `data=NAME data.root=ROOT` node, composed as the command line would (the app's config path, so a
    --config-dir's data configs work too)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [f"data={name}", f"data.root={root}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside the running app
            return compose(config_name="eval", overrides=overrides).data
        with initialize_config_module("siamese_retrieval.conf", version_base="1.3"):  # called as a library
            return compose(config_name="eval", overrides=overrides).data
    except HydraException as exc:
        options = getattr(exc, "options", None)  # an unknown NAME (MissingConfigException): the data configs there are
        known = f"; NAME is one of {', '.join(map(str, options))}" if options else ""
        raise ConfigError(f"benchmarks: {name}:{root}: {first_line(exc)}{known}") from None
