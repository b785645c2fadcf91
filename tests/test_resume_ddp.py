"""Resuming an interrupted run from last.ckpt, and retrieval metrics under DDP (ddp_spawn on CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from siamese_retrieval.checkpoints import load_checkpoint
from siamese_retrieval.data.datamodule import build_datamodule
from siamese_retrieval.retrieval.ranking import RankingSettings, rank_queries
from tests.conftest import compose_config
from tests.test_sweep import run_train


@pytest.mark.slow  # ~40 s: two DDP processes; single-process resume stays in the default suite (test_resume.py)
def test_resume_from_last_checkpoint_finishes_all_epochs(tmp_path: Path, cache_dir: Path) -> None:
    """An explicit run dir (hydra.run.dir=...): `ckpt_path=last` is that dir's last.ckpt (tests/test_resume.py:
    the default, timestamped run dirs)."""
    run = tmp_path / "run"
    common = ["data=synth_tiny", "logger=csv", f"hydra.run.dir={run}"]
    run_train([*common, "trainer.max_epochs=1"], cache_dir)  # "killed" after epoch 1
    first = json.loads((run / "metrics.json").read_text())
    assert first["epochs"] == 1
    (run / "csv").rename(tmp_path / "csv-first")
    run_train([*common, "trainer.max_epochs=2", "ckpt_path=last"], cache_dir)
    with (run / "csv" / "metrics.csv").open() as f:  # the resumed session started at epoch 1: restored
        assert min(int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch")) == 1
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == "ok" and resumed["epochs"] == 2
    assert set(resumed) == set(first) and set(resumed["metrics"]) == set(first["metrics"])
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] > 0


@pytest.mark.slow
def test_ddp_spawn_metrics_equal_single_process(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "ddp"
    run_train(["data=synth_tiny", "trainer=ddp_spawn", "trainer.devices=2", "trainer.max_epochs=1", "logger=none",
               f"hydra.run.dir={run}"], cache_dir)
    result = json.loads((run / "metrics.json").read_text())
    assert result["status"] == "ok" and result["epochs"] == 1
    cfg = compose_config("train", ["data=synth_tiny"], tmp_path / "eval", cache_dir)
    loaded = load_checkpoint(result["checkpoint"])
    dm = build_datamodule(cfg.data, loaded.build_inputs())
    dm.setup("test")
    for stage in ("val", "test"):
        single = rank_queries(loaded.module, dm.db_inputs, dm.q_inputs, dm.splits.queries(stage), dm.dataset,
                              RankingSettings()).metrics
        for name, value in single.items():
            assert result["metrics"][f"{stage}/{name}"] == pytest.approx(value, abs=1e-6), (stage, name)
