"""Lightning callbacks: retrieval metrics over the full database, retrieval example grids, and the W&B run's
best val/* summary and its record in the checkpoints.

The metrics live in a callback, not in the module, so that every encoder gets the same evaluation; the
callback only decides when and on which split, the retrieval engine (retrieval/ranking.py) does the rest.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from siamese_retrieval.data.inputs import take
from siamese_retrieval.models.embedding import embed_sharded
from siamese_retrieval.registry import METRICS
from siamese_retrieval.retrieval.metrics import retrieval_metric_names
from siamese_retrieval.retrieval.ranking import (
    Ranking,
    RankingSettings,
    rank_embeddings,
    rank_queries,
    ranking_grid,
)
from siamese_retrieval.retrieval.visualize import save_png
from siamese_retrieval import wandb_runs
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

    @staticmethod
    def of(trainer: pl.Trainer) -> "RetrievalMetrics | None":
        """The trainer's RetrievalMetrics callback, or None when it has none."""
        return next((c for c in trainer.callbacks if isinstance(c, RetrievalMetrics)), None)

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


class BenchmarkMetrics(pl.Callback):
    """train.py `benchmark_monitor=LABEL`: every validation also ranks all queries of that benchmark (another
    dataset, read once with the model's own input builder) and logs val/<LABEL>/<metric>, which the checkpoint
    then monitors. The numbers are those evaluate.py gives the same checkpoint on that benchmark (split=all)."""

    def __init__(self, label: str, data_cfg: Any, inputs: Any, settings: Any) -> None:
        self.label, self.data_cfg, self.inputs = label, data_cfg, inputs
        self.settings = RankingSettings.from_config(settings)
        self.dm: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dm is None:
            from siamese_retrieval.data.datamodule import build_datamodule, evaluation_data_config

            self.dm = build_datamodule(evaluation_data_config(self.data_cfg), self.inputs)
            self.dm.prepare_data()
            self.dm.setup_unsplit()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.dm is None:
            return
        ds = self.dm.dataset
        query_idx = np.arange(ds.n_query, dtype=np.int64)
        values = rank_queries(pl_module, self.dm.db_inputs, self.dm.q_inputs, query_idx, ds, self.settings).metrics
        for name, value in values.items():
            pl_module.log(f"val/{self.label}/{name}", float(value), prog_bar=name == "recall@1")


class RetrievalExamples(pl.Callback):
    """At test end: a grid PNG of queries with their top-k; in W&B the same image and a per-query table with
    image cells (wandb_runs.per_query_table: thumbnails bordered green/red by relevance, scores and
    first_positive_rank as numbers); in TensorBoard the image."""

    def __init__(self, output_dir: str, n_queries: int = 6, top_k: int = 5, seed: int = 0,
                 table_images: int = 100) -> None:
        self.output_dir = Path(output_dir)
        self.n_queries, self.top_k, self.seed, self.table_images = n_queries, top_k, seed, table_images
        self.grid_path: Path | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics_cb = RetrievalMetrics.of(trainer)
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
                columns, rows = wandb_runs.per_query_table(ds, ranking, top_k=self.top_k, image_rows=self.table_images)
                lg.log_table(key="test/per_query", columns=columns, data=rows)
            elif type(lg).__name__ == "TensorBoardLogger":
                lg.experiment.add_image("test/retrieval_examples", grid, global_step=trainer.global_step,
                                        dataformats="HWC")


class BestValSummary(pl.Callback):
    """W&B summary of a training run: each val/* metric's best value and the epoch it was reached.

    `define_metric` makes W&B keep `val/<m>` = {max or min, last} in the summary and plot val/* against
    `epoch`; this callback adds `best_epoch/val/<m>` (0-based, the `epoch` axis). A no-op without W&B.
    The names are what the run logs: the module's loss and range key, and the RetrievalMetrics callback's
    metrics (retrieval_metric_names of its settings); each one's direction is its family's in
    registry.METRICS (METRICS.best_mode), and a name of no registered family gets no summary."""

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}
        self.best: dict[str, tuple[float, int]] = {}

    def _val_names(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[str]:
        names = ["val/loss"]
        if getattr(module, "range_key", None):
            names.append(f"val/{module.range_key}")
        metrics_cb = RetrievalMetrics.of(trainer)
        if metrics_cb is not None:
            s = metrics_cb.settings  # streaming (search_k): mAP@k, the mAP of the top k
            names += [f"val/{m}" for m in retrieval_metric_names(s.top_ks, s.ndcg_k, s.search_k)]
        return names

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        runs = wandb_runs.wandb_runs(trainer.loggers)
        self.modes = {n: m for n in self._val_names(trainer, pl_module) if (m := METRICS.best_mode(n))}
        for run in runs:
            run.define_metric("epoch")
            run.define_metric("val/*", step_metric="epoch")
            for name, mode in self.modes.items():  # a '.' in a metric name is a nesting level unless escaped
                run.define_metric(name.replace(".", "\\."), step_metric="epoch", summary=f"{mode},last")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero or not self.modes:
            return
        epoch, changed = int(trainer.current_epoch), {}
        for name, mode in self.modes.items():
            value = trainer.callback_metrics.get(name)
            if value is None or not math.isfinite(float(value)):
                continue
            value = float(value)
            old = self.best.get(name)
            if old is None or (value > old[0] if mode == "max" else value < old[0]):
                self.best[name] = (value, epoch)
                changed[f"best_epoch/{name}"] = epoch
        for run in wandb_runs.wandb_runs(trainer.loggers):
            run.summary.update(changed)


class WandbRunInCheckpoint(pl.Callback):
    """Records the W&B run a model is trained in (wandb_runs.wandb_run_info: project, group, name, id) in each
    checkpoint, as training_data["wandb"], so that evaluate.py logs into the training run's W&B group.

    Only where SiameseModule.on_save_checkpoint records the training data (a datamodule with a split config);
    Lightning calls this hook before the module's, which keeps what is here. A no-op without W&B."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "split_cfg"):
            return
        run = wandb_runs.wandb_run_info(trainer.loggers)
        if run:
            checkpoint.setdefault("training_data", {})["wandb"] = run
