"""Sparse ground truth end to end: the sparse gt.h5 layout, and pair sampling, splits, batches, metrics, the
per-query CSV and the grids read from it give exactly what the dense contract arrays give."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from siamese_retrieval.data import dataset as dataset_module
from siamese_retrieval.data.dataset import RetrievalDataset, fits_dense, read_dataset, write_gt
from siamese_retrieval.data.ground_truth import SparseRelevance
from siamese_retrieval.data.pairs import PairRecipe, PairSampler, eval_pairs
from siamese_retrieval.data.splits import split_by_place
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.data.synth.generate import generate_city
from siamese_retrieval.errors import DatasetError
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def cities(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[RetrievalDataset, RetrievalDataset]:
    """The tiny city as generated (dense gt.h5), and a copy whose gt.h5 holds the same truth in the sparse layout."""
    dense_root = ensure_city(cache_dir, SynthConfig.from_preset("tiny"), workers=1)
    sparse_root = tmp_path_factory.mktemp("sparse") / "city"
    shutil.copytree(dense_root, sparse_root)
    dense = read_dataset(dense_root, check="none")
    write_gt(sparse_root / "gt.h5", None, None, SparseRelevance.from_dense(dense.sim, dense.fov))
    return dense, read_dataset(sparse_root, check="none")


def test_the_sparse_layout_reads_back_the_same_truth(cities) -> None:
    dense, sparse = cities
    assert not dense.is_sparse and sparse.is_sparse and sparse.sim is None and sparse.fov is None
    with h5py.File(sparse.root / "gt.h5") as f:
        assert set(f) == {"indptr", "indices", "sim_values", "fov_values"}
        assert int(f.attrs["n_database"]) == dense.n_db
        assert len(f["indices"]) == int(((dense.fov > 0) | dense.sim).sum()) < dense.sim.size // 4  # one street of 4 overlaps
    sim, fov = sparse.relevance.to_dense()
    np.testing.assert_array_equal(sim, dense.sim)
    np.testing.assert_array_equal(fov, dense.fov)


def test_splits_and_pairs_from_sparse_equal_dense(cities) -> None:
    dense, sparse = cities
    # 40 m places cut each 60 m street in two, so training images can see an evaluation query's facades
    a, b = (split_by_place(ds, (0.6, 0.2, 0.2), cell_size_m=40.0, seed=0) for ds in (dense, sparse))
    for name in ("train_q", "val_q", "test_q", "train_db"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert len(a.train_db) < (a.split_of_db == 0).sum()  # the overlap exclusion did remove images
    for recipe in (PairRecipe.default(), PairRecipe.study(), PairRecipe.default(target="fov")):
        for epoch in (0, 1):
            got = PairSampler(sparse, a.train_q, a.train_db, recipe, seed=3).sample(epoch)
            want = PairSampler(dense, a.train_q, a.train_db, recipe, seed=3).sample(epoch)
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)
    for x, y in zip(eval_pairs(sparse, a.test_q, seed=1), eval_pairs(dense, a.test_q, seed=1)):
        np.testing.assert_array_equal(x, y)


def test_training_batches_from_sparse_equal_dense(cities) -> None:
    from siamese_retrieval.data.datamodule import RetrievalDataModule
    from siamese_retrieval.data.inputs import NoInputs

    batches = []
    for ds in cities:
        dm = RetrievalDataModule(NoInputs(), root=str(ds.root), image_check="none", batch_size=16,
                                 split={"fractions": [0.6, 0.2, 0.2], "seed": 0}, pairs={"target": "fov"})
        dm.setup()
        batches.append(list(dm.train_dataloader()) + list(dm.test_dataloader()))
    dense, sparse = batches
    assert len(dense) == len(sparse) > 2
    for x, y in zip(dense, sparse):
        for key in ("q_idx", "d_idx", "target", "fov", "cross_fov"):
            np.testing.assert_array_equal(x[key].numpy(), y[key].numpy(), err_msg=key)
    assert any(float(b["cross_fov"].sum()) > float(b["fov"].sum()) for b in dense)  # off-diagonal overlaps exist


def test_evaluate_on_sparse_truth_writes_the_same_outputs(cities, tiny_checkpoint: Path, tmp_path: Path,
                                                          cache_dir: Path) -> None:
    from siamese_retrieval.evaluate import evaluate

    results = {}
    for kind, ds in zip(("dense", "sparse"), cities):
        out = tmp_path / kind
        cfg = compose_config("eval", ["data=synth_tiny", f"data.root={ds.root}", "split=all",
                                      f"ckpt_path={tiny_checkpoint}"], out, cache_dir)
        results[kind] = (evaluate(cfg)["metrics"], out)
    (dense, dense_out), (sparse, sparse_out) = results["dense"], results["sparse"]
    assert sparse == dense and "all/mAP" in dense
    with open(dense_out / "per_query.csv") as f, open(sparse_out / "per_query.csv") as g:
        assert list(csv.reader(f)) == list(csv.reader(g))
    for png in ("retrieval_grid.png", "recall_at_k.png"):
        np.testing.assert_array_equal(cv2.imread(str(dense_out / png)), cv2.imread(str(sparse_out / png)), png)
    saved = json.loads((sparse_out / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(sparse)


def test_the_generator_writes_sparse_truth_when_dense_would_not_fit(cities, tmp_path: Path, monkeypatch) -> None:
    dense, _ = cities
    monkeypatch.setattr(dataset_module, "DENSE_MAX_CELLS", 0)
    root = generate_city(tmp_path / "city", SynthConfig.from_preset("tiny"), workers=1)
    written = read_dataset(root, check="none")
    assert written.is_sparse
    sim, fov = written.relevance.to_dense()
    np.testing.assert_array_equal(sim, dense.sim)
    np.testing.assert_array_equal(fov, dense.fov)


def test_the_large_preset_is_real_size_and_sparse() -> None:
    cfg = SynthConfig.from_preset("large")
    assert cfg.n_database + cfg.n_query >= 100_000
    assert not fits_dense(cfg.n_query, cfg.n_database)  # 29.6k x 71k dense would be 8.4 GB of fov alone
    assert fits_dense(SynthConfig().n_query, SynthConfig().n_database)  # the default city keeps the dense contract


# ----------------------------------------------------------------------------------------- bad sparse files


def _bad(f: h5py.File, key: str, value) -> None:
    del f[key]
    f.create_dataset(key, data=value)


BAD_SPARSE = {
    "unsorted ids": (lambda f, n: _bad(f, "indices", f["indices"][()][::-1]), "sorted and unique"),
    "indptr too short": (lambda f, n: _bad(f, "indptr", f["indptr"][()][:-1]), "indptr has"),
    "indptr not ending at nnz": (lambda f, n: _bad(f, "indptr", f["indptr"][()] * 2), "indptr must rise from 0"),
    "fov above 1": (lambda f, n: _bad(f, "fov_values", f["fov_values"][()] + 1.5), "fov must lie in [0, 1]"),
    "sim not binary": (lambda f, n: _bad(f, "sim_values", f["sim_values"][()] * 2), "sim_values must be binary"),
    "id out of range": (lambda f, n: _bad(f, "indices", f["indices"][()] + n), "database ids must lie in"),
    "fov_values missing": (lambda f, n: f.__delitem__("fov_values"), "missing dataset(s) fov_values"),
    "wrong n_database": (lambda f, n: f.attrs.__setitem__("n_database", n + 1), "n_database attribute is"),
    "float ids": (lambda f, n: _bad(f, "indices", f["indices"][()].astype(float)), "must be integers"),
    "2-D indices": (lambda f, n: _bad(f, "indices", f["indices"][()].reshape(1, -1)), "must be 1-D"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPARSE))
def test_a_broken_sparse_file_is_one_clear_error(cities, tmp_path: Path, case: str) -> None:
    _, sparse = cities
    root = tmp_path / "city"
    root.mkdir()
    for name in ("database", "query"):
        (root / name).mkdir()
        shutil.copy(sparse.root / name / f"{name}.json", root / name / f"{name}.json")
    shutil.copy(sparse.root / "gt.h5", root / "gt.h5")
    breaks, message = BAD_SPARSE[case]
    with h5py.File(root / "gt.h5", "a") as f:
        breaks(f, sparse.n_db)
    with pytest.raises(DatasetError) as err:
        read_dataset(root, check="none")
    text = str(err.value)
    assert str(root / "gt.h5") in text and message in text and "\n" not in text
