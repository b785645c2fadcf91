"""The default city is not a toy: pixel similarity alone does not solve its test split."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.splits import split_by_place
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.retrieval.thumbnail import thumbnail_metrics
from tests.conftest import ROOT


@pytest.mark.slow  # a property of the default city's renderer (24 s): not of code that changes often
def test_thumbnail_baseline_recall_at_1_below_half_on_default_test_split(cache_dir: Path) -> None:
    root = ensure_city(cache_dir, SynthConfig.from_preset("default"))
    ds = read_dataset(root, check="none")
    assert 800 <= ds.n_db <= 1200 and 300 <= ds.n_query <= 600  # comparable to the study's London lite set
    split = OmegaConf.load(ROOT / "conf" / "data" / "synth.yaml").split  # the split train.py uses
    test_q = split_by_place(ds, fractions=tuple(split.fractions), cell_size_m=split.cell_size_m, seed=0).test_q
    res = thumbnail_metrics(ds, test_q)
    assert res["n_queries"] == len(test_q) >= 40
    assert res["recall@1"] < 0.5, res
    # ... while the task is learnable from pixels at all: far above chance (1 positive in ~150 database images)
    assert res["recall@10"] > 0.15, res
