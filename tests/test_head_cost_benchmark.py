"""experiments/benchmarks/head_cost.py measures every head against GeM in the same run (a tiny run here)."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def test_each_head_is_timed_beside_gem(capsys) -> None:
    spec = importlib.util.spec_from_file_location("head_cost", ROOT / "experiments" / "benchmarks" / "head_cost.py")
    head_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head_cost)
    medians = head_cost.main(["--heads", "mixvpr", "--repeats", "1", "--steps", "1", "--embed-images", "16"])
    assert list(medians) == ["gem", "mixvpr"]  # the baseline is added and measured first
    assert all(rate > 0 for head in medians.values() for rate in head.values())
    table = capsys.readouterr().out.splitlines()[-2:]
    assert table[0].split()[:2] == ["gem", "426,001"] and table[0].split()[3] == "1.00", table
    assert table[1].split()[:2] == ["mixvpr", "789,332"], table  # MixVPR's 4 mixers and projection: more parameters
