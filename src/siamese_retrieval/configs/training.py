"""The schema of train.py's own groups: trainer, callbacks, logger (conf/trainer, conf/callbacks, conf/logger)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from siamese_retrieval.configs.fields import ABSENT, Built, Getter, is_int, knob, node
from siamese_retrieval.configs.model import SEED_RANGE
from siamese_retrieval.configs.search import Index
from siamese_retrieval.errors import ConfigError

# Lightning 2.x's precision values (lightning_fabric/plugins/precision/precision.py): ints and strings.
PRECISIONS: tuple[Any, ...] = (
    64, 32, 16, "64", "32", "16", "bf16",
    "64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "transformer-engine", "transformer-engine-float16",
)


@dataclass
class Trainer(Built):
    """Lightning's Trainer arguments the shipped configs set (more with +trainer.<name>=...)."""

    max_epochs: int = knob("-1: endless (warns); 0: no training (warns)", ge=-1)
    min_epochs: Optional[int] = knob(ge=0)
    max_steps: int = knob(ge=-1)
    min_steps: Optional[int] = knob(ge=0)
    limit_train_batches: Any = knob(kind="batches")
    limit_val_batches: Any = knob(kind="batches")
    limit_test_batches: Any = knob(kind="batches")
    limit_predict_batches: Any = knob(kind="batches")
    accelerator: str = knob(choices=("cpu", "gpu", "cuda", "mps", "tpu", "auto"))
    devices: Any = knob(kind="devices")
    num_nodes: int = knob(ge=1)
    strategy: str = knob("auto | ddp | ddp_spawn | ... (Lightning's registry)")
    sync_batchnorm: bool = knob()
    precision: Any = knob(choices=PRECISIONS)
    check_val_every_n_epoch: int = knob(ge=1)
    log_every_n_steps: int = knob("0: no step logging", ge=0)
    num_sanity_val_steps: int = knob("-1: the whole val set", ge=-1)
    deterministic: bool = knob()
    enable_model_summary: bool = knob()
    default_root_dir: str = knob(kind="path")
    fast_dev_run: Any = knob("debug=fdr: true or a number of batches")
    overfit_batches: Any = knob("debug=overfit", kind="batches")
    profiler: Any = knob("debug=profiler: a Lightning profiler (name or node)")


def check_search_k(get: Getter, at: str) -> None:
    """Streaming metrics are read from each query's top search_k: it must reach every k they report."""
    search_k, top_ks, ndcg_k = get("search_k"), get("top_ks"), get("ndcg_k")
    ks = [k for k in (top_ks if isinstance(top_ks, list) else []) + [ndcg_k] if is_int(k)]
    if is_int(search_k) and ks and search_k < max(ks):
        raise ConfigError(f"{at}search_k={search_k}: must be >= {max(ks)}, the largest of its top_ks and ndcg_k "
                          f"(streaming metrics are read from each query's top search_k)")


@dataclass
class RetrievalMetrics(Built):
    """callbacks.RetrievalMetrics: the val/test retrieval metrics."""

    top_ks: List[int] = knob(ge=1, non_empty=True)
    ndcg_k: int = knob(ge=1)
    keep_top: int = knob(ge=1)
    query_chunk: int = knob(ge=1)
    search_k: Optional[int] = knob("null: full ranking", ge=1)
    embed_batch: int = knob(ge=1)
    index: Optional[Index] = node("the index of the metrics (conf/index)")

    check = staticmethod(check_search_k)  # search_k >= every k of top_ks and ndcg_k


@dataclass
class RetrievalExamples(Built):
    output_dir: str = knob(kind="path")
    table_images: int = knob("per-query table: thumbnails for this many queries", ge=0)
    n_queries: int = knob(ge=1)
    top_k: int = knob(ge=1)
    seed: int = knob(**SEED_RANGE)


@dataclass
class ModelCheckpoint(Built):
    dirpath: str = knob(kind="path")
    filename: str = knob()
    auto_insert_metric_name: bool = knob()
    monitor: Optional[str] = knob()
    mode: str = knob(choices=("min", "max"))
    save_last: bool = knob()
    save_top_k: int = knob("-1: every epoch", ge=-1)


@dataclass
class LastCheckpoint(Built):
    """checkpoints/last.ckpt after every epoch (Lightning's ModelCheckpoint without a monitor)."""

    dirpath: str = knob(kind="path")
    filename: str = knob()
    monitor: Optional[str] = knob("null: no metric, the newest epoch replaces the one before")
    save_top_k: int = knob(ge=1)
    enable_version_counter: bool = knob("false: a resumed run overwrites last.ckpt")


@dataclass
class Callbacks:
    """conf/callbacks: Lightning callbacks by name (null: off). The package's own are typed; Lightning's are its."""

    retrieval_metrics: Optional[RetrievalMetrics] = node()
    retrieval_examples: Optional[RetrievalExamples] = node()
    model_checkpoint: Optional[ModelCheckpoint] = node("the best epoch")
    last_checkpoint: Optional[LastCheckpoint] = node("last.ckpt, every epoch (resume)")
    early_stopping: Optional[Dict[str, Any]] = knob("Lightning's EarlyStopping")
    lr_monitor: Optional[Dict[str, Any]] = knob("Lightning's LearningRateMonitor")
    model_summary: Optional[Dict[str, Any]] = knob()
    rich_progress_bar: Optional[Dict[str, Any]] = knob()
    aggregation_fitting: Optional[Dict[str, Any]] = knob("NetVLAD centroids / whitening fitted before training")
    best_val_summary: Optional[Dict[str, Any]] = knob()
    wandb_run_in_checkpoint: Optional[Dict[str, Any]] = knob()

    @staticmethod
    def check(get: Getter, at: str) -> None:
        """Streaming evaluation logs mAP@<search_k>, not the full ranking's mAP: a monitor of val/mAP would fail
        after the first epoch, so say which name to monitor before anything runs."""
        search_k = get("retrieval_metrics.search_k")
        if search_k in (ABSENT, None):
            return
        for name in ("model_checkpoint.monitor", "early_stopping.monitor"):
            if get(name) == "val/mAP":
                key = at + name
                raise ConfigError(f"{key}='val/mAP': with {at}retrieval_metrics.search_k={search_k} the metric is "
                                  f"val/mAP@{search_k}; set {key}=val/mAP@{search_k} (or val/recall@1)")


@dataclass
class Wandb(Built):
    project: str = knob()
    name: Optional[str] = knob()
    group: Optional[str] = knob()
    job_type: Optional[str] = knob("default: train | eval | baseline")
    tags: List[str] = knob("+ the model and data names")
    mode: Optional[str] = knob("offline | online | disabled (null: WANDB_MODE, else offline)")
    save_dir: str = knob(kind="path")
    save_code: bool = knob()
    settings: Optional[Dict[str, Any]] = knob("wandb.Settings")
    log_model: Any = knob("best: the kept checkpoints at the end of training; all: every checkpoint",
                          choices=(False, True, "best", "all"))


@dataclass
class Logger:
    wandb: Optional[Wandb] = node()
    csv: Optional[Dict[str, Any]] = knob("Lightning's CSVLogger")
    tensorboard: Optional[Dict[str, Any]] = knob("Lightning's TensorBoardLogger")
