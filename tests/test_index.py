"""FAISS index: exactness of flat search, IVF-PQ quality, k capping, save/load, small-database fallback."""

from __future__ import annotations

import logging
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch

from siamese_retrieval.models.distance import Distance

from siamese_retrieval.errors import ConfigError
from siamese_retrieval.retrieval.index import (
    IndexConfig,
    build_index,
    load_index,
    save_index,
    search,
)


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _clustered(n: int, d: int, n_clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)) * 3.0
    return (centers[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_flat_l2_equals_brute_force_torch():
    db, q = _random(800, 32, 0), _random(50, 32, 1)
    index = build_index(db)  # torch input is accepted
    dist, ids = search(index, q, k=10, batch_size=16)  # several batches
    ref = torch.cdist(q, db).topk(10, largest=False)
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (50, 10)
    np.testing.assert_array_equal(ids, ref.indices.numpy())
    # FAISS L2 distances are squared
    np.testing.assert_allclose(Distance("euclidean").from_faiss(dist).numpy(), ref.values.numpy(), rtol=1e-4, atol=1e-4)


def test_flat_ip_equals_brute_force_torch():
    db = torch.nn.functional.normalize(_random(500, 16, 2), dim=1)
    q = torch.nn.functional.normalize(_random(20, 16, 3), dim=1)
    index = build_index(db.numpy(), IndexConfig(metric="ip"))
    sims, ids = search(index, q, k=5)
    ref = (q @ db.T).topk(5)
    np.testing.assert_array_equal(ids, ref.indices.numpy())
    np.testing.assert_allclose(sims, ref.values.numpy(), rtol=1e-5, atol=1e-5)
    # the cosine distance recovered from the similarities equals the one training measures
    cos = Distance("cosine")
    np.testing.assert_allclose(cos.from_faiss(sims).numpy(), cos.cross(q, db).gather(1, ref.indices).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_ivfpq_recall_at_10_against_flat():
    # 5000 x 64 vectors around 50 cluster centres. With nprobe >= nlist every list is visited, so the only
    # error left is product quantisation: 16 sub-quantizers x 8 bits = 16 bytes per 64-d vector (16x
    # smaller than float32), which, measured on this data, recovers ~0.75 of the exact top 10 (0.55 with
    # pq_m=8). The floor 0.6 leaves margin for other BLAS/FAISS builds while still catching a broken
    # index (a wrong metric, untrained codes or a bad id mapping give ~0).
    floor = 0.6
    db, q = _clustered(5000, 64, 50, seed=0), _clustered(200, 64, 50, seed=1)
    _, exact = search(build_index(db), q, k=10)
    index = build_index(db, IndexConfig(kind="ivfpq", pq_m=16, nprobe=10_000))
    assert isinstance(index, faiss.IndexIVFPQ) and index.nprobe == index.nlist
    _, approx = search(index, q, k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall >= floor, f"IVF-PQ recall@10 vs flat {recall:.3f} < {floor}"

    # IVF over exact vectors visiting every list is exact
    ivf = build_index(db, IndexConfig(kind="ivf", nprobe=10_000))
    assert isinstance(ivf, faiss.IndexIVFFlat)
    np.testing.assert_array_equal(search(ivf, q, k=10)[1], exact)


def test_k_larger_than_database_is_capped_with_warning():
    index = build_index(_random(7, 8, 4))
    with pytest.warns(UserWarning, match=r"k=20.*only 7"):
        dist, ids = search(index, _random(3, 8, 5), k=20)
    assert dist.shape == ids.shape == (3, 7)
    assert sorted(ids[0].tolist()) == list(range(7))


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_roundtrip(tmp_path, kind):
    db, q = _clustered(3000, 32, 20, seed=2), _clustered(40, 32, 20, seed=3)
    index = build_index(db, IndexConfig(kind=kind, pq_m=8, nprobe=4))
    before = search(index, q, k=10)
    path = save_index(index, tmp_path / "sub" / "db.faiss")
    assert [p.name for p in path.parent.iterdir()] == ["db.faiss"]  # no temporary left behind
    loaded = load_index(path)
    assert type(loaded) is type(index) and loaded.ntotal == 3000
    if kind == "ivfpq":
        assert loaded.nprobe == 4
    after = search(loaded, q, k=10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_tiny_database_falls_back_to_flat(caplog):
    db = _random(10, 16, 6)
    with caplog.at_level(logging.WARNING, logger="siamese_retrieval.retrieval.index"):
        ivf = build_index(db, IndexConfig(kind="ivf", nlist=64))
        pq = build_index(db, IndexConfig(kind="ivfpq", pq_m=4))
    assert isinstance(ivf, faiss.IndexFlatL2) and isinstance(pq, faiss.IndexFlatL2)
    assert "fewer than nlist=64" in caplog.text and "PQ centroids" in caplog.text
    ids = search(ivf, db, k=1)[1]
    np.testing.assert_array_equal(ids[:, 0], np.arange(10))


def test_bad_configs():
    with pytest.raises(ConfigError, match="pq_m=5"):
        build_index(_random(300, 16, 7), IndexConfig(kind="ivfpq", pq_m=5))
    with pytest.raises(ConfigError, match="kind"):
        IndexConfig(kind="hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension"):
        search(build_index(_random(20, 8, 8)), _random(2, 9, 9), k=1)


def test_use_gpu_without_gpu_still_works():
    db = _random(50, 8, 10)
    index = build_index(db, IndexConfig(use_gpu=True))
    assert search(index, db[:3], k=1)[1][:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("first", ["faiss", "torch"])
def test_faiss_and_torch_import_together(first):
    # duplicate OpenMP runtimes crash some faiss+torch installs; check both import orders run both libraries
    second = "torch" if first == "faiss" else "faiss"
    code = (
        f"import {first}, {second}\n"
        "import numpy as np\n"
        "from siamese_retrieval.retrieval.index import build_index, search\n"
        "x = torch.randn(2000, 32)\n"
        "y = (x @ x.T).sum()\n"
        "ids = search(build_index(x), x[:100], k=5)[1]\n"
        "assert (ids[:, 0] == np.arange(100)).all()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
