"""Smoke test of experiments/benchmarks/train_throughput.py: a few steps on the tiny city, in a subprocess as
the README runs it; the JSON holds both throughputs and their ratio. (Numbers are not checked: they are the
lead's to measure on a quiet machine.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "benchmarks" / "train_throughput.py"


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(SCRIPT), "--override", "data=synth_tiny", "--override", f"paths.cache_dir={cache_dir}",
           "--steps", "3", "--warmup", "1", "--repeats", "1", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "cnn_snn" and result["data"] == "synth_tiny" and result["device"] == "cpu"
    full, compute = result["full_images_per_s"], result["compute_images_per_s"]
    assert full > 0 and compute > 0
    assert math.isclose(result["ratio"], compute / full, rel_tol=1e-9)
    assert result["goal"] == 1.15 and result["pass"] == (result["ratio"] <= 1.15)
    assert len(result["full"]) == len(result["compute_only"]) == 1
    for run in (*result["full"], *result["compute_only"]):
        assert run["images"] > 0 and run["seconds"] > 0  # images counted from the batches actually timed
    assert "ratio compute-only / full" in proc.stdout and "goal (cpu)" in proc.stdout
