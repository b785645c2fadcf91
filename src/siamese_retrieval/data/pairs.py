"""Per-epoch (query, database) pair sampling for Siamese training, and fixed evaluation pairs.

Kinds of database image for a query (restricted to the training database images):

    positive       sim = 1
    soft negative  sim = 0 and 0 < fov < soft_max_fov   (partly overlapping views)
    hard negative  sim = 0 and fov = 0                 (no overlap; look-alikes live here)
    negative       sim = 0                             (the study's random negatives, `balance`)

`PairRecipe.study()` is the study's recipe: every positive plus as many random negatives
(1:1 overall and per query), target = sim; queries without a positive contribute nothing.
`PairRecipe.default()`: up to 4 positives, 2 soft and 6 hard negatives per query; queries without
a positive contribute their negatives only; a query with fewer candidates of a kind gets fewer.
`PairRecipe.light()`: up to 2 positives, 1 soft and 2 hard negatives per query: for many training queries
(the training views of data/train_views.py), where in-batch mining supplies the other negatives.
Sampling is deterministic per (seed, epoch) and differs between epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from siamese_retrieval.configs.data import Pairs
from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.data.ground_truth import GroundTruth, as_ground_truth, pair_relevance
from siamese_retrieval.errors import ConfigError


@dataclass(frozen=True)
class PairRecipe:
    positives_per_query: int = 4  # -1: all
    soft_negatives_per_query: int = 2
    hard_negatives_per_query: int = 6
    target: str = "sim"  # "sim" (0/1) or "fov" (graded)
    soft_max_fov: float = 0.5
    balance: bool = False  # add one random negative (sim = 0) per positive taken

    def __post_init__(self) -> None:
        check_fields(self, Pairs, "data.pairs")

    @classmethod
    def study(cls, **overrides) -> "PairRecipe":
        """The study's recipe: all positives + as many random negatives, target sim (fields overridable)."""
        base = dict(positives_per_query=-1, soft_negatives_per_query=0, hard_negatives_per_query=0, balance=True)
        return cls(**{**base, **overrides})

    @classmethod
    def default(cls, **overrides) -> "PairRecipe":
        """Up to 4 positives, 2 soft and 6 hard negatives per query, target sim: the field defaults (overridable)."""
        return cls(**overrides)

    @classmethod
    def light(cls, **overrides) -> "PairRecipe":
        """Up to 2 positives, 1 soft and 2 hard negatives per query, target sim (fields overridable)."""
        base = dict(positives_per_query=2, soft_negatives_per_query=1, hard_negatives_per_query=2)
        return cls(**{**base, **overrides})

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PairRecipe":
        """The `data.pairs` config: `preset` (study | default, default if absent) with field overrides
        from the rest of it. ConfigError for an unknown preset or field."""
        cfg = dict(cfg)
        preset = cfg.pop("preset", "default")
        check_fields({"preset": preset}, Pairs, "data.pairs")  # the presets are the schema's PAIR_PRESETS
        try:
            return getattr(cls, preset)(**cfg)
        except TypeError as exc:
            raise ConfigError(f"data.pairs: {exc}") from None


class CompressedRows:
    """Compressed rows 0..n-1 of int64 values (here and in data/place_batches.py): row i holds the `cols` of
    the pairs with `rows == i`, in their given order, so the rows are sorted when the pairs are sorted by
    (row, col), as `GroundTruth.overlaps` gives them."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n: int) -> None:
        rows = np.asarray(rows, np.int64)
        self.col = np.asarray(cols, np.int64)[np.argsort(rows, kind="stable")]
        self.ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=self.ptr[1:])

    @classmethod
    def from_lists(cls, lists: list[np.ndarray]) -> "CompressedRows":
        """Row i is `lists[i]`."""
        cols = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        return cls(np.repeat(np.arange(len(lists)), [len(x) for x in lists]), cols, len(lists))

    def row(self, i: int) -> np.ndarray:
        return self.col[self.ptr[i] : self.ptr[i + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)


def _choose(rng: np.random.Generator, items: np.ndarray, k: int) -> np.ndarray:
    if k < 0 or k >= len(items):
        return items
    return rng.choice(items, size=k, replace=False)


def _draw_excluding(rng: np.random.Generator, pool: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    """k distinct items of sorted `pool` not in sorted `excluded` (a subset of pool), uniformly."""
    n_ok = len(pool) - len(excluded)
    k = min(k, n_ok)
    if k <= 0:
        return np.zeros(0, np.int64)
    if n_ok < 4 * k or n_ok < len(pool) // 2:  # dense exclusions: enumerate the allowed items
        allowed = pool[~np.isin(pool, excluded, assume_unique=True)]
        return rng.choice(allowed, size=k, replace=False)
    got = np.zeros(0, np.int64)
    while len(got) < k:  # rejection sampling: expected < 2 rounds here
        cand = pool[rng.integers(len(pool), size=2 * k + 8)]
        if len(excluded):
            pos = np.minimum(np.searchsorted(excluded, cand), len(excluded) - 1)
            cand = cand[excluded[pos] != cand]
        cand = np.concatenate([got, cand])
        _, first = np.unique(cand, return_index=True)
        got = cand[np.sort(first)]
    return got[:k]


class PairSampler:
    """Training pairs from `query_idx` x `db_idx` (the train split's queries and database images)."""

    def __init__(
        self,
        truth: Any,
        query_idx: np.ndarray,
        db_idx: np.ndarray,
        recipe: PairRecipe | None = None,
        seed: int = 0,
        strict: bool = True,
    ):
        """`truth`: the relevance (a dataset, a `GroundTruth`: dense or sparse, data/ground_truth.py). Only the
        stored pairs of the given queries are read (never a whole database row)."""
        self.truth: GroundTruth = as_ground_truth(truth)
        self.recipe = recipe or PairRecipe.default()
        self.seed = int(seed)
        self.query_idx = np.unique(np.asarray(query_idx, dtype=np.int64))
        self.db_idx = np.unique(np.asarray(db_idx, dtype=np.int64))
        n_q, n_db = self.truth.n_query, self.truth.n_db
        for name, idx, n in (("query_idx", self.query_idx, n_q), ("db_idx", self.db_idx, n_db)):
            if len(idx) and (idx[0] < 0 or idx[-1] >= n):
                raise ValueError(f"{name} out of range [0, {n})")
        self._index()
        if strict:
            self._check_possible()

    def _index(self) -> None:
        """CSR lists of positives, soft negatives and non-hard images per query, from the stored pairs."""
        r = self.recipe
        row, ids, sim, fov = self.truth.overlaps(self.query_idx)
        keep = np.isin(ids, self.db_idx, assume_unique=False)
        row, ids, sim, fov = row[keep], ids[keep], sim[keep], fov[keep]  # sorted by row, then id
        n = len(self.query_idx)
        soft = ~sim & (fov > 0) & (fov < r.soft_max_fov)
        self.pos = CompressedRows(row[sim], ids[sim], n)
        self.soft = CompressedRows(row[soft], ids[soft], n)
        self.not_hard = CompressedRows(row, ids, n)  # every stored pair has sim = 1 or fov > 0

    def _check_possible(self) -> None:
        r = self.recipe
        where = f"{len(self.query_idx)} train queries x {len(self.db_idx)} train database images"
        if not len(self.query_idx) or not len(self.db_idx):
            raise ConfigError(f"impossible pair recipe: no training pairs can exist ({where})")
        n_pos = self.pos.counts()
        if r.positives_per_query and not n_pos.sum():
            raise ConfigError(f"impossible pair recipe: no positive (sim=1) pair among {where}; {r}")
        available = 0
        if r.balance:
            available += int(((len(self.db_idx) - n_pos) * (n_pos > 0)).sum())
        if r.soft_negatives_per_query:
            available += int(self.soft.counts().sum())
        if r.hard_negatives_per_query:
            available += int((len(self.db_idx) - self.not_hard.counts()).sum())
        needs_neg = r.balance or r.soft_negatives_per_query or r.hard_negatives_per_query
        if needs_neg and not available:
            raise ConfigError(f"impossible pair recipe: no negative of the requested kinds among {where}; {r}")

    def sample(self, epoch: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query indices int64, database indices int64, targets float32), shuffled; same (seed, epoch) -> same pairs."""
        r = self.recipe
        rng = np.random.default_rng([self.seed, int(epoch)])
        qs, ds = [], []
        for i, q in enumerate(self.query_idx):
            pos = _choose(rng, self.pos.row(i), r.positives_per_query)
            parts = [pos]
            if r.balance and len(pos):
                parts.append(_draw_excluding(rng, self.db_idx, self.pos.row(i), len(pos)))
            if r.soft_negatives_per_query:
                parts.append(_choose(rng, self.soft.row(i), r.soft_negatives_per_query))
            if r.hard_negatives_per_query:
                k = r.hard_negatives_per_query if r.hard_negatives_per_query >= 0 else len(self.db_idx)
                parts.append(_draw_excluding(rng, self.db_idx, self.not_hard.row(i), k))
            d = np.concatenate(parts).astype(np.int64)
            ds.append(d)
            qs.append(np.full(len(d), q, np.int64))
        q = np.concatenate(qs) if qs else np.zeros(0, np.int64)
        d = np.concatenate(ds) if ds else np.zeros(0, np.int64)
        perm = rng.permutation(len(q))
        q, d = q[perm], d[perm]
        sim, fov = pair_relevance(self.truth, q, d)
        return q, d, (sim if r.target == "sim" else fov).astype(np.float32)


def eval_pairs(
    truth: Any,
    query_idx: np.ndarray,
    recipe: PairRecipe | None = None,
    seed: int = 0,
    *,
    db_idx: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed set of val/test pairs for range accuracy: by default the study's recipe over the whole
    database (all positives + as many random negatives). Empty arrays, not an error, if none exist.
    `truth`: a dataset or a `GroundTruth`."""
    if recipe is not None and not isinstance(recipe, PairRecipe):
        raise TypeError(f"eval_pairs: recipe must be a PairRecipe, got {type(recipe).__name__} (pass db_idx= by keyword)")
    truth = as_ground_truth(truth)
    db_idx = np.arange(truth.n_db) if db_idx is None else db_idx
    sampler = PairSampler(truth, query_idx, db_idx, recipe or PairRecipe.study(), seed, strict=False)
    return sampler.sample(0)
