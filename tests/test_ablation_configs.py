"""experiment=beat_verification: every row of conf/ablation/ changes exactly the one thing it names.

A row that silently changed nothing (a renamed key, a wrong package) would put the default's numbers in the
table under another name, so each row's resolved config is compared with the default row's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from siamese_retrieval.configs import check_config
from tests.conftest import ROOT, compose_config

ROWS = sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml"))

# what each row must change (dotted key -> value); nothing else under `model` may differ from the default row
CHANGES = {
    "no_views": {"model.train_views": None, "model.max_epochs": 100},
    "fixed_norm": {"model.module.encoder.input_norm": "fixed"},
    "netvlad": {"model.module.encoder.aggregation.name": "netvlad"},
    "convap": {"model.module.encoder.aggregation.name": "convap"},
    "dim512": {"model.module.encoder.embedding_dim": 512},
    "whiten64": {"model.module.encoder.whiten_dim": 64},
    "images_192": {"model.inputs.height": 192, "model.inputs.width": 256},
    "pairs": {"model.name": "cnn_snn_pairs", "model.batches": "pairs", "model.module.loss.terms.ms": None},
    "mixvpr": {"model.module.encoder.aggregation.name": "mixvpr", "model.module.encoder.aggregation.channels": 512,
               "model.module.encoder.aggregation.pool": [4, 4]},
    "boq": {"model.module.encoder.aggregation.name": "boq", "model.module.encoder.aggregation.channels": 512,
            "model.module.encoder.aggregation.rows": 32},
    "salad": {"model.module.encoder.aggregation.name": "salad", "model.module.encoder.aggregation.clusters": 64},
}


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _model(row: str, tmp_path: Path, cache_dir: Path) -> dict[str, object]:
    cfg = compose_config("train", ["experiment=beat_verification", f"+ablation={row}", "seed=0"], tmp_path / row,
                         cache_dir)
    assert check_config(cfg, "train") == []
    return _flat({"model": OmegaConf.to_container(cfg.model, resolve=True)})


def test_every_row_is_listed_in_the_sweep_and_described() -> None:
    sweep = OmegaConf.load(ROOT / "conf" / "experiment" / "beat_verification.yaml").hydra.sweeper.params
    assert sorted(str(sweep["+ablation"]).split(",")) == ROWS
    assert set(ROWS) == set(CHANGES) | {"default"}


@pytest.mark.parametrize("row", sorted(CHANGES))
def test_a_row_changes_only_what_it_names(row: str, tmp_path: Path, cache_dir: Path) -> None:
    default, changed = _model("default", tmp_path, cache_dir), _model(row, tmp_path, cache_dir)
    missing = object()
    for key, value in CHANGES[row].items():
        assert changed[key] == value, key
        assert default.get(key, missing) != value, f"{key} is already {value!r} in the default row"
    differing = {k for k in default.keys() | changed.keys() if default.get(k, missing) != changed.get(k, missing)}
    # a key or anything under it (train_views: null replaces its whole node); module.inputs mirrors model.inputs
    allowed = tuple(CHANGES[row]) + tuple(k.replace("model.inputs", "model.module.inputs") for k in CHANGES[row])
    if row == "pairs":  # a model of its own: its batches and epochs, without the multi-similarity term
        allowed += ("model.max_epochs", "model.module.loss.terms.ms", "model.module.model_name")
    assert differing and all(k.startswith(allowed) for k in differing), differing
