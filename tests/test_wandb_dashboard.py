"""W&B runs a dashboard can compare (src/siamese_retrieval/wandb_runs.py), read back from the offline run files:
names from the job's overrides, one group per sweep, job types train / eval / baseline, best val/* in the
summary, one clean config, per-query tables with image cells; and the CSV / TensorBoard loggers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siamese_retrieval.wandb_runs import name_tokens, optuna_trial_number, run_name
from tests.conftest import ROOT, compose_config
from tests.wandb_offline import find_offline_runs, read_offline_run

MAX_METRICS = ["val/recall@1", "val/recall@5", "val/precision@10", "val/mAP", "val/ndcg@10", "val/range_acc@0.01"]


def only_run(directory: Path):
    files = find_offline_runs(directory)
    assert len(files) == 1, files
    return read_offline_run(files[0])


def assert_best_val_summary(run, epochs: int) -> None:
    for name in MAX_METRICS:
        best = run.summary[name]
        assert set(best) == {"max", "last"} and best["max"] >= best["last"] - 1e-9, (name, best)
        assert 0 <= run.summary[f"best_epoch/{name}"] < epochs, name
        assert run.metrics[name.replace(".", "\\.")]["step_metric"] == "epoch"
    assert set(run.summary["val/loss"]) == {"min", "last"} and run.summary["val/loss"]["min"] <= run.summary["val/loss"]["last"]
    assert 0 <= run.summary["best_epoch/val/loss"] < epochs
    # the epoch of each best value is where the history has it
    vals = [row for row in run.history if "val/recall@1" in row and "epoch" in row]
    at_best = next(r for r in vals if r["epoch"] == run.summary["best_epoch/val/recall@1"])
    assert at_best["val/recall@1"] == pytest.approx(run.summary["val/recall@1"]["max"])


def assert_per_query_table(run, key: str, n_rows: int) -> None:
    table = run.table(key)
    assert table is not None, key
    cols = table["columns"]
    assert cols[:4] == ["query", "query_path", "first_positive_rank", "precision@5"]
    assert cols[4:] == [f"top_{j}" for j in range(1, 6)] + [f"score_{j}" for j in range(1, 6)]
    assert len(table["data"]) == n_rows
    for row in table["data"]:
        cells = dict(zip(cols, row))
        for c in ["query"] + [f"top_{j}" for j in range(1, 6)]:
            assert cells[c]["_type"] == "image-file" and cells[c]["path"].endswith(".png"), cells[c]
        assert isinstance(cells["first_positive_rank"], int) and cells["first_positive_rank"] >= 0
        assert all(isinstance(cells[f"score_{j}"], float) for j in range(1, 6))
        assert 0.0 <= cells["precision@5"] <= 1.0
    # thumbnails are bordered green (relevant) / red: their files are in the table's artifact
    art = next(a for a in run.artifacts if a.type == "run_table" and any(p.startswith("media/images/") for p in a.files))
    assert len([p for p in art.files if p.endswith(".png")]) >= 2


# ------------------------------------------------------------------------------------------------ names


def test_run_names_keep_the_overrides_that_tell_jobs_apart() -> None:
    overrides = ["model=keypoint_snn", "seed=0", "data=synth_tiny", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "paths.log_dir=/tmp/x", "trainer=cpu", "trainer.devices=2", "logger=many", "hydra.sweep.dir=/x",
                 "model.inputs.n_keypoints=50", "model.module.optimizer.lr=0.000123456", "data.root=/data/london"]
    assert name_tokens(overrides) == ["max_epochs=1", "limit_train_batches=2", "n_keypoints=50", "lr=0.0001235"]
    assert run_name("keypoint_snn-synth-s0", ["model.inputs.n_keypoints=200"], job="job7") == \
        "keypoint_snn-synth-s0-job7-n_keypoints=200"
    assert run_name("cnn_snn-synth-s1", ["model.module.encoder.dropout=0.1", "model.module.head.dropout=0.2"]) == \
        "cnn_snn-synth-s1-encoder.dropout=0.1-head.dropout=0.2"
    assert run_name("cnn_snn-synth-s0", []) == "cnn_snn-synth-s0"


def test_optuna_trial_number_is_the_running_trial_with_these_params(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    done = study.ask()
    done.suggest_float("model.module.optimizer.lr", 1e-4, 1e-2)
    study.tell(done, 0.5)
    trials = [study.ask() for _ in range(2)]  # two running, as with n_jobs=2
    for t in trials:
        t.suggest_float("model.module.optimizer.lr", 1e-4, 1e-2)
        t.suggest_categorical("model.batch_size", [16, 32, 64])
    second = trials[1]
    overrides = [f"{k}={v}" for k, v in second.params.items()] + ["data=synth_tiny"]
    assert optuna_trial_number(overrides, storage, "s") == second.number == 2
    assert optuna_trial_number(["model.batch_size=32"], storage, "s") is None
    assert optuna_trial_number(overrides, None, "s") is None


def test_early_stopping_is_opt_in_and_lr_monitor_is_on_by_default(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_config("train", [], tmp_path, cache_dir)
    assert cfg.callbacks.lr_monitor._target_.endswith("LearningRateMonitor") and "early_stopping" not in cfg.callbacks
    for choice in ("callbacks=with_early_stopping", "callbacks=[default,early_stopping]"):
        cfg = compose_config("train", [choice], tmp_path, cache_dir)
        assert cfg.callbacks.early_stopping._target_ == "pytorch_lightning.callbacks.EarlyStopping", choice
        assert cfg.callbacks.early_stopping.monitor == cfg.callbacks.model_checkpoint.monitor == "val/mAP"
        assert {"retrieval_metrics", "model_checkpoint", "lr_monitor"} <= set(cfg.callbacks), choice
    assert set(compose_config("train", ["logger=many"], tmp_path, cache_dir).logger) == {"wandb", "csv"}
    assert set(compose_config("train", ["logger=[csv,tensorboard]"], tmp_path, cache_dir).logger) == {"csv", "tensorboard"}
    assert set(compose_config("eval", [], tmp_path, cache_dir).logger) == {"wandb"}
    assert not compose_config("eval", ["logger=none"], tmp_path, cache_dir).get("logger")


# ------------------------------------------------------------------------------------------------ in process


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """A keypoint_snn run (W&B + CSV, checkpoints as artifacts), its evaluation and the ORB baseline."""
    from siamese_retrieval.evaluate import evaluate
    from siamese_retrieval.train import train

    base = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(base / "wandb_data"))  # offline artifacts are staged here, not in ~
        cfg = compose_config("train", ["data=synth_tiny", "trainer=cpu", "trainer.max_epochs=2", "seed=3", "logger=many",
                                       "logger.wandb.log_model=best"], base / "train", cache_dir)
        trained = train(cfg)
        ckpt = trained["checkpoint"]
        evaluated = evaluate(compose_config("eval", ["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}"],
                                            base / "eval", cache_dir))
        baseline = evaluate(compose_config("eval", ["data=synth_tiny", "method=orb_ransac"], base / "baseline", cache_dir))
        evaluate(compose_config("eval", ["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}", "logger=none"],
                                base / "eval_quiet", cache_dir))
        yield {"base": base, "train": trained, "eval": evaluated, "baseline": baseline}


def test_training_run_is_named_grouped_and_logs_one_clean_config(dashboard) -> None:
    run = only_run(dashboard["base"] / "train")
    assert run.name == "keypoint_snn-synth_tiny-s3-max_epochs=2"  # trainer=cpu is hardware: not in the name
    assert run.group == "train" and run.job_type == "train" and set(run.tags) == {"keypoint_snn", "synth_tiny"}
    # one resolved config: the module's hyperparameters are not logged a second time at the top level
    assert not {"encoder", "loss", "optimizer", "head", "inputs"} & set(run.config)
    assert run.config["model"]["name"] == "keypoint_snn" and "encoder" in run.config["model"]["module"]
    wb = run.config["logger"]["wandb"]
    assert (wb["name"], wb["group"], wb["job_type"]) == (run.name, "train", "train")
    assert sorted(wb["tags"]) == sorted(run.tags) and wb["log_model"] == "best"
    assert set(run.config["logger"]) == {"wandb", "csv"}
    assert any("lr-Adam" in row for row in run.history)  # LearningRateMonitor
    # save_code + settings.code_dir: the package's source as a "code" artifact
    assert any(a.type == "code" and "siamese_retrieval/wandb_runs.py" in a.files for a in run.artifacts)


def test_training_summary_holds_the_best_val_values_and_their_epoch(dashboard) -> None:
    run = only_run(dashboard["base"] / "train")
    assert_best_val_summary(run, epochs=2)
    metrics = dashboard["train"]["metrics"]
    assert run.summary["test/recall@1"] == pytest.approx(metrics["test/recall@1"])
    # the last val/* row is the best checkpoint re-validated: metrics.json's val values
    assert run.summary["val/mAP"]["last"] == pytest.approx(metrics["val/mAP"])
    assert run.summary["val/mAP"]["max"] == pytest.approx(metrics["val/mAP"])  # the checkpoint kept is the best mAP
    assert run.summary["epochs"] == 2


def test_training_run_logs_the_per_query_table_and_checkpoint_artifacts(dashboard) -> None:
    run = only_run(dashboard["base"] / "train")
    assert_per_query_table(run, "test/per_query", int(dashboard["train"]["metrics"]["test/n_queries"]))
    models = [a for a in run.artifacts if a.type == "model"]
    assert models and any("best" in a.aliases for a in models) and all("model.ckpt" in a.files for a in models)
    # the checkpoint remembers its W&B run: evaluate.py logs into the same group
    raw = torch.load(dashboard["train"]["checkpoint"], map_location="cpu", weights_only=True)
    assert raw["training_data"]["wandb"]["group"] == "train" and raw["training_data"]["wandb"]["name"] == run.name
    csv_file = dashboard["base"] / "train" / "csv" / "metrics.csv"
    header, *rows = csv_file.read_text().splitlines()
    col = header.split(",").index("val/recall@1")
    assert any(r.split(",")[col] for r in rows)


def test_evaluation_run_joins_the_training_group(dashboard) -> None:
    train_run = only_run(dashboard["base"] / "train")
    run = only_run(dashboard["base"] / "eval")
    assert run.job_type == "eval" and run.group == train_run.group
    assert run.name == f"{train_run.name}-eval"
    result = dashboard["eval"]
    for key in ("test/recall@1", "test/mAP", "test/range_acc@0.01"):
        assert run.summary[key] == pytest.approx(result["metrics"][key]), key
    assert run.summary["n_queries"] == result["n_queries"]
    assert run.config["model"]["name"] == "keypoint_snn" and run.config["checkpoint"]["training_data"]["seed"] == 3
    curve = run.table("test/recall_at_k_table")
    assert curve["columns"] == ["k", "recall"] and len(curve["data"]) == 25
    assert curve["data"][0][1] == pytest.approx(result["metrics"]["test/recall@1"])
    chart = run.config["_wandb/visualize/test/recall_at_k"]  # the line plot over that table
    assert chart["panel_config"]["fieldSettings"] == {"x": "k", "y": "recall", "stroke": None}
    assert any(row.get("test/retrieval_examples/_type") == "image-file" for row in run.history)
    assert_per_query_table(run, "test/per_query", result["n_queries"])
    assert not list((dashboard["base"] / "eval_quiet").rglob("offline-run-*"))  # logger=none


def test_orb_ransac_is_a_baseline_run(dashboard) -> None:
    run = only_run(dashboard["base"] / "baseline")
    assert (run.name, run.group, run.job_type) == ("orb_ransac-synth_tiny", "baselines", "baseline")
    assert run.summary["test/recall@1"] == pytest.approx(dashboard["baseline"]["metrics"]["test/recall@1"])
    assert run.config["model"]["name"] == "orb_ransac"
    assert_per_query_table(run, "test/per_query", dashboard["baseline"]["n_queries"])


def test_tensorboard_logger_writes_events(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from siamese_retrieval.train import train

    cfg = compose_config("train", ["data=synth_tiny", "trainer=cpu", "trainer.max_epochs=1",
                                   "+trainer.limit_train_batches=2", "logger=tensorboard"], tmp_path, cache_dir)
    result = train(cfg)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "val/recall@1" in acc.Tags()["scalars"] and "test/recall@1" in acc.Tags()["scalars"]
    assert acc.Scalars("test/recall@1")[-1].value == pytest.approx(result["metrics"]["test/recall@1"], abs=1e-6)
    assert "test/retrieval_examples" in acc.Tags()["images"]
    assert not list(tmp_path.rglob("offline-run-*"))


# ------------------------------------------------------------------------------------------------ subprocess


def run_cli(script: str, args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_model_two_seed_sweep_and_a_baseline_make_one_dashboard(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    log_dir = tmp_path / "outputs"
    run_cli("train.py", ["-m", "model=keypoint_snn,cnn_snn", "seed=0,1", "data=synth_tiny", "trainer.max_epochs=1",
                         "+trainer.limit_train_batches=2", f"paths.log_dir={log_dir}"], env)
    run_cli("evaluate.py", ["method=orb_ransac", "data=synth_tiny", f"paths.log_dir={log_dir}"], env)

    (sweep,) = {p.parent.parent for p in log_dir.rglob("multirun/*/*/*/metrics.json")}  # <log_dir>/train/multirun/...
    runs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        meta = json.loads((job / "metrics.json").read_text())
        assert meta["status"] == "ok", meta
        run = only_run(job)
        runs[job.name] = run
        assert run.name == f"{meta['model']}-synth_tiny-s{meta['seed']}-job{job.name}-max_epochs=1-limit_train_batches=2"
        assert run.job_type == "train" and {meta["model"], "synth_tiny"} <= set(run.tags)
        assert_best_val_summary(run, epochs=1)
        assert run.summary["test/recall@1"] == pytest.approx(meta["metrics"]["test/recall@1"], abs=1e-6)
        assert_per_query_table(run, "test/per_query", int(meta["metrics"]["test/n_queries"]))
        assert not {"encoder", "loss", "optimizer"} & set(run.config)
    assert len(runs) == 4 and len({r.name for r in runs.values()}) == 4
    assert {r.group for r in runs.values()} == {f"sweep-{sweep.parent.name}-{sweep.name}"}
    assert sorted(r.config["model"]["name"] for r in runs.values()) == ["cnn_snn", "cnn_snn", "keypoint_snn", "keypoint_snn"]

    (baseline_dir,) = {p.parent for p in log_dir.rglob("runs/*/*/metrics.json")}
    baseline = only_run(baseline_dir)
    assert (baseline.name, baseline.group, baseline.job_type) == ("orb_ransac-synth_tiny", "baselines", "baseline")
    meta = json.loads((baseline_dir / "metrics.json").read_text())
    assert baseline.summary["test/recall@1"] == pytest.approx(meta["metrics"]["test/recall@1"])
    assert_per_query_table(baseline, "test/per_query", meta["n_queries"])


@pytest.mark.slow
def test_optuna_trials_are_named_by_their_trial_number(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    common = ["hparams_search=optuna", "data=synth_tiny", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
              f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}", "hydra.sweeper.study_name=names"]
    run_cli("train.py", [*common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}"], env)
    run_cli("train.py", [*common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'b'}"], env)  # continued
    names = {}
    for d in ("a/0", "a/1", "b/0"):
        names[d] = only_run(tmp_path / d)
    trial_of = {d: r.name.split("-")[3] for d, r in names.items()}
    assert trial_of == {"a/0": "trial0", "a/1": "trial1", "b/0": "trial2"}
    assert all("lr=" in r.name and "batch_size=" in r.name for r in names.values())
    assert {r.group for r in names.values()} == {"optuna-keypoint_snn-synth_tiny"}
