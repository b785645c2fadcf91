"""compare.py on malformed sweep directories, through the real command line.

A malformed job (its metrics.json or .hydra/overrides.yaml cannot be understood) is listed as failed with
the reason while the good jobs are still compared (exit 0); a sweep without jobs or an unusable --out is
one `error:` line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT

GOOD_METRICS = {"test/recall@1": 0.5, "test/mAP": 0.25}


def good_job(sweep: Path, num: int, seed: int) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = ["model=keypoint_snn", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "metrics.json").write_text(json.dumps({"status": "ok", "seed": seed, "overrides": overrides,
                                                  "metrics": GOOD_METRICS}))
    return job


def bad_job(metrics: bytes | None, overrides: bytes | None = b"- model=cnn_snn\n- seed=0\n") -> Callable[[Path], None]:
    """Job 9 of the sweep, with these raw bytes as metrics.json / .hydra/overrides.yaml (None: no such file)."""

    def build(sweep: Path) -> None:
        job = sweep / "9"
        (job / ".hydra").mkdir(parents=True)
        if overrides is not None:
            (job / ".hydra" / "overrides.yaml").write_bytes(overrides)
        if metrics is not None:
            (job / "metrics.json").write_bytes(metrics)

    return build


def ok_body(**changes: object) -> bytes:
    body = {"status": "ok", "seed": 0, "metrics": {"test/recall@1": 0.7, "test/mAP": 0.3}}
    body.update(changes)
    return json.dumps(body).encode()


# (id, how to break job 9 of a sweep that also holds two good jobs, reason expected in the failed-jobs list)
MALFORMED_JOBS = [
    ("metrics_json_is_a_list", bad_job(b'[{"test/recall@1": 0.5}]'),
     "metrics.json must hold a JSON object, found a list"),
    ("metrics_json_is_a_number", bad_job(b"0.5"), "metrics.json must hold a JSON object, found a number"),
    ("metrics_json_invalid_utf8", bad_job(b'{"status": "ok", "error": "\xff\xfe"}'),
     "metrics.json is not UTF-8 text (byte 0xff at offset 27)"),
    ("metrics_json_invalid_json", bad_job(b'{"status": "ok", "metrics": {'), "metrics.json is not valid JSON ("),
    ("metrics_json_empty", bad_job(b""), "metrics.json is not valid JSON (Expecting value at line 1 column 1)"),
    ("metrics_json_nested_too_deeply", bad_job(b"[" * 100_000), "metrics.json is not valid JSON (nested too deeply)"),
    ("metrics_not_a_dict", bad_job(ok_body(metrics=[0.5, 0.25])), "metrics must be an object of numbers, found a list"),
    ("metrics_a_string", bad_job(ok_body(metrics="recall 0.5")), "metrics must be an object of numbers, found a string"),
    ("metric_value_a_string", bad_job(ok_body(metrics={"test/recall@1": "0.7"})),
     "metric 'test/recall@1' is not a number: \"0.7\""),
    ("metric_value_a_dict", bad_job(ok_body(metrics={"test/mAP": {"mean": 0.3}})), "metric 'test/mAP' is not a number"),
    ("metric_value_a_boolean", bad_job(ok_body(metrics={"test/recall@1": True})),
     "metric 'test/recall@1' is not a number: true"),
    ("overrides_yaml_invalid", bad_job(ok_body(), b"- model=cnn_snn\n  - seed: [0\n"),
     ".hydra/overrides.yaml is not valid YAML ("),
    ("overrides_yaml_a_mapping", bad_job(ok_body(), b"model: cnn_snn\n"),
     ".hydra/overrides.yaml must be a list of overrides, found a mapping"),
    ("overrides_yaml_nested", bad_job(ok_body(), b"- model=cnn_snn\n- [seed=0]\n"),
     ".hydra/overrides.yaml must hold override strings, found ['seed=0']"),
    ("overrides_yaml_invalid_utf8", bad_job(ok_body(), b"- model=caf\xe9\n"),
     ".hydra/overrides.yaml is not UTF-8 text (byte 0xe9 at offset 11)"),
    ("overrides_yaml_invalid_no_metrics", bad_job(None, b"- [unclosed\n"), ".hydra/overrides.yaml is not valid YAML ("),
    ("overrides_in_metrics_json_a_string", bad_job(ok_body(overrides="model=cnn_snn seed=0"), None),
     "metrics.json: overrides must be a list of overrides, found a string"),
]


def run_compare(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "compare.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("build, reason", [c[1:] for c in MALFORMED_JOBS], ids=[c[0] for c in MALFORMED_JOBS])
def test_malformed_job_is_listed_as_failed(build, reason: str, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    good_job(sweep, 0, 0)
    good_job(sweep, 1, 1)
    build(sweep)
    proc = run_compare(sweep, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not proc.stderr.strip(), proc.stderr[-3000:]
    assert "2 of 3 jobs succeeded" in proc.stdout
    assert "| model=keypoint_snn | 2 | 0.5000 ± 0.0000 |" in proc.stdout  # the good jobs are still compared
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("- `") and "/9`" in ln]
    assert "Failed jobs (1)" in proc.stdout and len(failed) == 1, proc.stdout
    assert "[failed]" in failed[0] and reason in failed[0], (reason, failed[0])
    assert (tmp_path / "out" / "comparison.md").read_text().count(reason) == 1


def test_null_and_nan_metrics_are_not_measured(tmp_path: Path) -> None:
    """metrics.json writes NaN as NaN (nested) or null: the job counts, the value is left out of the means."""
    sweep = tmp_path / "sweep"
    good_job(sweep, 0, 0)
    bad_job(b'{"status": "ok", "seed": 1, "metrics": {"test/recall@1": NaN, "test/mAP": null}}',
            b"- model=keypoint_snn\n- seed=1\n")(sweep)
    proc = run_compare(sweep, "--out", tmp_path / "out")
    assert proc.returncode == 0 and "Failed jobs" not in proc.stdout, proc.stdout + proc.stderr
    assert "| model=keypoint_snn | 2 | 0.5000 ± 0.0000 | 0.2500 ± 0.0000 |" in proc.stdout


def _existing_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text("not a folder")
    return tmp_path / "plain" / "out"


# (id, the sweep to compare, the --out to pass (None: none), expected substrings of the one error line)
UNUSABLE = [
    ("out_is_an_existing_file", "good", _existing_file, ("--out", "taken: exists and is not a directory")),
    ("out_under_a_file", "good", _under_a_file, ("--out", "plain/out: cannot write there (Not a directory)")),
    ("out_in_dev_null", "good", lambda tmp_path: Path("/dev/null/out"), ("--out /dev/null/out: cannot write there",)),
    ("sweep_without_jobs", "empty", None, ("sweep: no jobs found",)),
    ("sweep_only_unrelated_files", "unrelated", None, ("sweep: no jobs found",)),
    ("sweep_missing", "missing", None, ("sweep: not a directory",)),
    ("sweep_is_a_file", "file", None, ("sweep: not a directory",)),
]


def _make_sweep(kind: str, tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    if kind == "good":
        good_job(sweep, 0, 0)
    elif kind == "empty":
        sweep.mkdir()
    elif kind == "unrelated":
        (sweep / "0" / "wandb").mkdir(parents=True)
        (sweep / "notes.txt").write_text("nothing to see")
    elif kind == "file":
        sweep.write_text("a file")
    return sweep


@pytest.mark.parametrize("kind, out, needles", [c[1:] for c in UNUSABLE], ids=[c[0] for c in UNUSABLE])
def test_unusable_input_or_out_is_one_error_line(kind: str, out, needles: tuple[str, ...], tmp_path: Path) -> None:
    sweep = _make_sweep(kind, tmp_path)
    args = [sweep] + (["--out", out(tmp_path)] if out else [])
    proc = run_compare(*args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_case_tables_are_big_enough() -> None:
    assert len(MALFORMED_JOBS) + len(UNUSABLE) >= 10


def test_a_metric_no_job_recorded_is_one_error_line(tmp_path: Path) -> None:
    """A mistyped --metrics name was dropped from the table without a word; it is refused, naming what is there."""
    sweep = _make_sweep("good", tmp_path)
    proc = run_compare(sweep, "--metrics", "test/recall@1", "test/recal@5")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == ["error: --metrics test/recal@5: no job recorded it (did you mean "
                                        "test/recall@1?); recorded: test/mAP, test/recall@1"]
    assert not (sweep / "comparison.md").exists()
