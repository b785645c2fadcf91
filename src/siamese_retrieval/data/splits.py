"""Split queries into train / val / test by place, so no test place appears in a training pair.

A place is a square grid cell of `cell_size_m` metres in (east, north). Every place (cells with
queries or database images) goes to exactly one split; queries follow their place. Training pairs
may only use `train_db`: database images in train places, minus any that overlap (fov > 0 or
sim) with a val/test query — a camera just across a cell border can see the same facade.
Val/test queries are searched against the full database (the caller's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from siamese_retrieval.data.ground_truth import as_ground_truth
from siamese_retrieval.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")


def place_ids(loc: np.ndarray, cell_size_m: float) -> np.ndarray:
    """int64 id of the (east, north) grid cell of each row of `loc` (n, >=2)."""
    if not cell_size_m > 0:
        raise ConfigError(f"data.split.cell_size_m must be > 0, got {cell_size_m}")
    loc = np.asarray(loc, dtype=np.float64).reshape(len(loc), -1)
    cells = np.floor(loc[:, :2] / float(cell_size_m)).astype(np.int64)
    return (cells[:, 0] << 32) + (cells[:, 1] & 0xFFFFFFFF)


@dataclass
class Splits:
    train_q: np.ndarray  # sorted int64 query indices
    val_q: np.ndarray
    test_q: np.ndarray
    train_db: np.ndarray  # database indices that training pairs may use
    place_of_query: np.ndarray  # int64 place id per query
    place_of_db: np.ndarray  # int64 place id per database image
    split_of_db: np.ndarray | None = None  # int8 per database image: 0 train, 1 val, 2 test (by place)

    def queries(self, name: str) -> np.ndarray:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r} (train, val, test)")
        return getattr(self, f"{name}_q")

    def summary(self) -> dict[str, int]:
        out = {f"n_{name}_queries": int(len(self.queries(name))) for name in SPLIT_NAMES}
        for name in SPLIT_NAMES:
            out[f"n_{name}_places"] = int(len(np.unique(self.place_of_query[self.queries(name)])))
        out["n_train_db"] = int(len(self.train_db))
        out["n_db"] = int(len(self.place_of_db))
        if self.split_of_db is not None:
            out["n_train_db_excluded_overlap"] = int((self.split_of_db == 0).sum() - len(self.train_db))
        return out


def _check_fractions(fractions) -> np.ndarray:
    frac = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if frac.shape != (3,) or not np.isfinite(frac).all() or (frac < 0).any() or frac.sum() <= 0:
        raise ConfigError(f"data.split.fractions must be three non-negative numbers (train, val, test), got {fractions}")
    if frac[0] == 0 or frac[2] == 0:
        raise ConfigError(f"data.split.fractions: train and test need a fraction > 0, got {tuple(fractions)}")
    return frac / frac.sum()


def _assign_places(counts: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Greedy: walk the (already shuffled) places, give each to the split furthest below its target.

    When only as many places are left as non-zero splits are still empty, those splits get them.
    """
    targets = frac * counts.sum()
    filled = np.zeros(3)
    out = np.empty(len(counts), dtype=np.int8)
    wanted = frac > 0
    for i, c in enumerate(counts):
        empty = np.flatnonzero(wanted & (filled == 0))
        left = len(counts) - i
        if len(empty) and left <= len(empty):
            choice = empty[np.argmax((targets - filled)[empty])]
        else:
            deficit = np.where(wanted, targets - filled, -np.inf)
            choice = int(np.argmax(deficit))  # ties: train, then val, then test
        out[i] = choice
        filled[choice] += c
    return out


def split_by_place(
    dataset,
    fractions=(0.7, 0.15, 0.15),
    cell_size_m: float = 1000.0,
    seed: int = 0,
    exclude_eval_overlap: bool = True,
) -> Splits:
    """Deterministic (per seed) place-disjoint split of the queries; see the module docstring."""
    frac = _check_fractions(fractions)
    pq = place_ids(dataset.q_loc, cell_size_m)
    pdb = place_ids(dataset.db_loc, cell_size_m)
    q_places, q_counts = np.unique(pq, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(q_places))
    split_of_qplace = np.empty(len(q_places), dtype=np.int8)
    split_of_qplace[order] = _assign_places(q_counts[order], frac)

    split_q = split_of_qplace[np.searchsorted(q_places, pq)]
    # places with database images only: drawn at random by the fractions (no query to balance)
    db_only = np.setdiff1d(np.unique(pdb), q_places)
    split_of_dbonly = rng.choice(3, size=len(db_only), p=frac).astype(np.int8)
    all_places = np.concatenate([q_places, db_only])
    all_splits = np.concatenate([split_of_qplace, split_of_dbonly])
    sort = np.argsort(all_places)
    all_places, all_splits = all_places[sort], all_splits[sort]
    split_db = all_splits[np.searchsorted(all_places, pdb)]

    idx = [np.flatnonzero(split_q == s).astype(np.int64) for s in range(3)]
    for s, name in enumerate(SPLIT_NAMES):
        if not len(idx[s]) and frac[s] > 0:
            raise ConfigError(
                f"split {name!r} is empty: {len(q_places)} place(s) with queries "
                f"({len(pq)} queries, cell_size_m={cell_size_m:g}), fractions {tuple(float(f) for f in fractions)}; "
                f"lower data.split.cell_size_m or use a dataset with more places"
            )

    train_db = split_db == 0
    if exclude_eval_overlap and (len(idx[1]) or len(idx[2])):
        eval_q = np.concatenate([idx[1], idx[2]])
        truth = as_ground_truth(dataset)
        for start in range(0, len(eval_q), 4096):  # bounded memory for large query sets
            _, seen, _, _ = truth.overlaps(eval_q[start : start + 4096])  # stored pairs: sim = 1 or fov > 0
            train_db[seen] = False
    train_db_idx = np.flatnonzero(train_db).astype(np.int64)
    if not len(train_db_idx):
        raise ConfigError(
            f"no database image lies in a train place ({len(pdb)} database images); "
            f"lower data.split.cell_size_m or change data.split.fractions"
        )
    return Splits(idx[0], idx[1], idx[2], train_db_idx, pq, pdb, split_db)
