"""`--help` of the three commands (help_text.py): short, their own groups only, and every example composes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from siamese_retrieval.help_text import COMMON
from tests.conftest import ROOT, compose_config

SCRIPT = {"train": "train.py", "eval": "evaluate.py", "retrieve": "retrieve.py"}


def help_of(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def test_train_help_is_short_and_lists_the_groups() -> None:
    text = help_of("train.py")
    assert len(text.splitlines()) <= 60
    assert "  model:          backbone_snn cnn_snn cnn_snn_pairs keypoint_set keypoint_snn*" in text
    assert "python train.py --cfg job" in text and "model=cnn_snn" in text


@pytest.mark.parametrize("script", ["evaluate.py", "retrieve.py"])
def test_evaluate_and_retrieve_list_only_their_own_groups(script: str) -> None:
    text = help_of(script)
    assert len(text.splitlines()) <= 60
    for group in ("trainer", "debug", "experiment", "hparams_search", "ablation", "callbacks"):
        assert f"  {group}:" not in text, group
    assert "  rerank:" in text and "  index:" in text


def test_cfg_job_still_prints_the_whole_config() -> None:
    done = subprocess.run([sys.executable, "train.py", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "trainer:" in done.stdout and len(done.stdout.splitlines()) > 100


@pytest.mark.parametrize("task", list(COMMON))
def test_every_common_override_composes(task: str, tmp_path: Path, cache_dir: Path) -> None:
    """The examples the help shows compose (placeholders filled in), and pass the typed configs' check."""
    from siamese_retrieval.configs import check_config

    fill = {"PATH": "/x", "IMAGE_OR_FOLDER": "x.png", "NAME:ROOT,...": "vpr_folder:/x"}
    for override, _ in COMMON[task]:
        words = [w.strip("'") for w in override.split() if w != "-m"]
        words = [w.replace("=PATH", "=/x.ckpt") if w.startswith("ckpt_path") else w for w in words]
        for placeholder, value in fill.items():
            words = [w.replace(placeholder, value) for w in words]
        words = [w.split(",")[0] if "=" in w and "," in w and "[" not in w else w for w in words]  # a sweep's first
        cfg = compose_config(task, words, tmp_path / "run", cache_dir)
        check_config(cfg, task)
