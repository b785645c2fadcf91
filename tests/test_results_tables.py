"""Results tables are generated from the result files their experiment stored, never typed by hand.

A document shows a table between `<!-- results: <file> (...) -->` and `<!-- /results -->`
(experiments/tables.py); the block must hold exactly what the experiment's script makes from that file. A rerun
that changes a stored number fails here until `python experiments/tables.py` rewrites the documents."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("experiment_tables", ROOT / "experiments" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)
BLOCKS = tables.blocks()


def test_every_stored_result_is_shown_and_every_shown_table_has_a_maker() -> None:
    shown = {results for _, results, _ in BLOCKS}
    assert shown == set(tables.MAKERS), f"tables without a results file or maker: {shown - set(tables.MAKERS)}; " \
                                        f"results shown nowhere: {set(tables.MAKERS) - shown}"
    assert all(re.search(r"^\|[ -:|]+\|$", block, flags=re.M) for _, _, block in BLOCKS), "a block without a table"


@pytest.mark.parametrize(("document", "results", "block"), BLOCKS,
                         ids=[f"{d.relative_to(ROOT)}:{r}" for d, r, _ in BLOCKS])
def test_tables_match_their_stored_results(document: Path, results: str, block: str) -> None:
    assert block in tables.renderings(results), \
        f"{document.relative_to(ROOT)}: its table of {results} is stale; run python experiments/tables.py"


def _change_first_number(node) -> bool:
    """The first measured number in a results tree, lowered by 0.1 (in place); True once changed."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, float):
            node[key] = value - 0.1
            return True
        if _change_first_number(value):
            return True
    return False


@pytest.mark.parametrize("results", sorted(tables.MAKERS))
def test_a_changed_result_fails_the_check(results: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: with one stored number changed (in a temporary copy), every block showing that file
    is stale, and `tables.py --check` says so."""
    record = json.loads((ROOT / results).read_text())
    measured = next(key for key in ("results", "recall@1", "rows", "seeds", "jobs") if key in record)
    assert _change_first_number(record[measured])
    copy = tmp_path / "root"
    for other in tables.MAKERS:
        (copy / other).parent.mkdir(parents=True, exist_ok=True)
        (copy / other).write_text((ROOT / other).read_text())
    (copy / results).write_text(json.dumps(record))
    for doc, r, _ in BLOCKS:
        (copy / doc.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (copy / doc.relative_to(ROOT)).write_text(doc.read_text())
    monkeypatch.setattr(tables, "ROOT", copy)
    monkeypatch.setattr(tables, "documents", lambda: [copy / d.relative_to(ROOT) for d in {d for d, _, _ in BLOCKS}])
    stale = [(d, r, b) for d, r, b in tables.blocks() if b not in tables.renderings(r)]
    assert {r for _, r, _ in stale} == {results}
    assert tables.main(["--check"]) == 1


def test_an_empty_block_is_stale_and_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block written without its table (a new place to show a result) fails the check until tables.py fills it."""
    results = "experiments/beat_verification/results/heads.json"
    (tmp_path / results).parent.mkdir(parents=True)
    (tmp_path / results).write_text((ROOT / results).read_text())
    doc = tmp_path / "page.md"
    doc.write_text(f"before\n\n<!-- results: {results} (python compare.py --markdown ...) -->\n<!-- /results -->\n")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "documents", lambda: [doc])
    assert tables.main(["--check"]) == 1
    assert tables.main([]) == 0 and tables.main(["--check"]) == 0
    (_, shown, block), = tables.blocks()
    assert shown == results and block == tables.renderings(results)[0]


def test_the_provenance_line_names_the_processor_when_the_results_file_recorded_it() -> None:
    from siamese_retrieval.run_outputs import measured_line

    record = {"date": "2026-12-07", "machine": "2 CPU cores, x86_64, no GPU",
              "provenance": {"versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}, "git_commit": "3415a36ffb01",
                             "git_dirty": False}}
    assert measured_line(record) == ("Measured 2026-12-07 on 2 CPU cores, x86_64, no GPU; python 3.11.7, torch "
                                     "2.13.0+cpu; commit 3415a36.")
    record["provenance"]["cpu"] = "AMD EPYC, torch kernels AVX2"
    assert measured_line(record).startswith("Measured 2026-12-07 on 2 CPU cores, x86_64, no GPU (AMD EPYC, torch "
                                            "kernels AVX2); python 3.11.7")


def test_the_provenance_line_names_every_commit_the_jobs_ran_on(tmp_path: Path) -> None:
    """Sweeps merged into one table may come from different commits: the line names each, with its job count."""
    import json

    from siamese_retrieval.compare import compare, results_record
    from siamese_retrieval.run_outputs import measured_line

    for i, (commit, dirty) in enumerate([("aaaaaaa111", False), ("bbbbbbb222", True), ("aaaaaaa111", False)]):
        job = tmp_path / "sweep" / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={i}\n")
        (job / "metrics.json").write_text(json.dumps({
            "status": "ok", "metrics": {"test/recall@1": 0.5 + i / 10},
            "provenance": {"versions": {"python": "3.11.7"}, "git_commit": commit, "git_dirty": dirty}}))
    result = compare([tmp_path / "sweep"], metrics=["test/recall@1"], out_dir=tmp_path / "out")
    record = json.loads(json.dumps(results_record(result["jobs"], result["metrics"], "python compare.py ...")))
    assert [j["commit"] for j in record["jobs"]] == ["aaaaaaa", "bbbbbbb (with uncommitted changes)", "aaaaaaa"]
    assert measured_line(record).endswith(
        "; python 3.11.7; commits aaaaaaa (2 jobs), bbbbbbb (with uncommitted changes) (1 job).")
    del record["jobs"][1]["commit"]  # a job that ran before jobs recorded their commit
    assert measured_line(record).endswith("; commits aaaaaaa (2 jobs), not recorded (1 job).")
    for job in record["jobs"]:
        job["commit"] = "aaaaaaa"
    assert measured_line(record).endswith("; python 3.11.7; commit aaaaaaa.")
