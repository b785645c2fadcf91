"""experiments/keypoint_representation/run.py: the table from a sweep's jobs and the evaluations already made."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "experiments" / "keypoint_representation" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("keypoint_representation_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(r1: float) -> dict:
    return {"test/recall@1": r1, "test/recall@5": r1 + 0.1, "test/recall@10": r1 + 0.2, "test/mAP": r1 / 2}


def test_table_from_the_sweep_and_existing_evaluations(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tmp_path / "sweep"
    jobs = [("keypoint_snn", 0, 0.0), ("keypoint_snn", 1, 0.02), ("keypoint_set", 0, 0.6), ("keypoint_set", 1, 0.7)]
    for n, (model, seed, r1) in enumerate(jobs):
        (sweep / str(n)).mkdir(parents=True)
        (sweep / str(n) / "metrics.json").write_text(json.dumps(
            {"status": "ok", "model": model, "seed": seed, "checkpoint": f"/ckpt/{model}{seed}.ckpt", "metrics": _metrics(r1)}))
    (sweep / "9").mkdir()  # a failed job is left out
    (sweep / "9" / "metrics.json").write_text(json.dumps({"status": "failed", "model": "keypoint_set", "seed": 2}))
    out = sweep / "keypoint_representation"
    evals = {"orb_bow/seed0": 0.5, "orb_bow/seed1": 0.6, "orb_ransac": 0.77,
             "keypoint_set+orb_ransac/seed0": 0.8, "keypoint_set+orb_ransac/seed1": 0.8,
             "keypoint_set+fused_ORB/seed0": 0.85, "keypoint_set+fused_ORB/seed1": 0.87,
             "keypoint_set+learned_verifier/seed0": 0.81, "keypoint_set+learned_verifier/seed1": 0.83}
    for folder, r1 in evals.items():
        (out / folder).mkdir(parents=True)
        (out / folder / "metrics.json").write_text(json.dumps(
            {"status": "ok", "seconds_per_query": 0.25, "metrics": _metrics(r1)}))
    stored = tmp_path / "results" / "representation.json"
    monkeypatch.setattr(sys, "argv", ["run.py", "--sweep", str(sweep), "--out", str(stored)])
    run = _load()
    run.main()  # every row's metrics.json exists: nothing is run
    record = json.loads(stored.read_text())
    table = run.table(record)
    assert table in capsys.readouterr().out
    assert {"versions", "git_commit"} <= set(record["provenance"]) and record["command"].endswith(str(sweep))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["keypoint_set"][1:3] == ["2", "0.650 ± 0.071"]
    assert rows["keypoint_snn"][2] == "0.010 ± 0.014"
    assert rows["orb_bow"][1:3] == ["2", "0.550 ± 0.071"]
    assert rows["orb_ransac"][1:3] == ["1", "0.770 ± 0.000"]
    assert rows["keypoint_set + learned verifier"][2] == "0.820 ± 0.014"
    assert rows["keypoint_set + fused (ORB)"][-1].strip(" |") == "0.430 ± 0.007"  # mAP: r1 / 2


def test_a_sweep_without_successful_jobs_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["run.py", "--sweep", str(tmp_path)])
    with pytest.raises(SystemExit, match="no successful job"):
        _load().main()
