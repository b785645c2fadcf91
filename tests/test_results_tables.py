"""Results tables are generated from the result files their experiment stored, never typed by hand: each table
below is regenerated from its file and must appear, verbatim, in the documents that show it. A changed result
file (a rerun) fails here until the documents are updated with the new table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT


def _run_stress_table() -> Callable[[dict], str]:
    path = ROOT / "experiments" / "beat_verification" / "run_stress.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("run_stress_for_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda record: module.table(record["recall@1"])


# (stored results, how its table is made, the documents that show it)
TABLES = [
    ("experiments/beat_verification/results/stress.json", _run_stress_table,
     ["README.md", "experiments/beat_verification/README.md"]),
]


@pytest.mark.parametrize(("results", "make", "documents"), TABLES, ids=[t[0] for t in TABLES])
def test_tables_match_their_stored_results(results: str, make, documents: list[str]) -> None:
    table = make()(json.loads((ROOT / results).read_text()))
    for document in documents:
        assert table in (ROOT / document).read_text(), f"{document}: its table of {results} is stale; regenerate it"


def test_a_changed_result_fails_the_check(tmp_path: Path) -> None:
    """The check can fail: the same table made from a copy with one number changed is not in the documents."""
    results, make, documents = TABLES[0]
    record = json.loads((ROOT / results).read_text())
    first_set = next(iter(record["recall@1"]))
    record["recall@1"][first_set]["null"][0] = round(record["recall@1"][first_set]["null"][0] - 0.1, 4)
    (tmp_path / "changed.json").write_text(json.dumps(record))
    changed = make()(json.loads((tmp_path / "changed.json").read_text()))
    assert all(changed not in (ROOT / d).read_text() for d in documents)
