"""Lightning callbacks: retrieval metrics over the full database, and retrieval example grids.

The metrics live in a callback, not in the module, so that every encoder gets the same evaluation; the
callback only decides when and on which split, the retrieval engine (retrieval/ranking.py) does the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from siamese_retrieval.data.inputs import take
from siamese_retrieval.retrieval.ranking import (
    Ranking,
    RankingSettings,
    embed_sharded,
    rank_embeddings,
    rank_queries,
    ranking_grid,
)
from siamese_retrieval.retrieval.visualize import save_png
from siamese_retrieval.run_outputs import quiet_known_warnings

log = logging.getLogger(__name__)


class RetrievalMetrics(pl.Callback):
    """Logs {val,test}/precision@k, recall@k, mAP, ndcg@10 over the full database each evaluation.

    Keyword arguments are `RankingSettings` fields (top_ks, ndcg_k, keep_top, query_chunk, embed_batch,
    index), as in conf/callbacks/default.yaml.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = RankingSettings.from_config(settings)
        self.rankings: dict[str, Ranking] = {}

    def _evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        query_idx = dm.splits.queries(stage)
        if len(query_idx) == 0:
            return
        ds = dm.dataset
        if trainer.world_size > 1:
            # DDP: every rank embeds its shard of the database and queries, the shards are gathered, global
            # rank zero searches and scores once and broadcasts the values, so every rank logs the same numbers
            # (ModelCheckpoint monitors them on every rank) and nothing is computed twice.
            db_emb = embed_sharded(trainer, module, dm.db_inputs, self.settings.embed_batch)
            q_emb = embed_sharded(trainer, module, take(dm.q_inputs, query_idx), self.settings.embed_batch)
            values = None
            if trainer.is_global_zero:
                ranking = rank_embeddings(module, db_emb, q_emb, query_idx, ds, self.settings)
                self.rankings[stage] = ranking
                values = ranking.metrics
            values = trainer.strategy.broadcast(values, src=0)
        else:
            ranking = rank_queries(module, dm.db_inputs, dm.q_inputs, query_idx, ds, self.settings)
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
