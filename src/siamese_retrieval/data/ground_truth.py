"""Ground truth in the form the retrieval engine reads it: dense (the dataset contract) or sparse (CSR).

The engine never needs a whole (n_query, n_database) row. For a chunk of queries it asks three things
(the `GroundTruth` protocol):

    lookup(qi, ids)       (b,) query indices, (b, k) retrieved database ids -> sim (b, k) bool, fov (b, k) float32
                          (ids < 0, FAISS's "no result", are not relevant: sim False, fov 0)
    n_positives(qi)       (b,) int64: sim=1 database images of each query, in the whole database
    ideal_fov(qi, k)      (b, k) float32: each query's k largest fov values over the whole database, descending,
                          zero-padded (the ideal DCG of nDCG@k)
    overlaps(qi)          the stored pairs of those queries, flat: (row into qi, database id, sim, fov), sorted by
                          row then id; a pair is stored when sim = 1 or fov > 0 (what pair sampling, splits and
                          grids read: never a whole database row)

Two implementations:

    DenseRelevance(sim, fov)   the contract's dense arrays (a `RetrievalDataset`, or anything with .sim/.fov)
    SparseRelevance            per query, CSR: the sorted database ids it overlaps, with their sim and fov.
                               Built by from_dense(sim, fov), from_positives(lists, n_db) and
                               from_coordinates(db_xy, q_xy, radius) (FAISS range search: `radius_pairs`).
                               Memory O(number of overlapping pairs): a 10k x 1M set with 10 pairs per query
                               is ~2 MB, where the dense form is 10 GB of `sim` and 40 GB of `fov`.

`as_ground_truth(x)` gives the engine one of them whatever it was handed. Positions -> positives lives here
(`radius_pairs`, which data/layouts.py uses, and `radius_positives`, its dense form), one implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "GroundTruth",
    "DenseRelevance",
    "SparseRelevance",
    "as_ground_truth",
    "pair_relevance",
    "radius_pairs",
    "radius_positives",
    "heading_difference",
]


@runtime_checkable
class GroundTruth(Protocol):
    """What the retrieval engine reads of a dataset's relevance (see the module docstring)."""

    n_query: int
    n_db: int

    def lookup(self, qi: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def n_positives(self, qi: np.ndarray) -> np.ndarray: ...

    def ideal_fov(self, qi: np.ndarray, k: int) -> np.ndarray: ...

    def overlaps(self, qi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


def as_ground_truth(truth: Any) -> GroundTruth:
    """`truth` itself when it already is a `GroundTruth`, its `.relevance` (a dataset), else
    `DenseRelevance(truth.sim, truth.fov)`."""
    if isinstance(truth, GroundTruth):
        return truth
    if isinstance(getattr(truth, "relevance", None), GroundTruth):
        return truth.relevance
    if hasattr(truth, "sim") and hasattr(truth, "fov"):
        return DenseRelevance(truth.sim, truth.fov)
    raise TypeError(f"ground truth must have sim/fov arrays or lookup/n_positives/ideal_fov, got {type(truth).__name__}")


def _rows(qi: np.ndarray) -> np.ndarray:
    return np.asarray(qi, dtype=np.int64).reshape(-1)


def _ids(ids: np.ndarray, b: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != b:
        raise ValueError(f"ids must be (n_queries, k) = ({b}, k), got shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


class DenseRelevance:
    """The dense contract arrays behind the `GroundTruth` interface (no copy of sim/fov is made).

    `lookup` gathers (b, k) entries directly (for k well below n_db no (b, n_db) block is taken);
    `n_positives` and `ideal_fov` read the chunk's rows.
    """

    def __init__(self, sim: np.ndarray, fov: np.ndarray) -> None:
        self.sim, self.fov = np.asarray(sim), np.asarray(fov)
        if self.sim.ndim != 2 or self.sim.shape != self.fov.shape:
            raise ValueError(f"sim {self.sim.shape} and fov {self.fov.shape} must be the same (n_query, n_db) shape")
        self.n_query, self.n_db = self.sim.shape

    def lookup(self, qi: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qi = _rows(qi)
        ids = _ids(ids, len(qi))
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        if 4 * ids.shape[1] >= self.n_db:  # (nearly) full rankings: one row copy, then a gather per row
            sim = np.take_along_axis(self.sim[qi], safe, axis=1).astype(bool, copy=False)
            fov = np.take_along_axis(self.fov[qi], safe, axis=1).astype(np.float32, copy=False)
        else:
            sim = self.sim[qi[:, None], safe].astype(bool, copy=False)
            fov = self.fov[qi[:, None], safe].astype(np.float32, copy=False)
        if not valid.all():
            sim, fov = sim & valid, np.where(valid, fov, np.float32(0))
        return sim, fov

    def n_positives(self, qi: np.ndarray) -> np.ndarray:
        return self.sim[_rows(qi)].astype(bool, copy=False).sum(axis=1, dtype=np.int64)

    def ideal_fov(self, qi: np.ndarray, k: int) -> np.ndarray:
        rows = self.fov[_rows(qi)].astype(np.float32, copy=False)
        k = int(k)
        kk = min(k, self.n_db)
        if kk < self.n_db:
            rows = np.partition(rows, self.n_db - kk, axis=1)[:, self.n_db - kk :]
        top = -np.sort(-rows, axis=1)[:, :kk]
        return np.pad(top, ((0, 0), (0, k - kk))) if kk < k else top

    def overlaps(self, qi: np.ndarray, row_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        qi = _rows(qi)
        parts = []
        for start in range(0, len(qi), row_chunk):
            s = self.sim[qi[start : start + row_chunk]].astype(bool, copy=False)
            f = self.fov[qi[start : start + row_chunk]].astype(np.float32, copy=False)
            r, d = np.nonzero(s | (f > 0))
            parts.append((r + start, d, s[r, d], f[r, d]))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float32)
        r, d, s, f = (np.concatenate([p[i] for p in parts]) for i in range(4))
        return r.astype(np.int64), d.astype(np.int64), s.astype(bool), f.astype(np.float32)


@dataclass(frozen=True)
class SparseRelevance:
    """Per query, the database images it overlaps (CSR): ids sorted within each row, with sim and fov.

    indptr (n_query + 1,) int64; indices (nnz,) int64 database ids; sim (nnz,) bool; fov (nnz,) float32 in
    [0, 1]. An image that is not listed has sim 0 and fov 0. Where no graded relevance is known (positives
    from a list or from positions) fov is sim as float: nDCG is then a binary nDCG.
    """

    n_query: int
    n_db: int
    indptr: np.ndarray
    indices: np.ndarray
    sim: np.ndarray
    fov: np.ndarray

    def __post_init__(self) -> None:
        if len(self.indptr) != self.n_query + 1 or self.indptr[0] != 0 or self.indptr[-1] != len(self.indices):
            raise ValueError("indptr must have n_query + 1 entries from 0 to nnz")
        if not (len(self.indices) == len(self.sim) == len(self.fov)):
            raise ValueError("indices, sim and fov must have one entry per stored pair")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= self.n_db):
            raise ValueError(f"database ids must lie in [0, {self.n_db})")
        if len(self.fov) and (np.isnan(self.fov).any() or self.fov.min() < 0 or self.fov.max() > 1):
            raise ValueError("fov must lie in [0, 1]")
        row = np.repeat(np.arange(self.n_query, dtype=np.int64), np.diff(self.indptr))
        keys = row * self.n_db + self.indices
        if len(keys) > 1 and not (np.diff(keys) > 0).all():
            raise ValueError("database ids must be sorted and unique within each query's row")
        object.__setattr__(self, "_keys", keys)  # globally sorted: (query, database id) -> one int64
        object.__setattr__(self, "_n_pos", np.bincount(row[self.sim], minlength=self.n_query).astype(np.int64))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pairs(cls, n_query: int, n_db: int, qi: np.ndarray, di: np.ndarray,
                   sim: np.ndarray | None = None, fov: np.ndarray | None = None) -> "SparseRelevance":
        """From (query, database) pairs in any order; sim defaults to True, fov to sim as float.

        A pair listed twice keeps its first occurrence.
        """
        qi, di = np.asarray(qi, np.int64).reshape(-1), np.asarray(di, np.int64).reshape(-1)
        if len(qi) != len(di):
            raise ValueError("qi and di must have the same length")
        if len(qi) and (qi.min() < 0 or qi.max() >= n_query):
            raise ValueError(f"query indices must lie in [0, {n_query})")
        if len(di) and (di.min() < 0 or di.max() >= n_db):
            raise ValueError(f"database ids must lie in [0, {n_db})")
        sim = np.ones(len(qi), bool) if sim is None else np.asarray(sim, bool).reshape(-1)
        fov = sim.astype(np.float32) if fov is None else np.asarray(fov, np.float32).reshape(-1)
        keys = qi * int(n_db) + di
        keys, first = np.unique(keys, return_index=True)  # sorted; duplicates dropped
        rows = keys // int(n_db)
        indptr = np.zeros(n_query + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n_query), out=indptr[1:])
        return cls(int(n_query), int(n_db), indptr, keys - rows * int(n_db), sim[first], fov[first])

    @classmethod
    def from_dense(cls, sim: np.ndarray, fov: np.ndarray | None = None, row_chunk: int = 4096) -> "SparseRelevance":
        """The stored pairs are those with sim=1 or fov > 0 (`DenseRelevance.overlaps`, one scan of `row_chunk` rows
        at a time); no fov: fov = sim as float."""
        sim = np.asarray(sim)
        n_query, n_db = sim.shape
        rows, ids, s, f = DenseRelevance(sim, sim if fov is None else fov).overlaps(np.arange(n_query), row_chunk)
        return cls.from_pairs(n_query, n_db, rows, ids, s, f)

    @classmethod
    def from_positives(cls, lists: Sequence[Sequence[int]], n_db: int) -> "SparseRelevance":
        """`lists[q]`: the positive database ids of query q (fov 1.0 for them, 0 elsewhere)."""
        lens = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
        qi = np.repeat(np.arange(len(lists), dtype=np.int64), lens)
        di = np.fromiter((int(j) for x in lists for j in x), np.int64, count=int(lens.sum()))
        return cls.from_pairs(len(lists), n_db, qi, di)

    @classmethod
    def from_coordinates(cls, db_xy: np.ndarray, q_xy: np.ndarray, radius: float, **heading: Any) -> "SparseRelevance":
        """Positives within `radius` metres (inclusive; `radius_pairs`, headings optional), fov = sim."""
        qi, di = radius_pairs(q_xy, db_xy, radius, **heading)
        return cls.from_pairs(len(np.asarray(q_xy).reshape(-1, 2)), len(np.asarray(db_xy).reshape(-1, 2)), qi, di)

    # ------------------------------------------------------------------ the engine's interface
    @property
    def nnz(self) -> int:
        return len(self.indices)

    def lookup(self, qi: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qi = _rows(qi)
        ids = _ids(ids, len(qi))
        valid = (ids >= 0) & (ids < self.n_db)
        keys = qi[:, None] * self.n_db + np.where(valid, ids, 0)
        keys_sorted: np.ndarray = self._keys  # type: ignore[attr-defined]
        if not len(keys_sorted):
            return np.zeros(ids.shape, bool), np.zeros(ids.shape, np.float32)
        pos = np.minimum(np.searchsorted(keys_sorted, keys), len(keys_sorted) - 1)  # past the end: never equal
        found = valid & (keys_sorted[pos] == keys)
        return found & self.sim[pos], np.where(found, self.fov[pos], np.float32(0))

    def n_positives(self, qi: np.ndarray) -> np.ndarray:
        return self._n_pos[_rows(qi)]  # type: ignore[attr-defined]

    def _slice(self, qi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored pairs of rows `qi`: (row into qi, position within that row, position in the CSR arrays)."""
        lens = self.indptr[qi + 1] - self.indptr[qi]
        rows = np.repeat(np.arange(len(qi), dtype=np.int64), lens)
        cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        return rows, cols, np.repeat(self.indptr[qi], lens) + cols

    def ideal_fov(self, qi: np.ndarray, k: int) -> np.ndarray:
        qi, k = _rows(qi), int(k)
        rows, cols, at = self._slice(qi)
        width = max(int(cols.max(initial=-1)) + 1, k)
        block = np.zeros((len(qi), width), np.float32)  # (b, max(k, most pairs of a row)): never n_db wide
        block[rows, cols] = self.fov[at]
        top = -np.sort(-block, axis=1)[:, :k]  # a row has at most n_db pairs: zeros beyond them
        return top

    def overlaps(self, qi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows, _, at = self._slice(_rows(qi))
        return rows, self.indices[at], self.sim[at], self.fov[at]

    def to_dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(sim, fov) as the contract's dense arrays (small sets and tests only)."""
        sim = np.zeros((self.n_query, self.n_db), bool)
        fov = np.zeros((self.n_query, self.n_db), np.float32)
        rows = np.repeat(np.arange(self.n_query), np.diff(self.indptr))
        sim[rows, self.indices], fov[rows, self.indices] = self.sim, self.fov
        return sim, fov


# ----------------------------------------------------------------------------------------- positions


def radius_pairs(
    q_xy: np.ndarray,
    db_xy: np.ndarray,
    radius_m: float,
    *,
    q_heading: np.ndarray | None = None,
    db_heading: np.ndarray | None = None,
    max_heading_deg: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(query, database) index pairs within `radius_m` metres (inclusive) and, when `max_heading_deg` is
    set, whose headings differ by at most that many degrees; sorted by query, then database id.

    FAISS range search over coordinates centred on the database (float32 keeps centimetres over tens of
    kilometres), with 1 m of slack; the candidates are then decided exactly in float64. Memory: the
    candidate pairs only.
    """
    import faiss

    q_xy = np.asarray(q_xy, dtype=np.float64).reshape(-1, 2)
    db_xy = np.asarray(db_xy, dtype=np.float64).reshape(-1, 2)
    if not len(q_xy) or not len(db_xy):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    radius_m = float(radius_m)
    if not math.isfinite(radius_m) or radius_m < 0:
        raise ValueError(f"radius must be a finite number of metres >= 0, got {radius_m}")
    origin = db_xy.mean(axis=0)
    index = faiss.IndexFlatL2(2)
    index.add(np.ascontiguousarray(db_xy - origin, dtype=np.float32))
    # FAISS's range search is strict (distance < radius) and float32: the 1 m slack is what keeps a pair exactly on
    # the radius; the float64 test below then makes the radius exact and inclusive (tests: radius boundary)
    lims, _, found = index.range_search(np.ascontiguousarray(q_xy - origin, dtype=np.float32), (radius_m + 1.0) ** 2)
    qi = np.repeat(np.arange(len(q_xy)), np.diff(lims).astype(np.int64))
    di = found.astype(np.int64)
    keep = ((q_xy[qi] - db_xy[di]) ** 2).sum(axis=1) <= radius_m**2
    if max_heading_deg is not None:
        if q_heading is None or db_heading is None:
            raise ValueError("max_heading_deg needs the query and database headings")
        q_h, db_h = np.asarray(q_heading, np.float64), np.asarray(db_heading, np.float64)
        keep &= heading_difference(q_h[qi], db_h[di]) <= float(max_heading_deg)
    qi, di = qi[keep], di[keep]
    order = np.lexsort((di, qi))
    return qi[order], di[order]


def pair_relevance(truth: GroundTruth, qi: np.ndarray, di: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sim (n,) bool and fov (n,) float32 of the pairs (qi[i], di[i])."""
    sim, fov = truth.lookup(_rows(qi), np.asarray(di, np.int64).reshape(-1, 1))
    return sim[:, 0], fov[:, 0]


def radius_positives(q_xy: np.ndarray, db_xy: np.ndarray, radius_m: float, **heading: Any) -> np.ndarray:
    """(n_q, n_db) bool: `radius_pairs` as the contract's dense `sim` (data/layouts.py writes it)."""
    q_xy = np.asarray(q_xy, dtype=np.float64).reshape(-1, 2)
    db_xy = np.asarray(db_xy, dtype=np.float64).reshape(-1, 2)
    sim = np.zeros((len(q_xy), len(db_xy)), dtype=bool)
    qi, di = radius_pairs(q_xy, db_xy, radius_m, **heading)
    sim[qi, di] = True
    return sim


def heading_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute difference of compass headings in degrees, in [0, 180] (359 and 1 differ by 2)."""
    return np.abs((np.asarray(a, np.float64) - np.asarray(b, np.float64) + 180.0) % 360.0 - 180.0)
