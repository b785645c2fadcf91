"""The README's commands, run the way they are written: `python train.py ...` from the repository root in a
subprocess, plus only what keeps them small (the tiny city, one epoch, W&B off) and `paths.log_dir=<tmp>`
so that nothing lands in the checkout's outputs/. The tiny city comes from the session's cache.

Default suite (about 60 s on 2 idle cores): `debug=fast`; `hparams_search=optuna` twice on a fresh log dir (the
second run continues the study); `experiment=keypoint_vs_cnn` running its sweep without `-m`.
`pytest -m slow`: every other debug config (about 10 s each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
SMALL = ["data=synth_tiny", "trainer.max_epochs=1", "logger=none"]


def documented(command: str) -> list[str]:
    """The arguments of a command the README shows (checked: a renamed option must update the README)."""
    assert command in README, f"the README no longer shows `{command}`"
    words = command.split()
    assert words[:2] == ["python", "train.py"], command
    return words[2:]


def run(args: list[str], log_dir: Path, cache_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "train.py", *args, f"paths.log_dir={log_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def only_run(pattern_root: Path) -> tuple[Path, dict]:
    """The one run directory under <root>/runs/<date>/<time>/ and its metrics.json."""
    (metrics,) = pattern_root.glob("runs/*/*/metrics.json")
    result = json.loads(metrics.read_text())
    assert result["status"] == "ok", result
    return metrics.parent, result


def test_debug_fast(tmp_path: Path, cache_dir: Path) -> None:
    run(documented("python train.py debug=fast"), tmp_path, cache_dir)
    run_dir, result = only_run(tmp_path / "debug")
    assert result["data"] == "synth_tiny" and result["epochs"] == 1
    assert not (run_dir / "wandb").exists(), "debug configs turn the experiment tracker off"
    assert not (tmp_path / "train").exists()


def test_optuna_search_on_a_fresh_log_dir_and_continued(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    args = documented("python train.py hparams_search=optuna hydra.sweeper.n_trials=20")
    # trials return val/recall@1: the test split is not needed
    args = [a for a in args if not a.startswith("hydra.sweeper.n_trials=")] + ["hydra.sweeper.n_trials=2", *SMALL,
                                                                              "test=false"]
    db = tmp_path / "optuna" / "keypoint_snn-synth_tiny.db"  # the default storage: <log_dir>/optuna/<model>-<data>.db
    assert not db.parent.exists()
    run(args, tmp_path, cache_dir)
    assert db.is_file()
    run(args, tmp_path, cache_dir)  # the same command again continues the study

    study = optuna.load_study(study_name="keypoint_snn-synth_tiny", storage=f"sqlite:///{db}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    sweeps = sorted((tmp_path / "train" / "multirun").glob("*/*"))  # no -m typed: hydra.mode is MULTIRUN
    assert len(sweeps) == 2, sweeps
    assert all(sorted(p.parent.name for p in s.glob("*/metrics.json")) == ["0", "1"] for s in sweeps)


def test_experiment_runs_its_sweep_without_m(tmp_path: Path, cache_dir: Path) -> None:
    """keypoint_vs_cnn sweeps model x seed; `seed=0` keeps it to two jobs, one per model."""
    args = documented("python train.py experiment=keypoint_vs_cnn")
    run([*args, *SMALL, "+trainer.limit_train_batches=2", "test=false", "seed=0"], tmp_path, cache_dir)
    (sweep,) = (tmp_path / "train" / "multirun").glob("*/*")
    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(jobs) == ["0", "1"]
    assert sorted(j["model"] for j in jobs.values()) == ["cnn_snn", "keypoint_snn"]
    assert all(j["status"] == "ok" and j["seed"] == 0 for j in jobs.values())


@pytest.mark.slow
def test_quick_start_as_typed(tmp_path: Path, cache_dir: Path) -> None:
    """The quick start's training command with its defaults (the default city, 10 epochs, W&B offline): the table
    the README tells a newcomer to expect, a study's model ranking at chance."""
    proc = run(documented("python train.py model=keypoint_snn"), tmp_path, cache_dir, timeout=900)
    run_dir, result = only_run(tmp_path / "train")
    assert (result["model"], result["data"], result["epochs"]) == ("keypoint_snn", "synth", 10)
    assert "recall@10" in proc.stdout and "best checkpoint" in proc.stdout
    assert result["metrics"]["test/recall@10"] < 0.2 and result["metrics"]["test/recall@1"] < 0.05
    assert list(run_dir.glob("wandb/offline-run-*")) and list(run_dir.glob("checkpoints/epoch*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["limit", "overfit", "profiler", "fdr"])
def test_debug_config(name: str, tmp_path: Path, cache_dir: Path) -> None:
    options = next(line for line in README.splitlines() if line.startswith("| `debug=fast"))
    assert name in options.split(" | ")[0], f"the README's options no longer list debug={name}"
    run([f"debug={name}", "data=synth_tiny"], tmp_path, cache_dir)
    run_dir, result = only_run(tmp_path / "debug")
    assert not (run_dir / "wandb").exists()
    expected_epochs = {"limit": 3, "overfit": 10, "profiler": 1, "fdr": 1}[name]
    assert result["epochs"] == expected_epochs, result
    if name == "profiler":
        assert "FIT Profiler Report" in (run_dir / "fit-profile.txt").read_text()


@pytest.mark.slow
def test_backbone_weights_from_a_local_file_as_the_readme_types_it(tmp_path: Path, cache_dir: Path) -> None:
    """Bring your own: the README's two commands (save a ResNet-18 state dict, train backbone_snn on it), run as
    typed from a copy of the working directory (the weights file lands beside train.py there: tmp_path)."""
    save = next(line for line in README.splitlines() if line.startswith('python -c "import torch; from siamese_retrieval'
                                                                      '.models.backbone import ResNet'))
    train = documented("python train.py model=backbone_snn model.weights=resnet18-random.pth data=synth_tiny "
                       "trainer.max_epochs=1")
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run(["bash", "-c", save], cwd=tmp_path, env=env, check=True, timeout=300)
    assert (tmp_path / "resnet18-random.pth").stat().st_size > 40_000_000  # 11.7 M parameters in float32
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *train, f"paths.log_dir={tmp_path / 'logs'}",
                           "logger=none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, result = only_run(tmp_path / "logs" / "train")
    assert result["model"] == "backbone_snn" and result["epochs"] == 1
