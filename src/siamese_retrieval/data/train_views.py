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

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.ground_truth import GroundTruth, SparseRelevance, as_ground_truth
from siamese_retrieval.data.inputs import Tensors
from siamese_retrieval.data.synth.config import SynthConfig
from siamese_retrieval.errors import ConfigError


def synth_config(cfg: Mapping[str, Any]) -> SynthConfig:
    """A `data.synth`-style mapping (preset + field overrides) as a SynthConfig; ConfigError when invalid."""
    fields = dict(cfg)
    preset = fields.pop("preset", "default")
    try:
        return SynthConfig.from_preset(preset, **fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.train_views: {exc}") from None


def views_config(views: Mapping[str, Any], eval_city: SynthConfig | None) -> SynthConfig:
    """The training city of `data.train_views`. Its seed defaults to the evaluation city's and `first_street`
    (null) to the street right after the evaluation city's last one."""
    fields = dict(views)
    if eval_city is not None:
        fields.setdefault("seed", eval_city.seed)
        if fields.get("first_street") is None:
            fields["first_street"] = eval_city.first_street + eval_city.n_streets
    elif fields.get("first_street") is None:
        fields["first_street"] = 0
    city = synth_config(fields)
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
    main, extra = as_ground_truth(dataset), as_ground_truth(views)
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
