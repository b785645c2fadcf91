"""Every results table in the README, docs/ and experiments/ is made from the results file its experiment stored.

A document shows one between `<!-- results: <file> (...) -->` and `<!-- /results -->`. This script rewrites
each such block from its file (the table, and under it in the experiment's own README where the block has one,
the date, machine, versions and commit):

    python experiments/tables.py            # rewrite the blocks
    python experiments/tables.py --check    # exit 1 and name the stale ones (tests/test_results_tables.py)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]  # where the documents and results files are
CODE = ROOT  # where the experiment scripts are
BLOCK = re.compile(r"(<!-- results: (\S+) \([^)]*\) -->\n)(.*?)(\n?<!-- /results -->)", re.DOTALL)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*/README.md"))]


@functools.lru_cache(maxsize=None)
def _script(path: str):
    file = CODE / path
    sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(f"tables_{file.parent.name}_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STRESS, MAIN = "experiments/beat_verification/run_stress.py", "experiments/main_results/run.py"
PAIRS = "experiments/study_pair_split/run.py"
REPRESENTATION = "experiments/keypoint_representation/run.py"


def _sweep_table(record: dict) -> str:
    from siamese_retrieval.compare import table_from_results

    return table_from_results(record)


# each stored results file -> its table (under it, an experiment's README may show run_outputs.measured_line)
MAKERS: dict[str, Callable[[dict], str]] = {
    "experiments/beat_verification/results/stress.json": lambda r: _script(STRESS).table(r["recall@1"]),
    "experiments/main_results/results/main.json": lambda r: _script(MAIN).table(r),
    "experiments/study_pair_split/results/study_pairs.json": lambda r: _script(PAIRS).table(r),
    "experiments/keypoint_count/results/sweep.json": _sweep_table,
    "experiments/beat_verification/results/heads.json": _sweep_table,
    "experiments/keypoint_representation/results/representation.json": lambda r: _script(REPRESENTATION).table(r),
}


def renderings(results: str) -> list[str]:
    """What a block of `results` may hold: the table, or the table and its provenance line."""
    from siamese_retrieval.run_outputs import measured_line

    record = json.loads((ROOT / results).read_text())
    table = MAKERS[results](record)
    return [table, table + "\n\n" + measured_line(record)]


def blocks() -> list[tuple[Path, str, str]]:
    """(document, results file, what the block holds now) for every block."""
    return [(doc, m.group(2), m.group(3)) for doc in documents() for m in BLOCK.finditer(doc.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for doc in documents():
        text = doc.read_text()

        def fresh(m: re.Match) -> str:
            if not (ROOT / m.group(2)).is_file():
                stale.append(f"{doc.relative_to(ROOT)}: {m.group(2)} (no such results file)")
                return m.group(0)
            made = renderings(m.group(2))
            if m.group(3) in made:
                return m.group(0)
            stale.append(f"{doc.relative_to(ROOT)}: {m.group(2)}")
            keep_provenance = "\nMeasured " in m.group(3)
            return m.group(1) + made[1 if keep_provenance else 0] + "\n" + m.group(4).lstrip("\n")  # an empty block too

        new = BLOCK.sub(fresh, text)
        if new != text and not args.check:
            doc.write_text(new)
    for line in stale:
        print(("stale: " if args.check else "rewrote: ") + line)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
