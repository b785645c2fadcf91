"""Training pipeline behind `python train.py`: config -> datamodule/model/callbacks/loggers -> fit -> test.

Reads top-down: `train(cfg)` is the whole story; the helpers below it each do one thing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.checkpoints import read_checkpoint
from siamese_retrieval.data.datamodule import build_datamodule
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.run_outputs import (
    finish_loggers,
    print_results,
    quiet_known_warnings,
    resolve_ckpt_path,
    run_dir,
    sweep_group,
    task_overrides,
    write_metrics_json,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint. Returns the metrics.json content."""
    started = time.perf_counter()
    quiet_known_warnings()
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = run_dir(cfg)

    resume_from = resolve_ckpt_path(cfg.ckpt_path, out_dir)
    if resume_from is not None:
        read_checkpoint(resume_from)  # the same checks as evaluate.py: a bad file is one line, before any work
    datamodule = build_datamodule(cfg.data, instantiate(cfg.model.inputs))
    datamodule.prepare_data()
    datamodule.setup("fit")  # validates the dataset now: a bad root fails before any model is built
    model = instantiate(cfg.model.module, _recursive_=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = build_loggers(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        if cfg.train:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
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
            "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        }
        for lg in loggers:
            if hasattr(lg, "experiment") and hasattr(lg.experiment, "summary"):
                lg.experiment.summary.update(result["metrics"])
        if trainer.is_global_zero:  # under trainer=ddp, ranks > 0 run this script too: one writer
            write_metrics_json(out_dir / "metrics.json", result)
    finally:
        finish_loggers(loggers)
    if trainer.is_global_zero:  # last, below W&B's closing lines
        print_results(result["metrics"], title=f"{result['model']} on {result['data']} (seed {result['seed']})",
                      footer=f"best checkpoint: {best}" if best else None)
    return result


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        lg_cfg = OmegaConf.to_container(lg_cfg, resolve=True)
        if lg_cfg["_target_"].endswith("WandbLogger"):
            lg_cfg["name"] = lg_cfg.get("name") or f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"
            lg_cfg["group"] = lg_cfg.get("group") or sweep_group(cfg)
            lg_cfg["tags"] = sorted({*lg_cfg.get("tags", []), cfg.model.name, cfg.data.name})
            Path(lg_cfg["save_dir"]).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(lg_cfg))
    return loggers


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is None:
        return None
    return ckpt_cb.best_model_path or ckpt_cb.last_model_path or None


def epochs_trained(trainer: pl.Trainer) -> int:
    """Epochs completed by fit (resumed ones included).

    Under ddp_spawn the fit ran in child processes and the main process's trainer still says epoch 0;
    last.ckpt (saved every epoch) then holds the last completed epoch.
    """
    epochs = int(trainer.current_epoch)
    ckpt_cb = trainer.checkpoint_callback
    last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb is not None and getattr(ckpt_cb, "dirpath", None) else None
    if epochs == 0 and last is not None and last.is_file():
        import torch

        epochs = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1
    return epochs


def first(results: list[dict[str, Any]]) -> dict[str, float]:
    if not results:
        raise ConfigError("evaluation produced no metrics (is the split empty?)")
    return {k: float(v) for k, v in results[0].items()}
