"""More training views from the generator, without leakage: a second synthetic city for training only.

GSV-Cities trains on many places x several views under changing conditions. The generator can render
that: `data.train_views` names a second city of the evaluation city's seed (the same architecture: its 16
facade archetypes) on streets the evaluation city does not have. Its queries and database images all join
the training pairs; val/test stay the evaluation city's own split.

Why no val/test place can leak into it: a street is painted from (seed, street id) alone and placed in the
world by its id (data/synth/config.py, `SynthConfig.streets`), so two cities of one seed share a street
exactly where their id ranges meet. `views_config` starts the training city after the evaluation city's
last street, and `check_no_shared_places` refuses overlapping ranges of the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.ground_truth import GroundTruth, SparseRelevance, as_ground_truth
from siamese_retrieval.data.inputs import Tensors
from siamese_retrieval.configs.fields import FLOAT, STR, check_fields, show
from siamese_retrieval.configs.model import TRAIN_VIEWS_NOTE, TrainViews
from siamese_retrieval.data.synth.config import SynthConfig
from siamese_retrieval.errors import ConfigError

DEFAULTS: dict[str, Any] = {f.name: getattr(SynthConfig(), f.name) for f in fields(SynthConfig)}


def views_mapping(value: Any) -> dict[str, Any] | None:
    """`data.train_views` as a plain dict (None when null / empty); ConfigError when it is not a mapping."""
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    return _views_dict(value)


def _views_dict(value: Any) -> dict[str, Any]:
    """`data.train_views` as a plain dict; ConfigError when it is not a mapping (null too: a city is needed)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.train_views={show(value, STR)}: must be a mapping of {TRAIN_VIEWS_NOTE} or null")
    return dict(value)


def synth_config(cfg: Mapping[str, Any], where: str = "data.train_views") -> SynthConfig:
    """A `data.synth`-style mapping (preset + field overrides) as a SynthConfig; ConfigError (naming `where`)
    when it names an unknown preset or field, or a field has a wrong type or range. Its callers pass a dict
    (views_config, the datamodule's `dict(synth)`): refusing a non-mapping is theirs."""
    values = dict(cfg)
    preset = values.pop("preset", "default")
    typed = {f.name for f in fields(TrainViews)}  # the knobs the schema types and ranges
    check_fields({"preset": preset, **{k: v for k, v in values.items() if k in typed}}, TrainViews, where)
    for name, value in values.items():
        problem = None if name in typed else _field_problem(str(name), value)
        if problem is not None:
            raise ConfigError(f"{where}.{name}={show(value, FLOAT)}: {problem}")
    try:
        return SynthConfig.from_preset(preset, **values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _field_problem(name: str, value: Any) -> str | None:
    """What a SynthConfig field's value must be, or None when it fits (unknown names: from_preset says so)."""
    default = DEFAULTS.get(name)  # None for an unknown name: matches no type below
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a number"
    if isinstance(default, tuple):
        return None if isinstance(value, (list, tuple)) else "must be a list"
    return None


def views_config(views: Mapping[str, Any], eval_city: SynthConfig | None) -> SynthConfig:
    """The training city of `data.train_views`. Its seed defaults to the evaluation city's and `first_street`
    (null) to the street right after the evaluation city's last one."""
    values = _views_dict(views)
    if eval_city is not None:
        values.setdefault("seed", eval_city.seed)
        if values.get("first_street") is None:
            values["first_street"] = eval_city.first_street + eval_city.n_streets
    elif values.get("first_street") is None:
        values["first_street"] = 0
    city = synth_config(values)
    if eval_city is not None:
        check_no_shared_places(eval_city, city)
    return city


def check_no_shared_places(eval_city: SynthConfig, train_city: SynthConfig) -> None:
    """ConfigError when the training city would render a street of the evaluation city."""
    shared = set(eval_city.streets) & set(train_city.streets)
    if train_city.seed == eval_city.seed and shared:
        raise ConfigError(
            f"data.train_views: streets {train_city.first_street}..{train_city.streets[-1]} of seed {train_city.seed} "
            f"include the evaluation city's streets {eval_city.first_street}..{eval_city.streets[-1]} "
            f"({len(shared)} shared): its val/test places would be trained on; set data.train_views.first_street "
            f">= {eval_city.first_street + eval_city.n_streets} (or null)")


@dataclass
class JoinedViews:
    """The evaluation dataset's training part and the training city side by side in one index space: the
    training city's queries come after the evaluation dataset's (and its database images after its database)."""

    truth: GroundTruth
    q_inputs: Tensors
    db_inputs: Tensors
    train_q: np.ndarray
    train_db: np.ndarray


def join_views(dataset: RetrievalDataset, q_inputs: Tensors, db_inputs: Tensors, train_q: np.ndarray,
               train_db: np.ndarray, views: RetrievalDataset, views_q: Tensors, views_db: Tensors) -> JoinedViews:
    """One training source of both: block-diagonal relevance (no pair across the two cities overlaps), the
    input tensors concatenated, and the training indices of both (all of the training city's)."""
    # the evaluation dataset's training positives where it has its own (layouts: 10 m), else its relevance
    main = as_ground_truth(dataset.train_relevance if dataset.train_relevance is not None else dataset)
    extra = as_ground_truth(views)
    mq, md = main.n_query, main.n_db
    a, b = main.overlaps(np.arange(mq)), extra.overlaps(np.arange(extra.n_query))
    truth = SparseRelevance.from_pairs(mq + extra.n_query, md + extra.n_db, np.concatenate([a[0], b[0] + mq]),
                                       np.concatenate([a[1], b[1] + md]), np.concatenate([a[2], b[2]]),
                                       np.concatenate([a[3], b[3]]))
    if set(q_inputs) != set(views_q) or set(db_inputs) != set(views_db):
        raise ConfigError("data.train_views: the training city's inputs differ from the evaluation dataset's")
    cat = lambda x, y: {k: torch.cat([x[k], y[k]]) for k in x}  # noqa: E731 (copies: the training city is small)
    return JoinedViews(
        truth, cat(q_inputs, views_q), cat(db_inputs, views_db),
        np.concatenate([np.asarray(train_q, np.int64), mq + np.arange(extra.n_query)]),
        np.concatenate([np.asarray(train_db, np.int64), md + np.arange(extra.n_db)]),
    )


def reference_training_set(cache_dir: str | Path) -> tuple[RetrievalDataset, Any]:
    """The synthetic city's default preset and its place split (conf/data/synth.yaml: 60/20/20 by 1 km cells, split
    seed 0): the training data of a model component that must be fitted where the evaluated dataset has no
    training split of its own (rerank=learned_matches with split=all, retrieve.py). Rendered once into the cache."""
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.data.splits import split_by_place
    from siamese_retrieval.data.synth import ensure_city

    dataset = read_dataset(ensure_city(cache_dir, SynthConfig.from_preset("default")), check="exists",
                           name="synth-reference")
    return dataset, split_by_place(dataset, fractions=(0.6, 0.2, 0.2), cell_size_m=1000.0, seed=0)
