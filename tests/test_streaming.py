"""Sparse ground truth (data/ground_truth.py) and streaming top-k evaluation (RankingSettings.search_k)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from siamese_retrieval.data.ground_truth import DenseRelevance, SparseRelevance, as_ground_truth, radius_positives
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.distance import Distance
from siamese_retrieval.retrieval.ranking import RankingBuilder, RankingSettings, rank_embeddings, rank_scores

SAME = [f"{m}@{k}" for m in ("recall", "precision") for k in (1, 5, 10)] + ["ndcg@10"]


class Identity:
    """Embeddings are the inputs; relevance = -distance (monotonic)."""

    device = torch.device("cpu")
    distance = Distance("euclidean")

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["x"].float()

    def score_distances(self, distance: torch.Tensor) -> torch.Tensor:
        return -distance


def random_truth(n_q: int, n_db: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fov = np.where(rng.random((n_q, n_db)) < 0.08, rng.random((n_q, n_db)), 0).astype(np.float32)
    sim = fov >= 0.5
    sim[0] = False  # a query without a positive
    return sim, fov


def assert_streaming_equals_full(full: dict[str, float], streamed: dict[str, float]) -> None:
    for name in SAME:
        assert streamed[name] == full[name], name
    assert "mAP" in full and "mAP" not in streamed


# ----------------------------------------------------------------------------------------- ground truth


def test_sparse_and_dense_answer_the_engine_alike() -> None:
    sim, fov = random_truth(30, 200)
    sim[3, 7], fov[3, 7] = True, 0.0  # a positive without overlap is still stored
    dense, sparse = DenseRelevance(sim, fov), SparseRelevance.from_dense(sim, fov, row_chunk=7)
    assert as_ground_truth(sparse) is sparse and isinstance(as_ground_truth(dense), DenseRelevance)
    np.testing.assert_array_equal(sparse.to_dense()[0], sim)
    np.testing.assert_array_equal(sparse.to_dense()[1], fov)
    rng = np.random.default_rng(1)
    qi = rng.integers(0, 30, 12)
    ids = rng.integers(0, 200, (12, 40))
    ids[2, 5] = -1  # FAISS's "no result"
    for a, b in zip(dense.lookup(qi, ids), sparse.lookup(qi, ids)):
        np.testing.assert_array_equal(a, b)
    assert not dense.lookup(qi, ids)[0][2, 5] and dense.lookup(qi, ids)[1][2, 5] == 0
    np.testing.assert_array_equal(dense.n_positives(qi), sim[qi].sum(1))
    np.testing.assert_array_equal(sparse.n_positives(qi), sim[qi].sum(1))
    for k in (1, 10, 250):  # 250 > n_db: zero padded
        np.testing.assert_array_equal(dense.ideal_fov(qi, k), sparse.ideal_fov(qi, k))
    np.testing.assert_array_equal(dense.ideal_fov(qi, 10), -np.sort(-fov[qi], axis=1)[:, :10])


def test_positives_from_lists_and_from_coordinates() -> None:
    gt = SparseRelevance.from_positives([[5, 1, 1], [], [0]], n_db=6)
    np.testing.assert_array_equal(gt.indptr, [0, 2, 2, 3])
    np.testing.assert_array_equal(gt.indices, [1, 5, 0])
    np.testing.assert_array_equal(gt.n_positives(np.array([0, 1, 2])), [2, 0, 1])
    np.testing.assert_array_equal(gt.ideal_fov(np.array([0, 1]), 3), [[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="database ids"):
        SparseRelevance.from_positives([[6]], n_db=6)
    rng = np.random.default_rng(2)
    db_xy, q_xy = rng.uniform(0, 500, (400, 2)), rng.uniform(0, 500, (50, 2))
    sparse = SparseRelevance.from_coordinates(db_xy, q_xy, 25.0)
    np.testing.assert_array_equal(sparse.to_dense()[0], radius_positives(q_xy, db_xy, 25.0))
    exact = ((q_xy[:, None] - db_xy[None]) ** 2).sum(-1) <= 25.0**2
    np.testing.assert_array_equal(sparse.to_dense()[0], exact)


# ----------------------------------------------------------------------------------------- streaming == full


@pytest.mark.parametrize("sparse", [False, True])
def test_streaming_equals_full_on_random_data(sparse: bool) -> None:
    n_q, n_db = 40, 300
    g = torch.Generator().manual_seed(0)
    db, q = torch.randn(n_db, 8, generator=g), torch.randn(n_q, 8, generator=g)
    sim, fov = random_truth(n_q, n_db)
    truth = SparseRelevance.from_dense(sim, fov) if sparse else DenseRelevance(sim, fov)
    query_idx = np.arange(n_q)
    full = rank_embeddings(Identity(), db, q, query_idx, truth, RankingSettings(query_chunk=16))
    top = rank_embeddings(Identity(), db, q, query_idx, truth, RankingSettings(query_chunk=16, search_k=20))
    assert_streaming_equals_full(full.metrics, top.metrics)
    assert 0 < top.metrics["mAP@20"] and top.metrics["n_queries_without_positive"] == 1
    np.testing.assert_array_equal(full.top_ids, top.top_ids)
    # the first positive: equal where it lies in the top 20, else 21 (a lower bound); 0 without positives
    beyond = full.first_positive_rank > 20
    np.testing.assert_array_equal(top.first_positive_rank[~beyond], full.first_positive_rank[~beyond])
    assert (top.first_positive_rank[beyond] == 21).all() and top.first_positive_rank[0] == 0
    # k = n_db: the streaming mAP@k is the full mAP, exactly
    everything = rank_embeddings(Identity(), db, q, query_idx, truth, RankingSettings(query_chunk=16, search_k=n_db))
    assert everything.metrics[f"mAP@{n_db}"] == full.metrics["mAP"]


def test_map_at_k_convention() -> None:
    """AP@k: precision at each hit within the top k, summed, over min(k, n_positives)."""
    sim = np.zeros((2, 50), bool)
    sim[0, [3, 9, 40]] = True  # 3 positives; ranked at 1, 3 (and 41, beyond k=10)
    sim[1, [7]] = True
    scores = np.zeros((2, 50), np.float32)
    scores[0, [3, 0, 9]] = [3, 2, 1]
    scores[1, 7] = 5
    settings = RankingSettings(top_ks=(1,), ndcg_k=1, search_k=10)
    m = rank_scores(scores, np.arange(2), DenseRelevance(sim, sim), settings).metrics
    assert m["mAP@10"] == pytest.approx(((1 + 2 / 3) / 3 + 1.0) / 2)
    assert m["recall@1"] == 1.0


def test_streaming_equals_full_on_the_tiny_city(cache_dir) -> None:
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.data.synth import SynthConfig, ensure_city
    from siamese_retrieval.data.images import thumbnail

    ds = read_dataset(ensure_city(cache_dir, SynthConfig.from_preset("tiny"), workers=1), check="none")
    db = torch.from_numpy(np.stack([thumbnail(ds.db_file(i)) for i in range(ds.n_db)]))
    q = torch.from_numpy(np.stack([thumbnail(ds.query_file(i)) for i in range(ds.n_query)]))
    query_idx = np.arange(ds.n_query)
    full = rank_embeddings(Identity(), db, q, query_idx, ds, RankingSettings())
    top = rank_embeddings(Identity(), db, q, query_idx, SparseRelevance.from_dense(ds.sim, ds.fov),
                          RankingSettings(search_k=25))
    assert_streaming_equals_full(full.metrics, top.metrics)
    everything = rank_embeddings(Identity(), db, q, query_idx, ds, RankingSettings(search_k=ds.n_db))
    assert everything.metrics[f"mAP@{ds.n_db}"] == full.metrics["mAP"]


# ----------------------------------------------------------------------------------------- memory


def test_streaming_never_builds_a_query_by_database_block() -> None:
    """1M database items, 64 queries a chunk: a (64, 1M) bool block alone is 64 MB; numpy's peak stays far
    below it (tracemalloc sees numpy's buffers), and torch only ever sees (64, k) tensors."""
    n_db, n_q, k = 1_000_000, 128, 100
    g = torch.Generator().manual_seed(0)
    db = torch.randn(n_db, 2, generator=g)
    q = torch.randn(n_q, 2, generator=g)
    rng = np.random.default_rng(0)
    truth = SparseRelevance.from_positives([rng.choice(n_db, 8, replace=False) for _ in range(n_q)], n_db)
    settings = RankingSettings(search_k=k, query_chunk=64)

    seen: list[tuple[int, ...]] = []
    original = RankingBuilder.add_ranked

    def spy(self, qi, ids, scores):  # what reaches the metrics: (b, k) only
        seen.append(ids.shape)
        return original(self, qi, ids, scores)

    RankingBuilder.add_ranked = spy
    tracemalloc.start()
    try:
        ranking = rank_embeddings(Identity(), db, q, np.arange(n_q), truth, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        RankingBuilder.add_ranked = original
    assert seen == [(64, k), (64, k)]
    assert peak < 8 * 2**20, f"numpy peak {peak / 2**20:.1f} MiB"
    assert ranking.metrics["n_queries"] == n_q and "mAP@100" in ranking.metrics


def test_search_k_must_cover_the_cut_offs() -> None:
    with pytest.raises(ConfigError, match=r"^search_k=5: must be >= 10, the largest of its top_ks and ndcg_k"):
        RankingSettings(search_k=5)
    with pytest.raises(ConfigError, match="search_k=0: must be an integer >= 1 or null"):
        RankingSettings.from_config({"search_k": 0})
    assert RankingSettings.from_config({"search_k": None}).search_k is None
    assert RankingSettings.from_config({"search_k": 100}).search_k == 100
