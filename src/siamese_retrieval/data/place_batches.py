"""Place-structured P x K training batches (GSV-Cities style), for metric-learning losses with online mining.

A **place** is one training query (the anchor, one view) and up to K - 1 of its training database images with
fov >= `min_fov` (its views: other cameras, other "times" than the query). The queries and database images are
exactly those `PairSampler` draws pairs from (the train split's queries, `Splits.train_db` -- database images of
train places that overlap no val/test query -- plus the training-only city of `data.train_views`), so no
val/test place can enter a batch. A query without such a view would be a place of one view: it is skipped
(`PlaceSampler.n_skipped`, logged by the datamodule).

Each batch holds up to P places that do **not overlap one another**. The ground truth only knows (query,
database) pairs, so two places A and B may share a batch only when
  * no image of A has fov > 0 with an image of B where that fov is known (A's query x B's views and back), and
  * the (query, database) overlap graph gives no indirect hint of an overlap: A's and B's queries see no common
    database image (would their queries overlap?), and no query -- of any split -- sees a view of A and a view
    of B (would their database views overlap?).
The second rule is a conservative stand-in for the query-query and database-database fov nobody stores; places
are checked against all their candidate views (not only the ones drawn), once, at construction.

Batches are packed per epoch, deterministically per (seed, epoch): every usable place is an anchor about once
(a place that cannot join any batch of two or more places in the scan window is dropped for that epoch), either

  * `lookalike=None`: places in a random order, each put in the first batch it does not overlap, or
  * `lookalike="embedding"`: a random seed place, then its nearest places in the current model's embedding
    of the anchors (`set_embeddings`; SiameseModule.on_train_epoch_start computes them) that overlap none of
    the batch, up to P; random places fill what is left (and every batch when no embedding is there yet).
    Look-alike places in one batch give the in-batch miner hard negatives.

A batch (`PlaceBatches` yields it) is one dict:

    images      inputs of the N = p + m images: the p anchors (queries) first, then the m views (database)
    labels      (N,) int64 place index within the batch (what multi-similarity and its miner read)
    is_query    (N,) bool; idx (N,) int64 the image's index in the query / database set
    pair_q, pair_d  (B,) positions into images: the batch as (query, database) pairs for the pair losses --
                each anchor with each of its views (positives) and with as many views of other places of the
                batch (negatives, fov = 0 by construction), drawn per (seed, epoch)
    q_idx, d_idx, target, fov  (B,) as in pair batches (target per data.pairs.target)
    cross_fov   (B, B) fov of (query of pair i, database image of pair j) from the ground truth, NaN on every
                repeat of an anchor row or a view column, so in-batch mining (models/mining.py) counts each
                (anchor, view) combination once
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import PlaceBatches as PlaceBatchesSchema
from siamese_retrieval.data.ground_truth import GroundTruth, as_ground_truth
from siamese_retrieval.data.inputs import Tensors, take
from siamese_retrieval.data.pairs import CompressedRows
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.io_utils import release_mapped_pages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlaceConfig:
    """`data.places`: P places per batch, up to K views each (the anchor query included)."""

    P: int = 16
    K: int = 4
    min_fov: float = 0.5  # a database image is a view of a place when its fov with the anchor is >= this
    lookalike: str | None = None  # None: random places | "embedding": nearest places in the model's embedding
    scan: int = 16  # how many places (x P) a batch looks at before it is closed as it is

    def __post_init__(self) -> None:
        check_fields(self, PlaceBatchesSchema, "data.places")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "PlaceConfig":
        try:
            return cls(**dict(cfg or {}))
        except TypeError as exc:
            raise ConfigError(f"data.places: {exc}") from None


class PlaceSampler:
    """The places of `query_idx` x `db_idx` (the train split's) and their per-epoch P x K packing."""

    def __init__(self, truth: Any, query_idx: np.ndarray, db_idx: np.ndarray, cfg: PlaceConfig | None = None,
                 seed: int = 0) -> None:
        self.truth: GroundTruth = as_ground_truth(truth)
        self.cfg = cfg or PlaceConfig()
        self.seed = int(seed)
        query_idx = np.unique(np.asarray(query_idx, np.int64))
        db_idx = np.unique(np.asarray(db_idx, np.int64))
        row, ids, _, fov = self.truth.overlaps(query_idx)  # every stored pair: sim = 1 or fov > 0
        cand = np.isin(ids, db_idx) & (fov >= self.cfg.min_fov)
        n_views = np.bincount(row[cand], minlength=len(query_idx))
        usable = n_views >= 1  # the anchor + at least one view
        self.n_queries = len(query_idx)
        self.n_skipped = int((~usable).sum())  # places of one view (no database image with fov >= min_fov)
        self.anchors = query_idx[usable]  # place p's anchor query
        new = np.cumsum(usable) - 1  # train-query row -> place
        keep = cand & usable[row]
        # the stored pairs are sorted by (row, id) and unique, so every row below is sorted and unique
        self.views = CompressedRows(new[row[keep]], ids[keep], len(self.anchors))
        # overlap neighbourhoods (module docstring): database images the anchor sees, queries that see a view
        near = usable[row]
        self.near_db = CompressedRows(new[row[near]], ids[near], len(self.anchors))
        all_rows, all_ids, _, _ = self.truth.overlaps(np.arange(self.truth.n_query))
        seers = CompressedRows(all_ids, all_rows, self.truth.n_db)  # database image -> the queries overlapping it
        self.near_q = CompressedRows.from_lists(
            [np.unique(np.concatenate([[a], *(seers.row(d) for d in self.views.row(p))]))
             for p, a in enumerate(self.anchors)])
        if len(self.anchors) < 2:
            raise ConfigError(
                f"data.batches=places: {len(self.anchors)} place(s) with a view (fov >= {self.cfg.min_fov:g}) among "
                f"{len(query_idx)} train queries x {len(db_idx)} train database images; a batch needs 2 places")
        self._stamp_db = np.full(self.truth.n_db, -1, np.int64)
        self._stamp_q = np.full(self.truth.n_query, -1, np.int64)
        self._batch_id = 0
        self.n_batches = len(self.pack(0))  # the epoch length (PlaceBatches.__len__): random packing of epoch 0

    @property
    def n_places(self) -> int:
        return len(self.anchors)

    # ------------------------------------------------------------------ overlap bookkeeping
    def _open(self) -> int:
        self._batch_id += 1
        return self._batch_id

    def _fits(self, p: int, b: int) -> bool:
        return not ((self._stamp_db[self.near_db.row(p)] == b).any() or (self._stamp_q[self.near_q.row(p)] == b).any())

    def _add(self, p: int, b: int, batch: list[int]) -> None:
        self._stamp_db[self.near_db.row(p)] = b
        self._stamp_q[self.near_q.row(p)] = b
        batch.append(int(p))

    def overlap(self, a: int, b: int) -> bool:
        """Whether places a and b may not share a batch (the module docstring's rules)."""
        t = self._open()
        self._add(a, t, [])
        return not self._fits(b, t)

    # ------------------------------------------------------------------ packing
    def pack(self, epoch: int, embeddings: np.ndarray | None = None) -> list[list[int]]:
        """The epoch's batches as lists of place indices (2..P places each, mutually non-overlapping), in the
        order they are yielded. `embeddings` (n_places, D): look-alike packing (module docstring)."""
        rng = np.random.default_rng([self.seed, int(epoch), 11])
        if embeddings is not None:
            emb = np.asarray(embeddings, np.float32)
            if emb.shape[0] != self.n_places:
                raise ValueError(f"embeddings: one row per place ({self.n_places}), got shape {emb.shape}")
            batches = self._pack_lookalike(rng, emb)
        else:
            batches = self._pack_random(rng)
        batches = [b for b in batches if len(b) >= 2]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _pack_random(self, rng: np.random.Generator) -> list[list[int]]:
        P, scan = self.cfg.P, self.cfg.scan * self.cfg.P
        remaining = [int(p) for p in rng.permutation(self.n_places)]
        batches = []
        while remaining:
            b, batch, deferred, i = self._open(), [], [], 0
            while i < len(remaining) and len(batch) < P and i < scan:
                p = remaining[i]
                i += 1
                if self._fits(p, b):
                    self._add(p, b, batch)
                else:
                    deferred.append(p)
            remaining = deferred + remaining[i:]
            batches.append(batch)
        return batches

    def _pack_lookalike(self, rng: np.random.Generator, emb: np.ndarray) -> list[list[int]]:
        P, scan = self.cfg.P, self.cfg.scan * self.cfg.P
        unused = np.ones(self.n_places, bool)
        batches = []
        for seed in rng.permutation(self.n_places):
            if not unused[seed]:
                continue
            b, batch = self._open(), []
            self._add(seed, b, batch)
            unused[seed] = False
            cand = np.flatnonzero(unused)
            if len(cand):
                dist = ((emb[cand] - emb[seed]) ** 2).sum(1)
                m = min(len(cand), scan)
                near = np.argpartition(dist, m - 1)[:m]
                near = cand[near[np.argsort(dist[near], kind="stable")]]
                for p in list(near) + list(rng.permutation(cand)[:scan]):  # nearest first, then random
                    if len(batch) >= P:
                        break
                    if unused[p] and self._fits(p, b):
                        self._add(p, b, batch)
                        unused[p] = False
            batches.append(batch)
        return batches

    def draw_views(self, places: list[int], rng: np.random.Generator) -> list[np.ndarray]:
        """Up to K - 1 views (database indices) of each place, drawn at random."""
        k = self.cfg.K - 1
        out = []
        for p in places:
            row = self.views.row(p)
            out.append(row if len(row) <= k else np.sort(rng.choice(row, size=k, replace=False)))
        return out


class _Rows:
    """Rows `idx` of a tensor, gathered only when sliced (embedding the anchors copies no whole image set)."""

    def __init__(self, tensor: torch.Tensor, idx: np.ndarray) -> None:
        self.tensor, self.idx = tensor, torch.as_tensor(idx, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.tensor[self.idx[key]]


def anchor_inputs(sampler: PlaceSampler, q_inputs: Tensors) -> dict[str, Any]:
    """The anchors' inputs as lazily gathered rows (what SiameseModule embeds for look-alike packing)."""
    return {k: _Rows(v, sampler.anchors) for k, v in q_inputs.items()}


def place_batch(sampler: PlaceSampler, places: list[int], rng: np.random.Generator, q_inputs: Tensors,
                db_inputs: Tensors, target: str = "sim") -> dict[str, Any]:
    """One P x K batch (the module docstring's dict) of `places`."""
    truth = sampler.truth
    views = sampler.draw_views(places, rng)
    p = len(places)
    anchors = sampler.anchors[places]
    view_ids = np.concatenate(views)
    view_place = np.repeat(np.arange(p), [len(v) for v in views])
    first_view = p + np.concatenate([[0], np.cumsum([len(v) for v in views])[:-1]])
    pq, pd = [], []
    for i, v in enumerate(views):
        own = first_view[i] + np.arange(len(v))
        others = p + np.flatnonzero(view_place != i)
        neg = rng.choice(others, size=min(len(v), len(others)), replace=False)
        pq.append(np.full(len(own) + len(neg), i))
        pd.append(np.concatenate([own, neg]))
    pair_q, pair_d = np.concatenate(pq).astype(np.int64), np.concatenate(pd).astype(np.int64)
    idx = np.concatenate([anchors, view_ids]).astype(np.int64)
    q_idx, d_idx = idx[pair_q], idx[pair_d]
    sim_x, fov_x = truth.lookup(q_idx, np.broadcast_to(d_idx, (len(q_idx), len(d_idx))))
    sim, fov = np.diagonal(sim_x), np.ascontiguousarray(np.diagonal(fov_x))
    cross = np.asarray(fov_x, np.float32).copy()
    _, first_q = np.unique(pair_q, return_index=True)
    _, first_d = np.unique(pair_d, return_index=True)
    rows, cols = np.zeros(len(pair_q), bool), np.zeros(len(pair_d), bool)
    rows[first_q], cols[first_d] = True, True
    cross[~rows[:, None] | ~cols[None, :]] = np.nan  # each (anchor, view) combination once
    anchor_rows, view_rows = take(q_inputs, anchors), take(db_inputs, view_ids)  # once, not once per key
    images = {k: torch.cat([anchor_rows[k], view_rows[k]]) for k in q_inputs}
    return {
        "images": images,
        "labels": torch.from_numpy(np.concatenate([np.arange(p), view_place]).astype(np.int64)),
        "is_query": torch.from_numpy(np.arange(len(idx)) < p),
        "idx": torch.from_numpy(idx),
        "pair_q": torch.from_numpy(pair_q),
        "pair_d": torch.from_numpy(pair_d),
        "q_idx": torch.from_numpy(q_idx),
        "d_idx": torch.from_numpy(d_idx),
        "target": torch.from_numpy((sim if target == "sim" else fov).astype(np.float32)),
        "fov": torch.from_numpy(fov.astype(np.float32)),
        "cross_fov": torch.from_numpy(cross),
    }


def rank_world(dm: Any, shard: bool) -> tuple[int, int]:
    """(rank, world size) a sharded batch iterable splits its batches over: (0, 1) unsharded or without DDP."""
    trainer = getattr(dm, "trainer", None)
    if shard and trainer is not None and trainer.world_size > 1:
        return int(trainer.global_rank), int(trainer.world_size)
    return 0, 1


class PlaceBatches(IterableDataset):
    """Yields the epoch's P x K batches. Under DDP (`shard`), rank r takes batches r, r + world, ...: every rank
    packs the same list (same seed, epoch and embeddings) and yields the same number of batches."""

    def __init__(self, dm: Any, sampler: PlaceSampler, source: Any, target: str = "sim", shard: bool = True) -> None:
        self.dm, self.sampler, self.source, self.target, self.shard = dm, sampler, source, target, shard
        self.embeddings: tuple[int, np.ndarray] | None = None  # (epoch, (n_places, D)) from set_embeddings
        self._warned = False

    def __len__(self) -> int:
        """The epoch-0 random packing's batch count (per rank): an epoch packed into more batches drops its
        smallest ones, one packed into fewer ends early (on every rank alike)."""
        _, world = rank_world(self.dm, self.shard)
        return max(1, self.sampler.n_batches // world)

    def set_embeddings(self, epoch: int, embeddings: torch.Tensor | np.ndarray) -> None:
        emb = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
        self.embeddings = (int(epoch), np.asarray(emb, np.float32))

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (place indices) of this rank, in order."""
        emb = None
        if self.sampler.cfg.lookalike == "embedding":
            if self.embeddings is not None and self.embeddings[0] == epoch:
                emb = self.embeddings[1]
            elif not self._warned:
                log.warning("data.places.lookalike=embedding: no anchor embeddings for epoch %d; random places", epoch)
                self._warned = True
        packed = self.sampler.pack(epoch, emb)
        rank, world = rank_world(self.dm, self.shard)
        n = min(len(self), len(packed) // world)
        if len(packed) > n * world:  # too many batches: leave out the smallest (stable: same on every rank)
            keep = np.sort(np.argsort([-len(b) for b in packed], kind="stable")[: n * world])
            packed = [packed[i] for i in keep]
        return packed[rank::world][:n]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.dm.current_epoch()
        rank, _ = rank_world(self.dm, self.shard)
        rng = np.random.default_rng([self.sampler.seed, epoch, 13, rank])
        for places in self.batches(epoch):
            release_mapped_pages()
            yield place_batch(self.sampler, places, rng, self.source.q_inputs, self.source.db_inputs, self.target)
