"""FAISS index: exactness of flat search, IVF-PQ quality, k capping, save/load, small-database fallback,
factory indexes (OPQ + IVF-PQ + Refine): tuning to a recall target, exactness, config round trip, bad strings."""

from __future__ import annotations

import dataclasses
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
    recall_agreement,
    save_index,
    search,
    search_params,
    set_search_params,
    tune_search_params,
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


# ----------------------------------------------------------------------------------------- factory indexes

# OPQ rotation + IVF-PQ (4 bytes per 32-d vector: very lossy alone) + exact re-ranking of a shortlist. The
# conf/index/opq_ivfpq_refine.yaml string scaled to d=32 (OPQ on 8-d sub-vectors keeps the build ~10 s).
FACTORY = "OPQ4_32,IVF{nlist},PQ4x8,Refine(Flat)"


def _clustered_split(n: int, d: int, n_clusters: int, seed: int, n_queries: int) -> tuple[np.ndarray, ...]:
    """Database and two query sets (tuning, evaluation) drawn from the same clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)) * 3.0
    x = (centers[rng.integers(0, n_clusters, n + 2 * n_queries)] + rng.normal(size=(n + 2 * n_queries, d)))
    x = x.astype(np.float32)
    return x[:n], x[n : n + n_queries], x[n + n_queries :]


@pytest.fixture(scope="module")
def factory_case():
    db, q_tune, q_eval = _clustered_split(20_000, 32, 50, seed=11, n_queries=300)
    # tune=True: nprobe / k_factor picked on 1000 database rows, each left out of its own results
    index = build_index(db, IndexConfig(factory=FACTORY, tune=True, target_recall=0.95, num_threads=1))
    exact = search(build_index(db), q_eval, k=10)
    return db, q_tune, q_eval, index, exact


def test_factory_index_is_opq_ivfpq_refine_and_tuned_to_the_target(factory_case):
    db, q_tune, q_eval, index, (_, exact) = factory_case
    assert isinstance(index, faiss.IndexRefine) and index.ntotal == len(db)
    base = faiss.downcast_index(index.base_index)
    assert isinstance(base, faiss.IndexPreTransform)
    assert isinstance(faiss.downcast_VectorTransform(base.chain.at(0)), faiss.OPQMatrix)
    assert isinstance(faiss.downcast_index(base.index), faiss.IndexIVFPQ)
    params = search_params(index)
    assert params["nlist"] == 512  # "{nlist}" -> auto: min(4 sqrt(20000), 20000 // 39)
    # the config's tuning (tune=True) reached the target on new queries
    assert recall_agreement(search(index, q_eval, k=10)[1], exact) >= 0.95

    # without re-ranking the same base index is far from exact: the Refine stage is what keeps recall
    set_search_params(index, nprobe=params["nprobe"], k_factor=1)
    assert recall_agreement(search(index, q_eval, k=10)[1], exact) < 0.8

    # tuning on held-out queries (exact neighbours computed from the database) picks the cheapest
    # setting that reaches the target and leaves it set on the index
    tuned = tune_search_params(index, db, q_tune, target_recall=0.95, k=10)
    assert tuned.reached and tuned.recall - 1.645 * tuned.recall_se >= 0.95
    assert search_params(index) == {"nlist": 512, "nprobe": tuned.nprobe, "k_factor": tuned.k_factor}
    assert (tuned.nprobe, tuned.k_factor) in [(c[0], c[1]) for c in tuned.candidates]
    assert tuned.ms_per_query == min(c[3] for c in tuned.candidates)
    assert recall_agreement(search(index, q_eval, k=10)[1], exact) >= 0.95
    # the exact ids may be given instead of the database: same choice of recall
    _, exact_tune = search(build_index(db), q_tune, k=10)
    again = tune_search_params(index, exact_tune, q_tune, target_recall=0.95, k=10)
    assert again.reached and again.trials == tuned.trials


def test_factory_index_is_exact_when_the_shortlist_covers_everything(factory_case, tmp_path):
    db, _, q_eval, index, (exact_dist, exact) = factory_case
    set_search_params(index, nprobe=10**6, k_factor=10**6)  # every list, every candidate re-ranked
    assert search_params(index)["nprobe"] == 512
    dist, ids = search(index, q_eval, k=10)
    np.testing.assert_array_equal(ids, exact)
    np.testing.assert_allclose(dist, exact_dist, rtol=1e-4, atol=1e-3)

    # a full ranking (k = n) re-ranks each vector once (shortlist capped at n): every id, exact order
    dist_all, ids_all = search(index, q_eval[:20], k=len(db))
    assert (np.sort(ids_all, axis=1) == np.arange(len(db))).all()
    assert (np.diff(dist_all, axis=1) >= 0).all()
    np.testing.assert_array_equal(ids_all[:, :10], exact[:20])

    # saved and loaded with its search parameters
    set_search_params(index, nprobe=8, k_factor=4)
    loaded = load_index(save_index(index, tmp_path / "db.faiss"))
    assert isinstance(loaded, faiss.IndexRefine) and search_params(loaded) == search_params(index)
    np.testing.assert_array_equal(search(loaded, q_eval, k=10)[1], search(index, q_eval, k=10)[1])
    assert search_params(load_index(tmp_path / "db.faiss", nprobe=2, k_factor=32))["k_factor"] == 32


def test_factory_index_inner_product_refines_exactly():
    db, _, q, = _clustered_split(3000, 16, 10, seed=12, n_queries=40)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = build_index(db, IndexConfig(factory="IVF{nlist},PQ4x6,Refine(Flat)", metric="ip", nprobe=10**6,
                                        k_factor=10**6))
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    sims, ids = search(index, q, k=5)
    ref_sims, ref_ids = search(build_index(db, IndexConfig(metric="ip")), q, k=5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-5)


def test_factory_config_round_trips(tmp_path, cache_dir):
    from siamese_retrieval.configs import check_config
    from siamese_retrieval.retrieval.ranking import RankingSettings
    from tests.conftest import compose_config

    cfg = IndexConfig(factory=FACTORY, nprobe=8, k_factor=32, tune=True, target_recall=0.97)
    assert cfg.kind == "factory"
    assert IndexConfig(**dataclasses.asdict(cfg)) == cfg
    assert dataclasses.replace(cfg, metric="ip").factory == FACTORY  # ranking.index_config sets the metric
    # the shipped config group composes, passes the config check and becomes the same IndexConfig
    composed = compose_config("eval", ["index=opq_ivfpq_refine", "model=cnn_snn"], tmp_path / "run", cache_dir)
    assert check_config(composed, "eval") == []
    index_cfg = RankingSettings.from_config(composed).index
    assert index_cfg.kind == "factory" and index_cfg.factory == "OPQ16_64,IVF{nlist},PQ16x8,Refine(Flat)"
    assert index_cfg.tune and index_cfg.target_recall == 0.95
    assert IndexConfig(**dataclasses.asdict(index_cfg)) == index_cfg


@pytest.mark.parametrize("factory", ["IVF", "OPQ8_32,IVFx,PQ8", "IVF{nlist},PQ5,Refine(Flat)", "Refine(Flat"])
def test_bad_factory_string_is_one_config_error_line(factory):
    with pytest.raises(ConfigError) as info:
        build_index(_random(2000, 32, 13), IndexConfig(factory=factory))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"index.factory={factory!r}")
    assert "d=32" in message


def test_bad_factory_configs():
    with pytest.raises(ConfigError, match="factory"):
        IndexConfig(factory="  ")
    with pytest.raises(ConfigError, match="needs index.factory"):
        IndexConfig(kind="factory")
    with pytest.raises(ConfigError, match="target_recall"):
        IndexConfig(factory=FACTORY, target_recall=1.5)
    with pytest.raises(ConfigError, match="k_factor"):
        IndexConfig(factory=FACTORY, k_factor=0)


def test_factory_tiny_database_falls_back_to_flat(caplog):
    db = _random(100, 32, 14)
    with caplog.at_level(logging.WARNING, logger="siamese_retrieval.retrieval.index"):
        index = build_index(db, IndexConfig(factory=FACTORY, tune=True))
    assert isinstance(index, faiss.IndexFlatL2) and "using a flat (exact) index instead" in caplog.text
    np.testing.assert_array_equal(search(index, db, k=1)[1][:, 0], np.arange(100))
