"""compare.py on hand-written sweep directories: grouping, mean/std, best in bold, failed jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from siamese_retrieval.compare import compare, group_key
from tests.conftest import ROOT


def write_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None, status: str = "ok",
              hydra_dir: bool = True) -> Path:
    job = sweep / str(num)
    job.mkdir(parents=True)
    if hydra_dir:
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None or status == "failed":
        seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
        body = {"status": status}
        if status == "ok":
            body.update({"model": "m", "data": "synth_tiny", "seed": seed, "overrides": overrides, "epochs": 1,
                         "metrics": metrics})
        else:
            body["error"] = "data.pairs.preset='bogus' is unknown"
        (job / "metrics.json").write_text(json.dumps(body))
    return job


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    # keypoint_snn: recall@1 = 0.1, 0.2, 0.3 -> mean 0.2, sample std 0.1; mAP 0.5 each -> std 0
    for i, (seed, r1) in enumerate([(0, 0.1), (1, 0.2), (2, 0.3)]):
        write_job(s, i, ["model=keypoint_snn", f"seed={seed}", "data=synth_tiny"],
                  {"test/recall@1": r1, "test/mAP": 0.5})
    # cnn_snn: recall@1 = 0.4, 0.6 -> mean 0.5, std sqrt(0.02) = 0.1414; mAP 0.3, 0.5 -> 0.4 +- 0.1414
    write_job(s, 3, ["model=cnn_snn", "seed=0", "data=synth_tiny"], {"test/recall@1": 0.4, "test/mAP": 0.3})
    write_job(s, 4, ["model=cnn_snn", "seed=1", "data=synth_tiny"], {"test/recall@1": 0.6, "test/mAP": 0.5})
    write_job(s, 5, ["model=cnn_snn", "seed=2", "data=synth_tiny", "data.pairs.preset=bogus"], None, status="failed")
    write_job(s, 6, ["model=cnn_snn", "seed=3", "data=synth_tiny"], None)  # crashed: no metrics.json
    return s


def test_group_key_ignores_seed_and_bookkeeping() -> None:
    assert group_key(["seed=1", "model=cnn_snn", "hydra.sweep.dir=/x", "data=synth_tiny"]) == (
        "data=synth_tiny", "model=cnn_snn")
    assert group_key(["model=a", "seed=0"]) == group_key(["seed=5", "model=a"])


def test_groups_mean_std_and_failed_jobs(sweep: Path, tmp_path: Path) -> None:
    result = compare([sweep], out_dir=tmp_path / "out")
    groups = {g.key: g for g in result["groups"]}
    assert set(groups) == {("data=synth_tiny", "model=keypoint_snn"), ("data=synth_tiny", "model=cnn_snn")}
    kp, cnn = groups[("data=synth_tiny", "model=keypoint_snn")], groups[("data=synth_tiny", "model=cnn_snn")]
    mean, std, n = kp.mean_std("test/recall@1")
    assert (mean, std, n) == (pytest.approx(0.2), pytest.approx(0.1), 3)
    assert kp.mean_std("test/mAP") == (pytest.approx(0.5), pytest.approx(0.0), 3)
    mean, std, n = cnn.mean_std("test/recall@1")
    assert (mean, std, n) == (pytest.approx(0.5), pytest.approx(0.1414213562), 2)
    assert sorted(j.status for j in result["jobs"]) == ["failed", "missing", "ok", "ok", "ok", "ok", "ok"]

    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md == result["markdown"]
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| model=")}
    # labels keep only what differs between groups; best mean per metric in bold
    assert set(rows) == {"model=keypoint_snn", "model=cnn_snn"}
    assert "| 3 | 0.2000 ± 0.1000 | **0.5000 ± 0.0000** |" in rows["model=keypoint_snn"]
    assert "| 2 | **0.5000 ± 0.1414** | 0.4000 ± 0.1414 |" in rows["model=cnn_snn"]
    assert "Failed jobs (2)" in md and "bogus" in md and "no metrics.json" in md
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_table_and_merges_sweeps(sweep: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_job(other, 0, ["model=keypoint_snn", "seed=7", "data=synth_tiny"], {"test/recall@1": 0.2, "test/mAP": 0.5},
              hydra_dir=False)  # overrides from metrics.json
    proc = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(sweep), str(other), "--metrics",
                           "test/recall@1", "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| model=keypoint_snn | 4 | 0.2000 ± 0.0816 |" in proc.stdout
    assert "test/mAP" not in proc.stdout.split("Failed jobs")[0]
    assert (tmp_path / "cli" / "comparison.md").is_file()


def test_cli_only_failed_jobs_does_not_crash(tmp_path: Path) -> None:
    write_job(tmp_path / "s", 0, ["seed=0"], None, status="failed")
    proc = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Failed jobs (1)" in proc.stdout and "Traceback" not in proc.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def test_stored_results_make_the_same_table_without_the_sweep(sweep: Path, tmp_path: Path) -> None:
    """--save-results stores every job (an experiment's results/*.json); --markdown makes the same table from that
    file alone, and a changed number changes the table."""
    from siamese_retrieval.entry_points import compare_main

    stored = tmp_path / "results" / "sweep.json"
    assert compare_main([str(sweep), "--out", str(tmp_path / "out"), "--save-results", str(stored)]) == 0
    record = json.loads(stored.read_text())
    assert record["command"].startswith("python compare.py ") and record["metrics"] == ["test/recall@1", "test/mAP"]
    assert len(record["jobs"]) == 7 and {"versions", "git_commit"} <= set(record["provenance"])
    table = compare([sweep], out_dir=tmp_path / "again")["table"]
    shown = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--markdown", str(stored)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() == table
    record["jobs"][0]["metrics"]["test/recall@1"] = 0.9
    stored.write_text(json.dumps(record))
    changed = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--markdown", str(stored)],
                             capture_output=True, text=True, timeout=120).stdout.strip()
    assert changed != table and "0.4667 ± 0.3786" in changed
    for text in ("[]", '{"jobs": [1], "metrics": []}', "not json"):
        stored.write_text(text)
        bad = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--markdown", str(stored)],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith(f"error: {stored}: not a results file"), bad.stderr
        assert "Traceback" not in bad.stderr
    (tmp_path / "a_file").write_text("")
    assert compare_main([str(sweep), "--out", str(tmp_path / "out"), "--save-results",
                         str(tmp_path / "a_file" / "sweep.json")]) == 2


def test_run_minutes_are_a_column_where_less_is_best(tmp_path: Path) -> None:
    """`--metrics ... minutes`: each job's elapsed_s / 60, averaged like a metric, the fastest group in bold."""
    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for i, (model, seed, elapsed) in enumerate([("fast", 0, 600.0), ("fast", 1, 720.0), ("slow", 0, 1800.0)]):
        job = write_job(s, i, [f"model={model}", f"seed={seed}"], {"test/recall@1": 0.5 + i / 10})
        body = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps({**body, "elapsed_s": elapsed}))
    result = compare([s], metrics=["test/recall@1", "minutes"], out_dir=tmp_path / "out")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result["markdown"].splitlines()[2:]}
    assert rows["model=fast"].endswith("| **11.0 ± 1.4** |"), rows
    assert rows["model=slow"].endswith("| 30.0 ± 0.0 |") and "**0.7000 ± 0.0000**" in rows["model=slow"], rows


def _median_rank() -> None:
    """A researcher's lower-is-better metric (registered by the test below, removed after)."""


def test_a_registered_lower_is_better_metric_is_bolded_by_its_recorded_direction(tmp_path: Path) -> None:
    """metrics.json records each metric's direction when it is written (METRICS); compare.py reads it, so the
    smaller median rank is the bold one though compare.py never imports the module that registered the metric."""
    from siamese_retrieval.registry import METRICS
    from siamese_retrieval.run_outputs import write_metrics_json

    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    METRICS.register("median_rank", higher_is_better=False, at_k=False, description="rank of the first positive")(
        _median_rank)
    try:
        for i, (model, rank) in enumerate([("a", 3.0), ("b", 7.0)]):
            job = write_job(s, i, [f"model={model}"], {})
            write_metrics_json(job / "metrics.json", {"status": "ok", "overrides": [f"model={model}"], "metrics": {
                "test/median_rank": rank, "test/recall@1": 0.4 + i / 10, "test/n_pairs": 5.0 + i}})
    finally:
        METRICS.unregister("median_rank")
    recorded = json.loads((s / "0" / "metrics.json").read_text())["directions"]
    assert recorded == {"test/median_rank": "min", "test/recall@1": "max"}  # n_pairs: no family, no direction
    result = compare([s], metrics=["test/median_rank", "test/recall@1"], out_dir=tmp_path / "out")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result["markdown"].splitlines()[2:]}
    assert rows["model=a"].endswith("| **3.0000 ± 0.0000** | 0.4000 ± 0.0000 |"), rows
    assert rows["model=b"].endswith("| 7.0000 ± 0.0000 | **0.5000 ± 0.0000** |"), rows


def test_means_equal_as_printed_are_ties(tmp_path: Path) -> None:
    """Bold marks the best mean as the table prints it: 0.12341 and 0.12344 both read 0.1234, so both are best."""
    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for i, (model, r1) in enumerate([("a", 0.12341), ("b", 0.12344), ("c", 0.1)]):
        write_job(s, i, [f"model={model}"], {"test/recall@1": r1})
    result = compare([s], metrics=["test/recall@1"], out_dir=tmp_path / "out")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result["markdown"].splitlines()[2:]}
    assert rows["model=a"].endswith("| **0.1234 ± 0.0000** |") and rows["model=b"].endswith("| **0.1234 ± 0.0000** |")
    assert rows["model=c"].endswith("| 0.1000 ± 0.0000 |"), rows
