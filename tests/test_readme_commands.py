"""The README's commands, run the way they are written: `python train.py ...` from the repository root in a
subprocess, plus only what keeps them small (the tiny city, one epoch, W&B off) and `paths.log_dir=<tmp>`
so that nothing lands in the checkout's outputs/. The tiny city comes from the session's cache.

Default suite (about 60 s on 2 idle cores): `debug=fast`; `hparams_search=optuna` twice on a fresh log dir (the
second run continues the study); `experiment=keypoint_vs_cnn` running its sweep without `-m`.
`pytest -m slow`: every other debug config (about 10 s each).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    args = [a for a in args if not a.startswith("hydra.sweeper.n_trials=")] + ["hydra.sweeper.n_trials=1", *SMALL,
                                                                              "+trainer.limit_train_batches=2",
                                                                              "test=false"]
    db = tmp_path / "optuna" / "keypoint_snn-synth_tiny.db"  # the default storage: <log_dir>/optuna/<model>-<data>.db
    assert not db.parent.exists()
    run(args, tmp_path, cache_dir)
    assert db.is_file()
    run(args, tmp_path, cache_dir)  # the same command again continues the study

    study = optuna.load_study(study_name="keypoint_snn-synth_tiny", storage=f"sqlite:///{db}")
    assert [t.number for t in study.trials] == [0, 1]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    sweeps = sorted((tmp_path / "train" / "multirun").glob("*/*"))  # no -m typed: hydra.mode is MULTIRUN
    assert len(sweeps) == 2, sweeps
    assert all(sorted(p.parent.name for p in s.glob("*/metrics.json")) == ["0"] for s in sweeps)


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


def bring_your_own(prefix: str) -> list[str]:
    """The README's "Bring your own" commands that start with `prefix`, each a whole line of a ```bash block."""
    section = README[README.index("## Bring your own"):README.index("## Documentation")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith(prefix)]
    assert lines, f"the README's Bring your own shows no `{prefix}` command"
    return lines


def run_typed(command: str, folder: Path, cache_dir: Path, small: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A README command run by bash in `folder` (where its relative paths land), this interpreter for `python`
    and the repository's train.py for `train.py`; `small`: the overrides that keep a training short."""
    assert command.startswith("python "), command
    line = f"{sys.executable} " + command.removeprefix("python ").replace("train.py ", f"{ROOT / 'train.py'} ", 1)
    line = " ".join([line, *small, f"paths.log_dir={folder / 'logs'}" if "train.py" in command else ""])
    full_env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                **(env or {})}
    proc = subprocess.run(["bash", "-c", line], cwd=folder, env=full_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


PROXIES = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
TORCHVISION_STAND_IN = '''"""torchvision's models.resnet18(weights=...) for a machine where torchvision cannot import beside the CPU
build of torch: the package's ResNet carries torchvision's parameter names; weights='DEFAULT' reads the file
torchvision would have downloaded into $TORCH_HOME/hub/checkpoints, and nothing else."""
import os, torch
from siamese_retrieval.models.backbone import ResNet

def resnet18(weights=None):
    model = ResNet("resnet18", classifier=True)
    if weights is not None:
        cached = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", "resnet18-f37072fd.pth")
        model.load_state_dict(torch.load(cached, weights_only=True))
    return model
'''


@pytest.mark.slow
def test_pretrained_weights_saved_and_trained_on_as_the_readme_types_them(tmp_path: Path, cache_dir: Path) -> None:
    """Weights: the one-line save of torchvision's ImageNet ResNet-18 and the training on that file. No network:
    the file torchvision downloads is already in $TORCH_HOME (a random ResNet-18 in torchvision's format), and the
    proxies point nowhere. Where torchvision does not import (here: the CPU build of torch), a stand-in with its
    one call used here is put first on PYTHONPATH."""
    from siamese_retrieval.models.backbone import ResNet

    (save,) = bring_your_own("python -c \"import torch, torchvision")
    (train,) = bring_your_own("python train.py model=backbone_snn model.weights=resnet18.pth")
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    imagenet = ResNet("resnet18", classifier=True).state_dict()
    torch.save(imagenet, hub / "resnet18-f37072fd.pth")
    offline = {"TORCH_HOME": str(tmp_path / "torch_home"), **{k: "http://127.0.0.1:9" for k in PROXIES}}
    save_env = dict(offline)
    if importlib.util.find_spec("torchvision") is None or not torchvision_imports():
        (tmp_path / "stand_in" / "torchvision").mkdir(parents=True)
        (tmp_path / "stand_in" / "torchvision" / "__init__.py").write_text("from . import models\n")
        (tmp_path / "stand_in" / "torchvision" / "models.py").write_text(TORCHVISION_STAND_IN)
        save_env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "stand_in"), os.environ.get("PYTHONPATH", "")])
    run_typed(save, tmp_path, cache_dir, env=save_env)
    saved = torch.load(tmp_path / "resnet18.pth", weights_only=True)
    assert saved.keys() == imagenet.keys() and all(torch.equal(saved[k], imagenet[k]) for k in imagenet)

    run_typed(train, tmp_path, cache_dir, SMALL, env=offline)  # the stand-in only for the save
    _, result = only_run(tmp_path / "logs" / "train")
    assert (result["model"], result["data"], result["epochs"]) == ("backbone_snn", "synth_tiny", 1)


def torchvision_imports() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import torchvision.models"], capture_output=True, timeout=120)
    return proc.returncode == 0


@pytest.mark.slow
def test_random_weights_saved_and_trained_on_as_the_readme_types_them(tmp_path: Path, cache_dir: Path) -> None:
    """Weights without internet: a random ResNet-18 in torchvision's format, saved and trained on as typed."""
    (save,) = bring_your_own('python -c "import torch; from siamese_retrieval.models.backbone import ResNet')
    (train,) = bring_your_own("python train.py model=backbone_snn model.weights=resnet18-random.pth")
    run_typed(save, tmp_path, cache_dir)
    assert (tmp_path / "resnet18-random.pth").stat().st_size > 40_000_000  # 11.7 M parameters in float32
    run_typed(train, tmp_path, cache_dir, ("logger=none",))
    _, result = only_run(tmp_path / "logs" / "train")
    assert result["model"] == "backbone_snn" and result["epochs"] == 1


@pytest.mark.slow
def test_gsv_cities_and_a_benchmark_as_the_readme_types_them(tmp_path: Path, cache_dir: Path) -> None:
    """Datasets and benchmarks: the synthetic city written out, converted to GSV-Cities' layout, trained on with
    the city as the benchmark that picks the checkpoint; benchmarks.csv has the city's row."""
    make, convert = bring_your_own("python -m siamese_retrieval.data.")
    (train,) = bring_your_own("python train.py model=cnn_snn data=gsv_cities")
    run_typed(make, tmp_path, cache_dir)
    run_typed(convert, tmp_path, cache_dir)
    assert sorted(p.name for p in (tmp_path / "gsv-cities").iterdir()) == ["Dataframes", "Images"]
    run_typed(train, tmp_path, cache_dir, ("trainer.max_epochs=1", "logger=none"))
    run_dir, result = only_run(tmp_path / "logs" / "train")
    assert result["data"] == "gsv_cities"
    (row,) = result["benchmarks"]
    assert (row["benchmark"], row["queries"], row["database"]) == ("msls_city", 40, 120)
    assert (run_dir / "benchmarks.csv").read_text().splitlines()[1].startswith("msls_city,contract,city,40,120,")
