"""Hydra multirun end to end (subprocess): one run dir, metrics.json and W&B run per job; failures listed;
Optuna search continued from its sqlite storage; the experiment configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from siamese_retrieval.compare import compare
from tests.conftest import ROOT, compose_config
from tests.wandb_offline import find_offline_runs, read_offline_run


def run_train(args: list[str], cache_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_multirun_jobs_are_separate_and_a_failed_job_is_listed(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    run_train(["-m", "data=synth_tiny", "trainer.max_epochs=1", "data.pairs.preset=study,bogus", "seed=0,1",
               f"hydra.sweep.dir={sweep}"], cache_dir)
    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(jobs) == ["0", "1", "2", "3"]
    ok = {n: j for n, j in jobs.items() if j["status"] == "ok"}
    failed = {n: j for n, j in jobs.items() if j["status"] == "failed"}
    assert len(ok) == 2 and len(failed) == 2
    assert all("bogus" in j["error"] and "data.pairs.preset=bogus" in j["overrides"] for j in failed.values())
    assert sorted(j["seed"] for j in ok.values()) == [0, 1]

    # one distinct offline W&B run per successful job, all in the sweep's group, holding that job's numbers
    runs = {}
    for n, job in ok.items():
        files = find_offline_runs(sweep / n)
        assert len(files) == 1, files
        run = read_offline_run(files[0])
        runs[files[0].parent.name] = run
        assert run.group == f"sweep-{sweep.parent.name}-{sweep.name}"
        assert "keypoint_snn" in run.tags and run.config["seed"] == job["seed"]
        assert run.last("test/mAP") == pytest.approx(job["metrics"]["test/mAP"], abs=1e-6)
    assert len(runs) == 2

    result = compare([sweep], out_dir=tmp_path / "cmp")
    assert len(result["groups"]) == 1 and len(result["groups"][0].jobs) == 2
    assert "Failed jobs (2)" in result["markdown"]


@pytest.mark.slow  # the default-storage variant (tests/test_readme_commands.py) runs by default
def test_optuna_search_continues_from_its_storage(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    db = tmp_path / "study.db"
    common = ["hparams_search=optuna", "data=synth_tiny", "trainer.max_epochs=1", "logger=none",
              f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=test"]
    run_train([*common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}"], cache_dir)
    run_train([*common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'b'}"], cache_dir)
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{db}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.direction.name == "MAXIMIZE"
    values = sorted(json.loads(p.read_text())["metrics"]["val/recall@1"] for p in tmp_path.glob("[ab]/*/metrics.json"))
    assert sorted(t.value for t in study.trials) == pytest.approx(values)


def test_experiment_configs_define_their_sweeps(tmp_path: Path, cache_dir: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for name, swept in [("keypoint_vs_cnn", {"model": "keypoint_snn,cnn_snn", "seed": "0,1,2"}),
                        ("keypoint_count", {"model.inputs.n_keypoints": "10,50,200", "seed": "0,1,2"})]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
        assert dict(cfg.hydra.sweeper.params) == swept
        assert cfg.experiment_name == name
    cfg = compose_config("train", ["experiment=keypoint_count"], tmp_path, cache_dir)
    assert cfg.model.name == "keypoint_snn"


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_its_model(name: str, tmp_path: Path, cache_dir: Path) -> None:
    """Each named experiment as the README types it (no model=): its config passes the schema, and the model's
    input builder and module, the first things a run builds, accept its values (experiment=gpu_recipe once
    composed cnn_snn's image size onto the default keypoint model, and failed only at the first build)."""
    from siamese_retrieval.configs import check_config
    from siamese_retrieval.errors import instantiate_config

    cfg = compose_config("train", [f"experiment={name}"], tmp_path, cache_dir)
    assert check_config(cfg, "train") == []
    instantiate_config("model.inputs", cfg.model.inputs)
    module = instantiate_config("model.module", cfg.model.module, _recursive_=False)
    assert module.hparams.model_name == cfg.model.name
    if name in ("gpu_recipe", "large_city", "beat_verification"):
        assert cfg.model.name == "cnn_snn", name


@pytest.mark.slow
def test_study_sweep_two_models_three_seeds(tmp_path: Path, cache_dir: Path) -> None:
    """The acceptance sweep on tiny settings: keypoint_snn vs cnn_snn, 3 seeds each, one table."""
    sweep = tmp_path / "sweep"
    run_train(["-m", "experiment=keypoint_vs_cnn", "data=synth_tiny", "trainer.max_epochs=1",
               f"hydra.sweep.dir={sweep}"], cache_dir, timeout=1800)
    result = compare([sweep], out_dir=tmp_path / "cmp")
    sizes = {next(o for o in g.key if o.startswith("model=")): len(g.jobs) for g in result["groups"]}
    assert sizes == {"model=keypoint_snn": 3, "model=cnn_snn": 3}
    assert "| model=keypoint_snn | 3 |" in result["table"] and "| model=cnn_snn | 3 |" in result["table"]
    runs = [read_offline_run(f) for f in find_offline_runs(sweep)]
    assert len(runs) == 6 and {r.group for r in runs} == {"keypoint_vs_cnn"}
    assert len({f.parent.name for f in find_offline_runs(sweep)}) == 6
