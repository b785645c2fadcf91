"""Typed configs: the schema of train / eval / retrieve as dataclasses, one module per group.

    model.py     conf/model     Model (the SiameseModule's arguments, inputs, place batches, training city)
    data.py      conf/data      Data (synthetic city, files, layout options, split, pairs)
    training.py  conf/trainer, conf/callbacks, conf/logger
    search.py    conf/index, conf/rerank, conf/orb, orb_bow
    fields.py    knob(), node() and the walker that checks a composed config against a dataclass

`check_config(cfg, task)` checks the composed config right after composition (cli.py), before torch is
imported, and raises ConfigError with ONE line for the first bad value; it returns the warnings of values that
work but are probably not meant. Each dataclass's `check(get, at)` holds its cross-field rules, beside its
fields. The task roots and every group's node are registered in Hydra's ConfigStore (`schema/<name>`): a
user's config can extend them (`defaults: [/schema/model@_here_]` types a model config at composition).

Decisions:
  * trainer.max_epochs (and model.max_epochs, its default) is an integer >= -1: -1 is Lightning's "no epoch
    limit" and warns (unless trainer.max_steps or trainer.max_time bounds the run); 0 is allowed (Lightning fits
    nothing: validation/test score the untrained model) and warns when `train=true`.
  * seeds are in [0, 2**32 - 1] (numpy's and Lightning's seed range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.configs.data import Data
from siamese_retrieval.configs.fields import ABSENT, Getter, Rule, Walk, knob, node, rules
from siamese_retrieval.configs.model import SEED_RANGE, Model
from siamese_retrieval.configs.search import Index, OrbBow, OrbRansac, Rerank
from siamese_retrieval.configs.training import Callbacks, Logger, Trainer, check_search_k

__all__ = ["SCHEMAS", "TASKS", "check_config", "knob", "node", "register_schemas", "task_rules", "TrainConfig",
           "EvalConfig", "RetrieveConfig"]


@dataclass
class Trust:
    allow: List[str] = knob("classes a checkpoint may name beyond the registered components (trust.py)")


@dataclass
class Common:
    """The keys of every task's root."""

    task_name: str = knob("train | eval | retrieve: which schema applies")
    paths: Optional[Dict[str, Any]] = knob("conf/paths: root, log, cache and output directories")
    seed: int = knob("python/numpy/torch seed", **SEED_RANGE)
    ckpt_path: Optional[str] = knob("train: resume from it ('last': last.ckpt); eval/retrieve: required", kind="path")
    imports: List[str] = knob("the user's modules to import first (their components register themselves)")
    trust: Optional[Trust] = node()
    model: Optional[Model] = node()
    data: Optional[Data] = node()
    index: Optional[Index] = node()


@dataclass
class TrainConfig(Common):
    """conf/train.yaml."""

    train: bool = knob("fit before testing")
    test: bool = knob("test the best checkpoint after training")
    experiment_name: Optional[str] = knob("W&B group of a study")
    tags: List[str] = knob("extra W&B tags (quote numbers: tags=['2024'])")
    optimized_metric: str = knob("returned to sweepers")
    trainer: Optional[Trainer] = node()
    callbacks: Optional[Callbacks] = node()
    logger: Optional[Logger] = node()
    benchmarks: List[str] = knob("NAME:ROOT entries, each evaluated with split=all after fitting")
    benchmark_monitor: Optional[str] = knob("a benchmark validated on every epoch")

    @staticmethod
    def warnings(get: Getter) -> Iterator[str]:
        max_epochs = get("trainer.max_epochs")
        if max_epochs == -1 and get("train") is not False:
            max_steps, max_time = get("trainer.max_steps"), get("trainer.max_time")
            if max_steps in (ABSENT, -1, None) and max_time in (ABSENT, None):  # not bounded by steps or time
                yield ("trainer.max_epochs=-1: training never ends by itself (endless); "
                       "stop it with Ctrl-C or set trainer.max_epochs")
                if get("model.module.scheduler.T_max") is None:  # present and null
                    yield ("model.module.scheduler.T_max=null: with trainer.max_epochs=-1 the cosine schedule "
                           "spans 1 epoch and then restarts; set model.module.scheduler.T_max")
        if max_epochs == 0 and get("train") is True:
            yield ("trainer.max_epochs=0: no training; validation and test score the untrained model "
                   "(train=false says so explicitly)")


@dataclass
class EvalGrid:
    n_queries: int = knob(ge=1)
    top_k: int = knob(ge=1)


@dataclass
class EvalConfig(Common):
    """conf/eval.yaml."""

    method: str = knob(choices=("model", "orb_ransac", "orb_bow"))
    fit_only: bool = knob("fit the rerank= re-ranker and stop")
    benchmarks: List[str] = knob("NAME:ROOT entries, each evaluated with split=all")
    split: str = knob(choices=("test", "val", "train", "all"))
    device: str = knob(choices=("auto", "cpu", "cuda"))
    top_ks: List[int] = knob("precision@k / recall@k", ge=1, non_empty=True)
    ndcg_k: int = knob(ge=1)
    search_k: Optional[int] = knob("null: full ranking; K: streaming top-K metrics", ge=1)
    embed_batch: int = knob(ge=1)
    rerank: Optional[Rerank] = node(registry="RERANKERS")
    orb_ransac: Optional[OrbRansac] = node()
    orb_bow: Optional[OrbBow] = node()
    grid: Optional[EvalGrid] = node()
    logger: Optional[Logger] = node()

    check = staticmethod(check_search_k)  # search_k >= every k of top_ks and ndcg_k


@dataclass
class RetrieveGrid:
    dir: Optional[str] = knob("retrieval_grid-<query>.png goes here; null: no grid", kind="path")
    max_queries: int = knob(ge=1)


@dataclass
class RetrieveConfig(Common):
    """conf/retrieve.yaml."""

    query: Optional[str] = knob("an image or a folder (required)", kind="path")
    top_k: int = knob("capped at the database size", ge=1)
    output: str = knob(choices=("table", "json"))
    cache: bool = knob()
    index_cache_dir: str = knob("the database index cache (safe to delete)", kind="path")
    device: str = knob(choices=("auto", "cpu", "cuda"))
    embed_batch: int = knob(ge=1)
    rerank: Optional[Rerank] = node(registry="RERANKERS")
    orb_ransac: Optional[OrbRansac] = node()
    grid: Optional[RetrieveGrid] = node()


SCHEMAS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig, "retrieve": RetrieveConfig}
TASKS: tuple[str, ...] = tuple(SCHEMAS)


def check_config(cfg: DictConfig, task: str | None = None) -> list[str]:
    """Check the composed config of `task` (train | eval | retrieve; default: cfg.task_name).

    Raises ConfigError (one line) for the first bad value; returns the warnings (one line each)."""
    task = task or str(OmegaConf.select(cfg, "task_name", default=""))
    if task not in SCHEMAS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    schema = SCHEMAS[task]
    walk = Walk(cfg)
    walk.node(schema)
    walk.finish()
    warn: Callable[[Getter], Iterable[str]] | None = getattr(schema, "warnings", None)
    return list(warn(walk.getter(""))) if warn else []


def task_rules(task: str) -> list[Rule]:
    """Every value rule of a task's config, flattened (docs and tests)."""
    return list(rules(SCHEMAS[task]))


def register_schemas() -> None:
    """The task roots and each group's node in Hydra's ConfigStore, as `schema/<name>`."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in {**SCHEMAS, "model": Model, "data": Data, "index": Index, "rerank": Rerank,
                         "orb": OrbRansac, "trainer": Trainer, "callbacks": Callbacks, "logger": Logger}.items():
        store.store(group="schema", name=name, node=schema)

