"""Results tables are generated from the result files their experiment stored, never typed by hand.

A document shows a table between `<!-- results: <file> (...) -->` and `<!-- /results -->`; the table there must
be exactly what the experiment's script makes from that file. A rerun that changes a stored number fails here
until the documents are regenerated (`python <script> --table <file>`)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT

BLOCK = re.compile(r"<!-- results: (\S+) \([^)]*\) -->\n(.*?)\n<!-- /results -->", re.S)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*/README.md"))]


def _script(path: str, name: str):
    path = ROOT / path
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stress_table(record: dict) -> str:
    return _script("experiments/beat_verification/run_stress.py", "run_stress_for_tables").table(record["recall@1"])


def _main_table(record: dict) -> str:
    return _script("experiments/main_results/run.py", "main_results_for_tables").table(record)


# each stored results file and how its table is made
MAKERS: dict[str, Callable[[dict], str]] = {
    "experiments/beat_verification/results/stress.json": _stress_table,
    "experiments/main_results/results/main.json": _main_table,
}


# where a document may show, under the table, when, where and with what it was measured (from the same file)
PROVENANCE: dict[str, Callable[[dict], str]] = {
    "experiments/beat_verification/results/stress.json":
        lambda record: _script("experiments/beat_verification/run_stress.py", "run_stress_for_tables").provenance_line(record),
    "experiments/main_results/results/main.json":
        lambda record: _script("experiments/main_results/run.py", "main_results_for_tables").provenance_line(record),
}


def blocks() -> list[tuple[Path, str, str]]:
    return [(doc, m.group(1), m.group(2)) for doc in DOCUMENTS for m in BLOCK.finditer(doc.read_text())]


def test_every_stored_result_is_shown_and_every_shown_table_has_a_maker() -> None:
    shown = {results for _, results, _ in blocks()}
    assert shown == set(MAKERS), f"tables without a results file or maker: {shown - set(MAKERS)}; " \
                                 f"results shown nowhere: {set(MAKERS) - shown}"


@pytest.mark.parametrize(("document", "results", "table"), blocks(),
                         ids=[f"{d.relative_to(ROOT)}:{r}" for d, r, _ in blocks()])
def test_tables_match_their_stored_results(document: Path, results: str, table: str) -> None:
    record = json.loads((ROOT / results).read_text())
    made = [MAKERS[results](record)]
    if results in PROVENANCE:
        made.append(made[0] + "\n\n" + PROVENANCE[results](record))
    assert table in made, f"{document.relative_to(ROOT)}: its table of {results} is stale; regenerate it"


def _change_first_number(node):
    """The first measured number in a results tree, lowered by 0.1 (in place); True once changed."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, float):
            node[key] = value - 0.1
            return True
        if _change_first_number(value):
            return True
    return False


@pytest.mark.parametrize("results", sorted(MAKERS))
def test_a_changed_result_fails_the_check(results: str, tmp_path: Path) -> None:
    """The check can fail: the table made from a copy with one number changed differs from every shown one."""
    record = json.loads((ROOT / results).read_text())
    assert _change_first_number(record.get("results", record.get("recall@1")))
    (tmp_path / "changed.json").write_text(json.dumps(record))
    table = MAKERS[results](json.loads((tmp_path / "changed.json").read_text()))
    assert all(not shown.startswith(table) for _, r, shown in blocks() if r == results)
