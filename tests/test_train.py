"""The training slice end to end on the tiny city: metrics.json, checkpoints, W&B offline content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from siamese_retrieval.checkpoints import load_checkpoint
from siamese_retrieval.data.datamodule import build_datamodule
from siamese_retrieval.retrieval.ranking import RankingSettings, rank_queries
from siamese_retrieval.train import train
from tests.conftest import ROOT, compose_config
from tests.wandb_offline import find_offline_runs, read_offline_run

METRICS = ["precision@1", "precision@5", "precision@10", "recall@1", "recall@5", "recall@10", "mAP", "ndcg@10",
           "range_acc@0.01"]


@pytest.fixture(scope="module")
def keypoint_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", ["data=synth_tiny", "trainer=cpu", "trainer.max_epochs=2", "seed=3"], out, cache_dir)
    result = train(cfg)
    return cfg, out, result


def test_metrics_json_has_every_metric(keypoint_run) -> None:
    cfg, out, result = keypoint_run
    saved = json.loads((out / "metrics.json").read_text())
    provenance = saved.pop("provenance")  # what produced the numbers: written into the file only
    directions = saved.pop("directions")  # which way each metric is better (compare.py's bold), file only too
    assert saved == json.loads(json.dumps(result)) and provenance["versions"]["torch"]
    assert directions == {n: "min" if n.endswith("/loss") else "max" for n in saved["metrics"]
                          if not n.split("/")[-1].startswith("n_")}, directions  # counts: no direction
    assert saved["status"] == "ok" and saved["model"] == "keypoint_snn" and saved["data"] == "synth_tiny"
    assert saved["seed"] == 3 and saved["epochs"] == 2
    for stage in ("val", "test"):
        for name in METRICS:
            value = saved["metrics"][f"{stage}/{name}"]
            assert 0.0 <= value <= 1.0, (stage, name, value)
        assert saved["metrics"][f"{stage}/n_queries"] > 0
    # recall@k is non-decreasing in k; precision@1 == recall@1 by definition
    m = saved["metrics"]
    assert m["test/recall@1"] <= m["test/recall@5"] <= m["test/recall@10"]
    assert m["test/precision@1"] == pytest.approx(m["test/recall@1"])
    assert (out / "retrieval_grid_test.png").stat().st_size > 1000


def test_checkpoint_loads_weights_only_and_reproduces_test_metrics(keypoint_run) -> None:
    cfg, out, result = keypoint_run
    ckpt = Path(result["checkpoint"])
    assert ckpt.is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain config, no pickled modules
    assert raw["hyper_parameters"]["model_name"] == "keypoint_snn"
    loaded = load_checkpoint(ckpt)
    dm = build_datamodule(cfg.data, loaded.build_inputs())
    dm.setup("test")
    ranking = rank_queries(loaded.module, dm.db_inputs, dm.q_inputs, dm.splits.queries("test"), dm.dataset,
                           RankingSettings())
    for name in ("precision@10", "recall@1", "recall@5", "mAP", "ndcg@10"):
        assert ranking.metrics[name] == pytest.approx(result["metrics"][f"test/{name}"], abs=1e-6)


def test_wandb_offline_run_holds_the_test_metrics(keypoint_run) -> None:
    cfg, out, result = keypoint_run
    runs = find_offline_runs(out)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.config["model"]["name"] == "keypoint_snn"  # the full resolved config
    assert {"keypoint_snn", "synth_tiny"} <= set(run.tags)
    assert run.group == "train"
    for name in ("test/precision@10", "test/recall@1", "test/mAP", "test/ndcg@10", "test/range_acc@0.01"):
        assert run.last(name) == pytest.approx(result["metrics"][name], abs=1e-6), name
    image = next(row for row in run.history if "test/retrieval_examples/_type" in row)
    assert image["test/retrieval_examples/_type"] == "images/separated" and image["test/retrieval_examples/count"] == 1
    table = next(row for row in run.history if "test/per_query/_type" in row)
    assert table["test/per_query/nrows"] == result["metrics"]["test/n_queries"]


def test_bad_dataset_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data=msls_city", f"data.root={tmp_path / 'missing'}",
         f"hydra.run.dir={tmp_path / 'run'}", "logger=none"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1] == f"error: {tmp_path / 'missing'}: dataset root not found"
    assert "Traceback" not in proc.stderr


def test_same_seed_same_split_and_pairs(cache_dir: Path, tmp_path: Path) -> None:
    cfgs = [compose_config("train", ["data=synth_tiny", "seed=5"], tmp_path / str(i), cache_dir) for i in range(2)]
    dms = [build_datamodule(c.data, instantiate(c.model.inputs)) for c in cfgs]
    for dm in dms:
        dm.setup("fit")
    assert np.array_equal(dms[0].splits.test_q, dms[1].splits.test_q)
    for a, b in zip(dms[0].sampler.sample(1), dms[1].sampler.sample(1)):
        assert np.array_equal(a, b)


def test_msls_city_on_a_root_written_by_the_generator(tmp_path: Path, cache_dir: Path) -> None:
    from siamese_retrieval.data.synth import SynthConfig, ensure_city

    root = ensure_city(cache_dir, SynthConfig.from_preset("tiny"))  # any root in the MSLS/GCL format
    cfg = compose_config("train", ["data=msls_city", f"data.root={root}", "trainer.max_epochs=1", "logger=none"],
                         tmp_path, cache_dir)
    result = train(cfg)
    assert result["data"] == "msls_city" and result["status"] == "ok"
    splits = result["splits"]
    assert splits["n_train_queries"] + splits["n_val_queries"] + splits["n_test_queries"] == 40
    assert 0.0 <= result["metrics"]["test/mAP"] <= 1.0
