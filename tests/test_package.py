"""The installable package: pyproject names every package, the wheel carries the configs and the four
commands, and an installed (non-editable) copy trains from another directory with the same overrides.

The wheel is built once per module from a copy of the working tree (`pip wheel --no-deps
--no-build-isolation`, about 3 s), so the checkout gets no build/ folder. Installing it is
`pip install --no-deps --target DIR`: no new virtual environment, the dependencies come from this
interpreter's site-packages; DIR goes first on PYTHONPATH, so `siamese_retrieval` is imported from the
installed copy, not from src/.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

COMMANDS = {
    "siamese-train": "siamese_retrieval.entry_points:train_main",
    "siamese-evaluate": "siamese_retrieval.entry_points:evaluate_main",
    "siamese-retrieve": "siamese_retrieval.entry_points:retrieve_main",
    "siamese-compare": "siamese_retrieval.entry_points:compare_main",
}
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "data_cache", "outputs", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", "wandb", "multirun", "*.ckpt", ".whl", ".gl",
)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def conf_files() -> list[str]:
    """Every config file of conf/, as a path relative to conf/."""
    return sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))


def test_pyproject_names_every_package_and_command() -> None:
    project = pyproject()
    setuptools = project["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(ROOT / "src").parts)
        for p in (ROOT / "src" / "siamese_retrieval").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert set(setuptools["packages"]) == found | {"siamese_retrieval.conf"}, "a new subpackage must be listed"
    assert setuptools["package-dir"] == {"": "src", "siamese_retrieval.conf": "conf"}
    assert (ROOT / "conf" / "__init__.py").is_file(), "Hydra's pkg:// source needs conf/__init__.py"
    assert project["project"]["scripts"] == COMMANDS
    assert project["project"]["license"] == "MIT"
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "siamese-retrieval contributors" in license_text


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    tree = base / "tree"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE, symlinks=True)
    out = base / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "absent from the `packages` configuration" not in proc.stderr, proc.stderr[-3000:]
    (whl,) = out.glob("siamese_retrieval-*.whl")
    return whl


def test_wheel_carries_configs_commands_and_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
    assert "siamese_retrieval/conf/__init__.py" in names
    assert "siamese_retrieval/conf/train.yaml" in names
    missing = [f for f in conf_files() if f"siamese_retrieval/conf/{f}" not in names]
    assert not missing, f"config files not in the wheel: {missing}"
    for group in ("data", "model", "trainer", "callbacks", "logger", "paths", "hydra", "debug", "experiment",
                  "hparams_search", "index", "rerank", "ablation"):
        assert any(n.startswith(f"siamese_retrieval/conf/{group}/") for n in names), group
    assert "siamese_retrieval/entry_points.py" in names
    packaged = {n for n in names if n.startswith("siamese_retrieval/") and n.endswith(".py")}
    sources = {"siamese_retrieval/" + p.relative_to(ROOT / "src" / "siamese_retrieval").as_posix()
               for p in (ROOT / "src" / "siamese_retrieval").rglob("*.py") if "__pycache__" not in p.parts}
    assert not sources - packaged, f"modules not in the wheel: {sorted(sources - packaged)}"
    assert not any(n.startswith(("conf/", "tests/", "src/")) for n in names), "only the package at the top"
    assert dict(entry_points["console_scripts"]) == COMMANDS
    assert f"{dist_info}/licenses/LICENSE" in names


def installed_env(target: Path) -> dict[str, str]:
    """The environment of a user of the installed package: no PROJECT_ROOT (set by conftest for the
    checkout's scripts), no cache override, the installed copy first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "SIAMESE_CACHE_DIR", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), WANDB_MODE="offline", WANDB_SILENT="true")
    return env


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return target


def test_installed_package_reads_its_own_configs(installed: Path, tmp_path: Path) -> None:
    """Imported from the install target, not src/; Hydra reads pkg://siamese_retrieval.conf; --help lists
    the groups from there (no torch import: about 2 s)."""
    code = ("import importlib.resources as r, siamese_retrieval, siamese_retrieval.entry_points as e; "
            "print(siamese_retrieval.__file__); print(e.CONFIG_PATH); print(r.files('siamese_retrieval.conf'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=installed_env(installed), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module_file, config_path, conf_dir = proc.stdout.split()
    assert Path(module_file).is_relative_to(installed)
    assert config_path == "pkg://siamese_retrieval.conf"
    assert Path(conf_dir).is_relative_to(installed)

    script = installed / "bin" / "siamese-train"
    assert script.is_file()
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env=installed_env(installed), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("train.py: train a Siamese retrieval model")
    assert "  debug:          default fast fdr limit overfit profiler   (-)" in proc.stdout
    assert ("  experiment:     beat_verification gpu_recipe keypoint_count keypoint_representation keypoint_vs_cnn "
            "large_city   (-)") in proc.stdout
    proc = subprocess.run([sys.executable, str(script), "model=nope"], capture_output=True, text=True,
                          cwd=tmp_path, env=installed_env(installed), timeout=120)
    assert proc.returncode == 2 and "Could not find 'model/nope'" in proc.stderr, proc.stderr[-3000:]
    # without PROJECT_ROOT (only the checkout's root scripts set it), everything goes under the current directory
    proc = subprocess.run([sys.executable, str(script), "--cfg", "job", "--resolve", "--package", "paths"],
                          capture_output=True, text=True, cwd=tmp_path, env=installed_env(installed), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "root_dir: .\nlog_dir: ./outputs\ncache_dir: ./data_cache\n" in proc.stdout, proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_installed_console_script_trains_in_the_current_directory(installed: Path, tmp_path: Path,
                                                                  cache_dir: Path) -> None:
    """`siamese-train debug=fast` of the installed copy, run elsewhere: the run lands in
    ./outputs/debug/runs/<date>/<time>/ (about 15 s on 2 cores with the session's tiny city cached)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = installed / "bin" / "siamese-train"
    env = {**installed_env(installed), "SIAMESE_CACHE_DIR": str(cache_dir)}  # the tiny city, built once per session
    proc = subprocess.run([sys.executable, str(script), "debug=fast"], capture_output=True, text=True, cwd=work,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (metrics,) = (work / "outputs" / "debug" / "runs").glob("*/*/metrics.json")
    assert '"status": "ok"' in metrics.read_text()
    assert not (installed / "outputs").exists()

    # the same through `python -m`, for a copy whose commands are not on PATH; and siamese-compare on it
    proc = subprocess.run([sys.executable, "-m", "siamese_retrieval.entry_points", "compare",
                           str(metrics.parent), "--out", str(tmp_path / "cmp")], capture_output=True, text=True,
                          cwd=work, env=installed_env(installed), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "cmp" / "comparison.md").is_file()


def test_metrics_json_records_versions_and_the_code_commit(tmp_path: Path) -> None:

    import torch

    from siamese_retrieval.run_outputs import write_metrics_json

    write_metrics_json(tmp_path / "metrics.json", {"status": "ok", "metrics": {"test/recall@1": 0.5}})
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["metrics"] == {"test/recall@1": 0.5}
    prov = written["provenance"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["python"].count(".") == 2
    # the processor and torch's kernels: runs repeat bit for bit only on the same ones
    assert prov["cpu"].endswith(f", torch kernels {torch.backends.cpu.get_cpu_capability()}"), prov["cpu"]
    assert len(prov["cpu"]) > len(", torch kernels ") + len(torch.backends.cpu.get_cpu_capability())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one): the very commit, and whether files were changed
        assert prov["git_commit"] == head.stdout.strip() and isinstance(prov["git_dirty"], bool)
