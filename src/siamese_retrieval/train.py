"""Training pipeline behind `python train.py`: config -> datamodule/model/callbacks/loggers -> fit -> test.

Reads top-down: `train(cfg)` is the whole story; the helpers below it each do one thing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.accelerators import CUDAAccelerator, MPSAccelerator
from pytorch_lightning.callbacks import LearningRateMonitor

from siamese_retrieval.benchmarks import benchmark_data, benchmark_entries
from siamese_retrieval.callbacks import BenchmarkMetrics
from siamese_retrieval.checkpoints import check_resumable, read_checkpoint
from siamese_retrieval.data.datamodule import build_datamodule
from siamese_retrieval.errors import ConfigError, instantiate_config
from siamese_retrieval.malloc_tuning import tune_malloc
from siamese_retrieval.resume import resolve_ckpt_path, wandb_run_id
from siamese_retrieval.run_outputs import (
    finish_loggers,
    hydra_mode,
    print_results,
    quiet_known_warnings,
    run_dir,
    sweep_group,
    task_overrides,
    write_metrics_json,
)
from siamese_retrieval.trust import allow_list, iter_targets
from siamese_retrieval.wandb_runs import (
    check_wandb_login,
    is_wandb,
    logged_config,
    logger_settings,
    make_loggers,
    training_run_name,
    write_summary,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint. Returns the metrics.json content."""
    started = time.perf_counter()
    tune_malloc()  # malloc_tuning.py: freed activations reused, not faulted in again every step
    quiet_known_warnings()
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = run_dir(cfg)
    check_accelerator(cfg.trainer)
    check_wandb_login(cfg)

    resume_from = resolve_ckpt_path(cfg.ckpt_path, out_dir)
    # the same checks as evaluate.py, before any work: a bad file is one line
    # the file's targets: registered, trust.allow=[...], or what this run's own model config names (the user's)
    own = sorted({t for _, t in iter_targets(OmegaConf.to_container(cfg.model, resolve=True))})
    resume_raw = read_checkpoint(resume_from, allow_list(cfg), also=own) if resume_from is not None else None
    # every node of the user's config is built by instantiate_config: one that cannot be built (a `_target_` that
    # does not import, a keyword its class does not take, a value it refuses) is one line naming the node
    datamodule = build_datamodule(cfg.data, instantiate_config("model.inputs", cfg.model.inputs))
    datamodule.prepare_data()
    datamodule.setup("fit")  # validates the dataset now: a bad root fails before any model is built
    model = instantiate_config("model.module", cfg.model.module, _recursive_=False)
    if resume_raw is not None:
        check_resumable(resume_raw, resume_from, model, str(cfg.model.name))
    monitor = benchmark_monitor(cfg, datamodule)  # before the callbacks: it sets what the checkpoint monitors
    callbacks = [instantiate_config(f"callbacks.{k}", c) for k, c in (cfg.get("callbacks") or {}).items()
                 if c is not None] + ([monitor] if monitor is not None else [])
    loggers = build_loggers(cfg)  # the resolved config logged once, with the W&B run's actual name/group/tags
    if not loggers:  # logger=none: LearningRateMonitor refuses a trainer without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate_config("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)

    try:
        if cfg.train:
            fit(trainer, model, datamodule, resume_from)
        best = best_checkpoint(trainer)
        metrics: dict[str, float] = {}
        if datamodule.splits is not None and len(datamodule.splits.val_q):
            metrics.update(first(trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)))
        if cfg.test:
            metrics.update(first(trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)))
        result = {
            "status": "ok",
            "model": cfg.model.name,
            "data": cfg.data.name,
            "seed": int(cfg.seed),
            "overrides": task_overrides(),
            "epochs": epochs_trained(trainer) if cfg.train else int(trainer.current_epoch),
            "checkpoint": best,
            "elapsed_s": round(time.perf_counter() - started, 2),
            "splits": datamodule.splits.summary() if datamodule.splits is not None else {},
            # layouts: the positives' radii (training 10 m, evaluation 25 m by default); other data: none
            "positives": {k: v for k, v in (OmegaConf.select(cfg, "data.layout_options", default=None) or {}).items()
                          if k in ("radius_m", "train_radius_m")},
            "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        }
        # W&B summary: test/* and the run's facts; val/* keep their best + last (callbacks.BestValSummary)
        write_summary(loggers, {**result["metrics"], "epochs": result["epochs"], "elapsed_s": result["elapsed_s"]})
        if trainer.is_global_zero:  # under trainer=ddp, ranks > 0 run this script too: one writer
            write_metrics_json(out_dir / "metrics.json", result)
    finally:
        finish_loggers(loggers)
    if trainer.is_global_zero:  # last, below W&B's closing lines
        print_results(result["metrics"], title=f"{result['model']} on {result['data']} (seed {result['seed']})",
                      footer=f"best checkpoint: {best}" if best else None)
    return result


def fit(trainer: pl.Trainer, model: Any, datamodule: Any, resume_from: str | None) -> None:
    """trainer.fit. On Ctrl-C Lightning shuts down and exits 1 without a word on this run's console: the
    KeyboardInterrupt raised instead says where the run stopped and how to continue it (cli.py: exit 130)."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    except SystemExit:
        if not trainer.interrupted:
            raise
        last = last_checkpoint(trainer)
        if last is None:
            how = "no epoch finished, so there is nothing to continue"
        elif hydra_mode() == "MULTIRUN":  # a sweep's job: ckpt_path=last is the rule of single runs
            how = f"its last finished epoch is in {last}"
        else:
            how = f"the same command with ckpt_path=last continues this run from {last} (its last finished epoch)"
        raise KeyboardInterrupt(f"training stopped in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; "
                                f"{how}") from None


GPU_KINDS = {"gpu": (CUDAAccelerator, MPSAccelerator), "cuda": (CUDAAccelerator,), "mps": (MPSAccelerator,)}


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """trainer=gpu on a machine without one: one line now, not Lightning's refusal after the city was rendered and
    its images decoded (minutes on a fresh machine)."""
    name = str(trainer_cfg.get("accelerator") or "auto")
    if name in GPU_KINDS and not any(kind.is_available() for kind in GPU_KINDS[name]):
        raise ConfigError(f"trainer.accelerator={name!r}: this machine has no GPU that Lightning can use; "
                          "add trainer=default (it takes a GPU where there is one)")


def benchmark_monitor(cfg: DictConfig, datamodule: Any) -> BenchmarkMetrics | None:
    """`benchmark_monitor=LABEL` (one of `benchmarks`): validate on that benchmark every epoch and keep the
    checkpoint (and early stopping, if on) by its val/LABEL/recall@1."""
    label = cfg.get("benchmark_monitor")
    if not label:
        return None
    entries = {lb: (name, root) for lb, name, root in benchmark_entries(cfg.get("benchmarks"))}
    if label not in entries:
        raise ConfigError(f"benchmark_monitor={label}: not one of benchmarks "
                          f"({', '.join(entries) or 'none given: add benchmarks=[NAME:ROOT]'})")
    metric = f"val/{label}/recall@1"
    with open_dict(cfg):
        for key in ("model_checkpoint", "early_stopping"):
            if OmegaConf.select(cfg, f"callbacks.{key}") is not None:
                cfg.callbacks[key].monitor, cfg.callbacks[key].mode = metric, "max"
    node = OmegaConf.select(cfg, "callbacks.retrieval_metrics")  # `_target_`: no RankingSettings field, ignored
    settings = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    log.info("validating on benchmark %s (%s) every epoch; the checkpoint monitors %s", label, entries[label][1],
             metric)
    return BenchmarkMetrics(label, benchmark_data(*entries[label]), datamodule.inputs, settings)


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The `logger` configs instantiated; W&B: job_type train, name and group from wandb_runs (a value set in
    conf/logger wins), tags + model and data. Each logger gets the run's one resolved config."""
    settings = logger_settings(cfg, "train", name=training_run_name(cfg), group=sweep_group(cfg),
                               tags=[cfg.model.name, cfg.data.name])
    run_id = wandb_run_id(cfg.paths.output_dir) if cfg.get("ckpt_path") else None  # resuming: the same W&B run
    if run_id is not None:
        settings = {k: {**lg, "id": lg.get("id") or run_id, "resume": "allow"} if is_wandb(lg) else lg
                    for k, lg in settings.items()}
    return make_loggers(settings, logged_config(cfg, settings))


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is None:
        return None
    return ckpt_cb.best_model_path or ckpt_cb.last_model_path or None


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The run's last.ckpt (written after every epoch: the last one finished), or None before there is one."""
    ckpt_cb = trainer.checkpoint_callback
    dirpath = getattr(ckpt_cb, "dirpath", None) if ckpt_cb is not None else None
    last = Path(dirpath) / "last.ckpt" if dirpath else None
    return last if last is not None and last.is_file() else None


def epochs_trained(trainer: pl.Trainer) -> int:
    """Epochs completed by fit (resumed ones included).

    Under ddp_spawn the fit ran in child processes and the main process's trainer still says epoch 0;
    last.ckpt (saved every epoch) then holds the last completed epoch.
    """
    epochs = int(trainer.current_epoch)
    last = last_checkpoint(trainer)
    if epochs == 0 and last is not None:
        import torch

        epochs = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1
    return epochs


def first(results: list[dict[str, Any]]) -> dict[str, float]:
    if not results:
        raise ConfigError("evaluation produced no metrics (is the split empty?)")
    return {k: float(v) for k, v in results[0].items()}
