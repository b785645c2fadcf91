"""Lightning callbacks: retrieval metrics over the full database, and retrieval example grids.

The metrics live in a callback, not in the module, so that every encoder gets the same evaluation:
embed the database once, index it, search each split query against all of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from siamese_retrieval.data.inputs import Tensors, take
from siamese_retrieval.retrieval.index import IndexConfig, build_index, search
from siamese_retrieval.retrieval.metrics import RetrievalScores
from siamese_retrieval.retrieval.visualize import retrieval_grid, save_png
from siamese_retrieval.run_utils import quiet_known_warnings

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_all(module: Any, inputs: Tensors, batch_size: int = 512) -> torch.Tensor:
    """Embeddings of every item of `inputs`, in batches, on the module's device; returned on CPU."""
    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size].to(module.device) for k, v in inputs.items()}
        out.append(module.embed(chunk).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@dataclass
class Ranking:
    """What one evaluation found, per query of the split (O(queries x k) memory)."""

    query_idx: np.ndarray  # (m,) dataset query indices
    top_ids: np.ndarray  # (m, k) database indices, best first
    top_scores: np.ndarray  # (m, k) relevance scores
    first_positive_rank: np.ndarray  # (m,) 1-based rank of the first sim=1 image, 0 if the query has none
    metrics: dict[str, float]


class RankingBuilder:
    """Turns chunks of dense (queries x full database) scores into a `Ranking`: one code path for the
    learned models, the classical baseline and re-ranking, so their metrics are comparable."""

    def __init__(self, query_idx: np.ndarray, sim: np.ndarray, fov: np.ndarray, top_ks: Sequence[int] = (1, 5, 10),
                 ndcg_k: int = 10, keep_top: int = 10) -> None:
        self.query_idx, self.sim, self.fov, self.keep_top = query_idx, sim, fov, keep_top
        # every query is scored by this process: no cross-process sync (under DDP only rank zero ranks)
        self.metric = RetrievalScores(top_ks=tuple(top_ks), ndcg_k=ndcg_k, sync_on_compute=False)
        self.tops: list[np.ndarray] = []
        self.top_scores: list[np.ndarray] = []
        self.first_pos: list[np.ndarray] = []

    def add(self, qi: np.ndarray, scores: torch.Tensor) -> None:
        """Scores (len(qi), n_db), higher = more relevant, for the dataset queries `qi`."""
        sim_c, fov_c = torch.from_numpy(self.sim[qi]), torch.from_numpy(self.fov[qi])
        self.metric.update(scores, sim_c, fov_c)
        keep = min(self.keep_top, scores.shape[1])
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        self.tops.append(order[:, :keep].numpy())
        self.top_scores.append(torch.gather(scores, 1, order[:, :keep]).numpy())
        hits = torch.gather(sim_c, 1, order)
        has = hits.any(dim=1)
        self.first_pos.append(torch.where(has, hits.float().argmax(dim=1) + 1, torch.zeros_like(has, dtype=torch.long)).numpy())

    def result(self) -> Ranking:
        values = {k: float(v) for k, v in self.metric.compute().items()}
        return Ranking(self.query_idx, np.concatenate(self.tops), np.concatenate(self.top_scores),
                       np.concatenate(self.first_pos), values)


def relevance_from_search(module: Any, faiss_distances: np.ndarray, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, relevance score) on CPU for FAISS results: squared L2, or inner products of unit vectors."""
    dist = torch.from_numpy(faiss_distances)
    distance = 1.0 - dist if cosine else torch.sqrt(torch.clamp(dist, min=1e-7))
    with torch.inference_mode():
        return distance, module.score_distances(distance.to(module.device)).float().cpu()


def rank_queries(
    module: Any,
    db_inputs: Tensors,
    q_inputs: Tensors,
    query_idx: np.ndarray,
    sim: np.ndarray,
    fov: np.ndarray,
    top_ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    keep_top: int = 10,
    query_chunk: int = 256,
    embed_batch: int = 512,
    index_cfg: IndexConfig | None = None,
) -> Ranking:
    """Embed the database once, search every query against all of it, score the full ranking."""
    db_emb = embed_all(module, db_inputs, embed_batch)
    q_emb = embed_all(module, take(q_inputs, query_idx), embed_batch)
    return rank_embeddings(module, db_emb, q_emb, query_idx, sim, fov, top_ks, ndcg_k, keep_top, query_chunk,
                           index_cfg)


def rank_embeddings(
    module: Any,
    db_emb: torch.Tensor,
    q_emb: torch.Tensor,
    query_idx: np.ndarray,
    sim: np.ndarray,
    fov: np.ndarray,
    top_ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10,
    keep_top: int = 10,
    query_chunk: int = 256,
    index_cfg: IndexConfig | None = None,
) -> Ranking:
    """Search already computed query embeddings (rows of `query_idx`) against the database embeddings."""
    cosine = getattr(module, "distance_kind", "euclidean") == "cosine"
    if cosine:
        db_emb, q_emb = torch.nn.functional.normalize(db_emb, dim=-1), torch.nn.functional.normalize(q_emb, dim=-1)
    index = build_index(db_emb.numpy(), index_cfg or IndexConfig(metric="ip" if cosine else "l2"))
    n_db = db_emb.shape[0]
    builder = RankingBuilder(query_idx, sim, fov, top_ks, ndcg_k, keep_top)
    for start in range(0, len(query_idx), query_chunk):
        qi = query_idx[start : start + query_chunk]
        dist, ids = search(index, q_emb[start : start + query_chunk].numpy(), k=n_db)
        _, ranked_scores = relevance_from_search(module, dist, cosine)
        builder.add(qi, torch.empty_like(ranked_scores).scatter_(1, torch.from_numpy(ids), ranked_scores))
    return builder.result()


def embed_sharded(trainer: pl.Trainer, module: Any, inputs: Tensors, batch_size: int = 512) -> torch.Tensor:
    """Embeddings of every item under DDP: rank r embeds the r-th contiguous block, the blocks are all-gathered.

    Every rank returns the full (n, dim) tensor on CPU, in the original order.
    """
    n = len(next(iter(inputs.values())))
    world, rank = trainer.world_size, trainer.global_rank
    block = -(-n // world)
    start, stop = min(rank * block, n), min((rank + 1) * block, n)
    idx = np.arange(start, stop)
    local = embed_all(module, take(inputs, idx), batch_size) if len(idx) else None
    dim = torch.tensor([local.shape[1] if local is not None else 0], device=module.device)
    dim = int(trainer.strategy.reduce(dim, reduce_op="max").item())
    padded = torch.zeros(block, dim)
    if local is not None:
        padded[: len(local)] = local
    gathered = module.all_gather(padded.to(module.device)).reshape(world * block, dim).cpu()
    return gathered[:n]


def ranking_grid(dataset: Any, ranking: Ranking, n_queries: int = 6, top_k: int = 5, seed: int = 0) -> np.ndarray:
    """RGB grid of `n_queries` seeded queries (those with a positive, when any) and their top-k, by relevance."""
    rng = np.random.default_rng(seed)
    with_pos = np.flatnonzero(ranking.first_positive_rank > 0)
    pool = with_pos if len(with_pos) else np.arange(len(ranking.query_idx))
    pick = np.sort(rng.choice(pool, size=min(n_queries, len(pool)), replace=False))
    k = min(top_k, ranking.top_ids.shape[1])
    return retrieval_grid(
        [dataset.query_file(int(ranking.query_idx[i])) for i in pick],
        [[dataset.db_file(int(j)) for j in ranking.top_ids[i, :k]] for i in pick],
        [[bool(dataset.sim[ranking.query_idx[i], j]) for j in ranking.top_ids[i, :k]] for i in pick],
        [ranking.top_scores[i, :k].tolist() for i in pick],
    )


class RetrievalMetrics(pl.Callback):
    """Logs {val,test}/precision@k, recall@k, mAP, ndcg@10 over the full database each evaluation."""

    def __init__(
        self,
        top_ks: Sequence[int] = (1, 5, 10),
        ndcg_k: int = 10,
        keep_top: int = 10,
        query_chunk: int = 256,
        embed_batch: int = 512,
        index: dict[str, Any] | None = None,
    ) -> None:
        self.top_ks, self.ndcg_k, self.keep_top = tuple(top_ks), ndcg_k, keep_top
        self.query_chunk, self.embed_batch = query_chunk, embed_batch
        self.index_cfg = IndexConfig(**index) if index else None
        self.rankings: dict[str, Ranking] = {}

    def _evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        query_idx = dm.split_queries(stage)
        if len(query_idx) == 0:
            return
        ds = dm.dataset
        if trainer.world_size > 1:
            # DDP: every rank embeds its shard of the database and queries, the shards are gathered, global
            # rank zero searches and scores once and broadcasts the values, so every rank logs the same numbers
            # (ModelCheckpoint monitors them on every rank) and nothing is computed twice.
            db_emb = embed_sharded(trainer, module, dm.db_inputs, self.embed_batch)
            q_emb = embed_sharded(trainer, module, take(dm.q_inputs, query_idx), self.embed_batch)
            values = None
            if trainer.is_global_zero:
                ranking = rank_embeddings(module, db_emb, q_emb, query_idx, ds.sim, ds.fov, self.top_ks,
                                          self.ndcg_k, self.keep_top, self.query_chunk, self.index_cfg)
                self.rankings[stage] = ranking
                values = ranking.metrics
            values = trainer.strategy.broadcast(values, src=0)
        else:
            ranking = rank_queries(module, dm.db_inputs, dm.q_inputs, query_idx, ds.sim, ds.fov, self.top_ks,
                                   self.ndcg_k, self.keep_top, self.query_chunk, self.embed_batch, self.index_cfg)
            self.rankings[stage] = ranking
            values = ranking.metrics
        for name, value in values.items():
            # identical on every rank by construction: no sync_dist reduction (it could only add rounding)
            module.log(f"{stage}/{name}", float(value), prog_bar=name in ("recall@1", "precision@10"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        quiet_known_warnings()  # processes spawned by ddp_spawn do not inherit the parent's warning filters

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")


class RetrievalExamples(pl.Callback):
    """At test end: a grid PNG of queries with their top-k (and the same image + a per-query table in W&B)."""

    def __init__(self, output_dir: str, n_queries: int = 6, top_k: int = 5, seed: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.n_queries, self.top_k, self.seed = n_queries, top_k, seed
        self.grid_path: Path | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics_cb = next((c for c in trainer.callbacks if isinstance(c, RetrievalMetrics)), None)
        if metrics_cb is None or "test" not in metrics_cb.rankings or not trainer.is_global_zero:
            return
        ranking, ds = metrics_cb.rankings["test"], trainer.datamodule.dataset
        grid = ranking_grid(ds, ranking, self.n_queries, self.top_k, self.seed)
        self.grid_path = save_png(self.output_dir / "retrieval_grid_test.png", grid)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="test/retrieval_examples", images=[grid],
                             caption=["query | top-k (green: sim=1, red: sim=0)"])
            if hasattr(lg, "log_table"):
                rows = [
                    [ds.q_paths[int(q)], int(r), float(ds.sim[q, ranking.top_ids[i]].mean()),
                     " ".join(ds.db_paths[int(j)] for j in ranking.top_ids[i])]
                    for i, (q, r) in enumerate(zip(ranking.query_idx, ranking.first_positive_rank))
                ]
                lg.log_table(key="test/per_query",
                             columns=["query", "first_positive_rank", f"precision@{ranking.top_ids.shape[1]}", "top_k"],
                             data=rows)
