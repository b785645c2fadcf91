"""The retrieval engine: embeddings or pair scores -> one ranking per query -> metrics.

Every number the project reports goes through here, so the learned models, the classical baseline
and re-ranking are measured the same way:

    models.embedding.embed_all      inputs -> embeddings, in batches (embed_sharded: under DDP, a shard per rank)
    rank_embeddings / rank_queries  embeddings -> FAISS index -> full rankings (or the top search_k) -> `Ranking`
    rank_scores                     a dense (queries x database) score matrix -> `Ranking` (baselines)
    InlierReranker                  a ranking's top N re-ordered by a verifier (ORB + RANSAC inliers)
    ranking_grid                    a `Ranking` -> RGB picture of queries and their top k

A ranking is sorted once: FAISS returns each query's database sorted by distance, and the model's
relevance head is monotonic in the distance, so that order is the relevance order. Only rows where it
is not (equal relevance scores, or a head that increases with distance) are re-sorted, so that ties
always go to the lower database index, exactly as a stable sort of the dense scores would put them.

Streaming evaluation (`RankingSettings.search_k = k`): each query searches only its top k, and the metrics
come from those (b, k) lists and the ground truth's per-query counts (data/ground_truth.py: dense arrays
or sparse CSR, one code path): memory O(queries x k), never queries x database. precision@c, recall@c and
ndcg@K are the full-ranking values (every cut-off must be <= k); mAP becomes mAP@k (metrics.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from siamese_retrieval.data.conditions import query_conditions
from siamese_retrieval.data.ground_truth import GroundTruth, as_ground_truth
from siamese_retrieval.data.inputs import Tensors, take
from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.search import Rerank
from siamese_retrieval.configs.training import RetrievalMetrics
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.embedding import embed_all
from siamese_retrieval.retrieval.index import IndexConfig, build_index, search
from siamese_retrieval.retrieval.metrics import RetrievalScores
from siamese_retrieval.retrieval.visualize import retrieval_grid


class Relevance(Protocol):
    """Ground truth of a dataset: (n_query, n_database) binary `sim` and graded `fov`.

    The engine also takes a `GroundTruth` (data/ground_truth.py, e.g. `SparseRelevance`) wherever it takes this.
    """

    sim: np.ndarray
    fov: np.ndarray


@dataclass(frozen=True)
class RankingSettings:
    """How rankings are made and scored; one object instead of a parameter list in every function."""

    top_ks: tuple[int, ...] = (1, 5, 10)  # precision@k / recall@k cut-offs
    ndcg_k: int = 10  # nDCG cut-off (graded by fov)
    keep_top: int = 10  # database ids/scores kept per query (grids, per-query tables, recall curve)
    query_chunk: int = 256  # queries ranked at a time (memory: chunk x n_db, or chunk x search_k when streaming)
    embed_batch: int = 512  # items per forward pass when embedding
    index: IndexConfig = field(default_factory=IndexConfig)  # its metric is set from the model's distance
    # None: rank the whole database (metric "mAP"). k: streaming, search only each query's top k (memory
    # O(queries x k); metric "mAP@k"; an IVF index keeps its nprobe). Must be >= every top_ks and ndcg_k.
    search_k: int | None = None

    def __post_init__(self) -> None:
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "index"}  # as typed
        check_fields(knobs, RetrievalMetrics, "")  # the index checks itself (IndexConfig)
        object.__setattr__(self, "top_ks", tuple(int(k) for k in self.top_ks))
        object.__setattr__(self, "search_k", None if self.search_k is None else int(self.search_k))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None = None, **overrides: Any) -> "RankingSettings":
        """From a config mapping, e.g. an entry point's top level: other keys are ignored and never read (none of
        their interpolations is resolved), OmegaConf nodes become plain values; `index` may be a mapping of
        IndexConfig fields."""
        from omegaconf import OmegaConf

        names, cfg = {f.name for f in dataclasses.fields(cls)}, cfg or {}
        given = {**{k: cfg[k] for k in cfg if k in names}, **overrides}
        values = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                  for k, v in given.items() if k in names and v is not None}
        if isinstance(values.get("index"), Mapping):
            try:
                values["index"] = IndexConfig(**dict(values["index"]))
            except TypeError as exc:
                raise ConfigError(f"index: {exc}") from None
        return cls(**values)


@dataclass
class Ranking:
    """What one evaluation found, per query of the split (O(queries x keep_top) memory)."""

    query_idx: np.ndarray  # (m,) dataset query indices
    top_ids: np.ndarray  # (m, keep_top) database indices, best first
    top_scores: np.ndarray  # (m, keep_top) relevance scores
    # (m,) 1-based rank of the first sim=1 image, 0 if the query has none; streaming (search_k = k): k + 1
    # when the query has positives but none in its top k (a lower bound on the rank)
    first_positive_rank: np.ndarray
    metrics: dict[str, float]
    before_rerank: dict[str, float] | None = None  # the metrics of the ranking a re-ranker started from


class RankingBuilder:
    """Accumulates chunks of rankings into a `Ranking` (metrics, top ids, first positive).

    A chunk is each query's full ranking (search_k None) or its top search_k; either way the metrics are
    read from the (b, k) ids through the ground truth's `lookup` / `n_positives` / `ideal_fov`
    (data/ground_truth.py), so a dense dataset and a sparse one take the same path and no (b, n_db)
    block is made unless k = n_db.
    """

    def __init__(self, query_idx: np.ndarray, truth: Relevance | GroundTruth, settings: RankingSettings) -> None:
        self.query_idx, self.truth, self.keep_top = query_idx, as_ground_truth(truth), settings.keep_top
        self.search_k, self.ndcg_k = settings.search_k, settings.ndcg_k
        # every query is scored by this process: no cross-process sync (under DDP only rank zero ranks)
        self.metric = RetrievalScores(top_ks=settings.top_ks, ndcg_k=settings.ndcg_k, map_k=settings.search_k,
                                      sync_on_compute=False)
        self.tops: list[np.ndarray] = []
        self.top_scores: list[np.ndarray] = []
        self.first_pos: list[np.ndarray] = []

    def add_ranked(self, qi: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """Rankings of the dataset queries `qi`: `ids` (len(qi), k) best first (k = n_db, or the searched top
        k when streaming), their `scores`."""
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN: the ranking is undefined")
        qi = np.asarray(qi)
        if ids.ndim != 2 or ids.shape[0] != len(qi) or ids.shape[1] == 0:
            raise ValueError(f"ids must be (len(qi), k >= 1) = ({len(qi)}, k), got shape {ids.shape}")
        k = ids.shape[1]
        if self.search_k is None and k != self.truth.n_db:
            raise ValueError(f"full ranking expected ({self.truth.n_db} ids per query), got {k}; set search_k")
        sim, fov = self.truth.lookup(qi, ids)  # (b, k)
        n_pos = self.truth.n_positives(qi)
        kk = min(self.ndcg_k, k)
        ideal = self.truth.ideal_fov(qi, kk)
        rel = torch.from_numpy(sim)
        self.metric.update_ranked(rel, torch.from_numpy(n_pos), torch.from_numpy(fov[:, :kk]), torch.from_numpy(ideal))
        self.tops.append(ids[:, : self.keep_top])
        self.top_scores.append(scores[:, : self.keep_top])
        has = sim.any(axis=1)
        first = np.where(has, sim.argmax(axis=1) + 1, np.where(n_pos > 0, k + 1, 0))
        self.first_pos.append(first.astype(np.int64))

    def result(self) -> Ranking:
        values = {k: float(v) for k, v in self.metric.compute().items()}
        return Ranking(self.query_idx, np.concatenate(self.tops), np.concatenate(self.top_scores),
                       np.concatenate(self.first_pos), values)


def canonical_order(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rankings sorted by score (descending), ties by database index; rows already so are left untouched."""
    step = scores[:, 1:] - scores[:, :-1]
    tied = (step == 0) & (ids[:, 1:] > ids[:, :-1])  # in order already
    bad = ((step > 0) | ((step == 0) & ~tied)).any(axis=1)
    rows = np.flatnonzero(bad)
    if len(rows):
        order = np.lexsort((ids[rows], -scores[rows]), axis=-1)
        ids, scores = ids.copy(), scores.copy()
        ids[rows] = np.take_along_axis(ids[rows], order, axis=1)
        scores[rows] = np.take_along_axis(scores[rows], order, axis=1)
    return ids, scores


# ----------------------------------------------------------------------------------------- embeddings


class Embedder(Protocol):
    """What the engine needs of a model: embeddings, its distance, relevance from distances."""

    device: torch.device
    distance: Any  # models.distance.Distance

    def embed(self, inputs: Tensors) -> torch.Tensor: ...

    def score_distances(self, distance: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------- rankings


def index_config(metric: str, settings: RankingSettings, full_ranking: bool = True) -> IndexConfig:
    """The settings' index with `metric` (a model's: its distance's faiss_metric); a full ranking probes every
    inverted list."""
    cfg = dataclasses.replace(settings.index, metric=metric)
    if full_ranking and cfg.kind != "flat":
        cfg = dataclasses.replace(cfg, nprobe=1 << 30)  # mAP and recall@k rank the whole database
    return cfg


def search_relevance(module: Embedder, index: Any, q_emb: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, distances, relevance scores), each (m, k) best first, for `q_emb` searched in `index`."""
    faiss_dist, ids = search(index, module.distance.for_index(q_emb).numpy(), k=k)
    distance = module.distance.from_faiss(faiss_dist)
    with torch.inference_mode():
        scores = module.score_distances(distance.to(module.device)).float().cpu().numpy()
    return ids, distance.numpy(), scores


Reranker = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def reorder_top(ids: np.ndarray, scores: np.ndarray, key: np.ndarray, new_scores: np.ndarray,
                rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Copies of `ids`, `scores` whose top n = key.shape[1] of `rows` are sorted by `key`, highest first (ties:
    the model's order) and scored `new_scores`: one write-back for every re-ranker. Sorted on the exact key,
    not on the float32 new scores, which can round two relevances of one key to the same value."""
    order = np.argsort(-key, axis=1, kind="stable")
    ids, scores = ids.copy(), scores.copy()
    ids[rows, : key.shape[1]] = np.take_along_axis(ids[rows, : key.shape[1]], order, axis=1)
    scores[rows, : key.shape[1]] = np.take_along_axis(new_scores, order, axis=1)
    return ids, scores


def rank_index(db: np.ndarray, queries: Any, metric: str, query_idx: np.ndarray, truth: Relevance | GroundTruth,
               settings: RankingSettings, rerank: Reranker | None = None,
               search_chunk: Callable[[Any, Any, int], tuple[np.ndarray, np.ndarray]] = search) -> Ranking:
    """Rank `db` (rows as the index of `metric` holds them) for each of `queries` (rows of `query_idx`), a chunk
    at a time: the whole database, or its top `settings.search_k` (streaming: (chunk, k) arrays only). One loop
    for every ranking by search: `search_chunk(index, queries, k)` -> (scores, ids) best first, FAISS' own by
    default (rank_bow), a model's relevance for embeddings. With `rerank`, each chunk's rankings pass through it
    and `before_rerank` holds the metrics of the ranking it started from (computed in the same pass)."""
    full = settings.search_k is None
    index = build_index(db, index_config(metric, settings, full_ranking=full))
    k = len(db) if full else min(settings.search_k, len(db))
    builder = RankingBuilder(query_idx, truth, settings)
    before = RankingBuilder(query_idx, truth, settings) if rerank is not None else None
    for start in range(0, len(queries), settings.query_chunk):
        rows = slice(start, start + settings.query_chunk)
        scores, ids = search_chunk(index, queries[rows], k)
        ids, scores = canonical_order(ids, scores)
        qi = query_idx[rows]
        if before is not None:
            before.add_ranked(qi, ids, scores)
            ids, scores = rerank(np.arange(len(query_idx))[rows], ids, scores)
        builder.add_ranked(qi, ids, scores)
    ranking = builder.result()
    if before is not None:
        ranking.before_rerank = before.result().metrics
    return ranking


def rank_embeddings(module: Embedder, db_emb: torch.Tensor, q_emb: torch.Tensor, query_idx: np.ndarray,
                    truth: Relevance | GroundTruth, settings: RankingSettings, rerank: Reranker | None = None) -> Ranking:
    """`rank_index` of the query embeddings (rows of `query_idx`) in the database's, scored by the model's
    relevance. `truth`: the dataset (dense sim/fov) or a `GroundTruth`."""

    def relevance(index: Any, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, _, scores = search_relevance(module, index, q, k=k)
        return scores, ids

    return rank_index(module.distance.for_index(db_emb).numpy(), q_emb, module.distance.faiss_metric, query_idx,
                      truth, settings, rerank, relevance)


def rank_queries(module: Embedder, db_inputs: Tensors, q_inputs: Tensors, query_idx: np.ndarray,
                 truth: Relevance | GroundTruth, settings: RankingSettings, rerank: Reranker | None = None) -> Ranking:
    """Embed the database once and the split's queries, then `rank_embeddings`."""
    db_emb = embed_all(module, db_inputs, settings.embed_batch)
    q_emb = embed_all(module, take(q_inputs, query_idx), settings.embed_batch)
    return rank_embeddings(module, db_emb, q_emb, query_idx, truth, settings, rerank)


def rank_scores(scores: np.ndarray, query_idx: np.ndarray, truth: Relevance | GroundTruth, settings: RankingSettings) -> Ranking:
    """A `Ranking` from a dense (m, n_db) score matrix (higher = more relevant), e.g. a baseline's: sorted here
    (stable: ties to the lower index); streaming keeps the top search_k."""
    builder = RankingBuilder(query_idx, truth, settings)
    for start in range(0, len(query_idx), settings.query_chunk):
        rows = slice(start, start + settings.query_chunk)
        chunk = np.ascontiguousarray(scores[rows], dtype=np.float32)
        ids = np.argsort(-chunk, axis=1, kind="stable")[:, : settings.search_k]  # search_k None: every id
        builder.add_ranked(query_idx[rows], ids, np.take_along_axis(chunk, ids, axis=1))
    return builder.result()


class InlierReranker:
    """The top N of a ranking re-ordered by a verifier's score (most inliers first; ties: the model's order).

    New score of a top-N item = 1 + inliers + relevance / 2 (relevance lies in [0, 1]): the top N stays
    above the rest, inliers decide within it, and the rest keeps the model's order and scores.
    `verify(rows, candidates)` returns the inlier counts (len(rows), N) of the candidates of those rows.
    """

    def __init__(self, top_n: int, verify: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        check_fields({"top_n": top_n}, Rerank, "rerank")
        self.top_n, self.verify = int(top_n), verify

    def __call__(self, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.top_n, ids.shape[1])
        candidates, relevance = ids[:, :n], scores[:, :n]
        inliers = np.asarray(self.verify(rows, candidates), dtype=np.float64)
        fused = (1.0 + inliers + relevance.astype(np.float64) / 2.0).astype(np.float32)
        return reorder_top(ids, scores, inliers, fused)


class FusedReranker:
    """The model's top N with geometric evidence added to its score, not put in its place.

    Replacing the model's order by the inlier count helps only where verification is strong: on scenes
    with little planar structure it throws a good ranking away. Here a candidate is *verified* when its
    inliers reach `min_inliers` AND stand out from the query's other candidates: at least `outlier_z`
    spreads above the median count of its top N. The spread is the largest of three robust estimates (MAD
    and IQR as standard deviations, and sqrt(median): chance inliers are counts, roughly Poisson), so a
    count that only fluctuates, or that every candidate reaches (a repeated facade), verifies nothing. Verified candidates move ahead of the rest, ordered by
    min(inliers, saturate) and then by the model; everything else keeps the model's order. With no
    verified candidate the ranking is the model's, exactly.

    New score of a top-N item = 1 + relevance / 2 (+ 1 + min(inliers, saturate) when verified): integers
    decide between groups, relevance (in [0, 1]) within them, and the top N stays above the rest.
    A query whose top-1 relevance leads the top-2 by more than `skip_margin` is not verified at all: the
    model is confident there, and verification is the expensive part (null: verify every query).
    """

    def __init__(self, top_n: int, verify: Callable[[np.ndarray, np.ndarray], np.ndarray], min_inliers: int = 12,
                 saturate: int | None = None, outlier_z: float = 5.0, skip_margin: float | None = None) -> None:
        check_fields(dict(top_n=top_n, min_inliers=min_inliers, saturate=saturate, outlier_z=outlier_z,
                          skip_margin=skip_margin), Rerank, "rerank")
        saturate = int(min_inliers) if saturate is None else int(saturate)
        self.top_n, self.verify = int(top_n), verify
        self.min_inliers, self.saturate, self.outlier_z = int(min_inliers), saturate, float(outlier_z)
        self.skip_margin = None if skip_margin is None else float(skip_margin)
        self.verified_queries = 0  # how many queries were verified (the rest were skipped as confident)

    def verified(self, inliers: np.ndarray) -> np.ndarray:
        """(m, N) bool: enough inliers, and an outlier among the query's own candidates."""
        median = np.median(inliers, axis=1, keepdims=True)
        q25, q75 = np.percentile(inliers, [25, 75], axis=1, keepdims=True)
        mad = np.median(np.abs(inliers - median), axis=1, keepdims=True)
        spread = np.maximum.reduce([1.4826 * mad, (q75 - q25) / 1.349, np.sqrt(np.maximum(median, 1.0))])
        return (inliers >= self.min_inliers) & (inliers >= median + self.outlier_z * spread)

    def __call__(self, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.top_n, ids.shape[1])
        todo = np.arange(len(rows))
        if self.skip_margin is not None and n > 1:
            todo = np.flatnonzero(scores[:, 0] - scores[:, 1] <= self.skip_margin)
        self.verified_queries += len(todo)
        if not len(todo):
            return ids.copy(), scores.copy()
        candidates, relevance = ids[todo, :n], scores[todo, :n].astype(np.float64)
        inliers = np.asarray(self.verify(rows[todo], candidates), dtype=np.float64)
        inliers = np.where(candidates >= 0, inliers, 0.0)
        strength = np.where(self.verified(inliers), 1.0 + np.minimum(inliers, self.saturate), 0.0)
        fused = (1.0 + strength + relevance / 2.0).astype(np.float32)
        return reorder_top(ids, scores, strength, fused, todo)


# ----------------------------------------------------------------------------------------- pictures


def ranking_grid(dataset: Any, ranking: Ranking, n_queries: int = 6, top_k: int = 5, seed: int = 0) -> np.ndarray:
    """RGB grid of `n_queries` seeded queries (those with a positive, when any) and their top-k, by relevance.

    Each query is labelled with its dataset index and, for a synthetic city, its condition (night, fog, ...);
    each result with its rank, score and fov; the last column is the query's best ground-truth positive (the
    database image of highest fov) with its fov and its rank in the ranking (when within the kept top).
    """
    rng = np.random.default_rng(seed)
    with_pos = np.flatnonzero(ranking.first_positive_rank > 0)
    pool = with_pos if len(with_pos) else np.arange(len(ranking.query_idx))
    pick = np.sort(rng.choice(pool, size=min(n_queries, len(pool)), replace=False))
    k = min(top_k, ranking.top_ids.shape[1])
    conditions = query_conditions(dataset.root, len(dataset.q_paths))
    queries = [int(ranking.query_idx[i]) for i in pick]
    truth = as_ground_truth(dataset)
    labels, best_files, best_labels = [], [], []
    for i, q in zip(pick, queries):
        labels.append([f"query {q}"] + ([conditions[q]] if conditions is not None else []))
        _, ids, _, fov = truth.overlaps(np.array([q]))  # the database images this query overlaps
        if not len(ids):
            best_files.append(None)
            best_labels.append("")
            continue
        tied = ids[fov == fov.max()]
        ranked = ranking.top_ids[i][np.isin(ranking.top_ids[i], tied)]
        best = int(ranked[0]) if len(ranked) else int(tied[0])  # of equal fovs, the one ranked highest
        kept = np.flatnonzero(ranking.top_ids[i] == best)
        rank = f"rank {kept[0] + 1}" if len(kept) else f"rank > {ranking.top_ids.shape[1]}"
        best_files.append(dataset.db_file(best))
        best_labels.append(f"fov {float(fov.max()):.2f}, {rank}")
    top_sim, top_fov = truth.lookup(ranking.query_idx[pick], ranking.top_ids[pick, :k])
    return retrieval_grid(
        [dataset.query_file(q) for q in queries],
        [[dataset.db_file(int(j)) for j in ranking.top_ids[i, :k]] for i in pick],
        top_sim.tolist(),
        [ranking.top_scores[i, :k].tolist() for i in pick],
        query_labels=labels,
        fovs=top_fov.astype(float).tolist(),
        best_files=best_files,
        best_labels=best_labels,
    )
