"""The retrieval engine (retrieval/ranking.py) and the distance object on known answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from siamese_retrieval.models.distance import Distance
from siamese_retrieval.models.losses import GradedContrastiveLoss, PairOutput
from siamese_retrieval.models.mining import BatchHardContrastive
from siamese_retrieval.retrieval.metrics import per_query_retrieval_scores
from siamese_retrieval.retrieval.ranking import (
    InlierReranker,
    RankingSettings,
    canonical_order,
    rank_embeddings,
    rank_scores,
)


class ToyModel:
    """Embeddings are the inputs; relevance = sigmoid(w * distance + b) as in SiameseModule."""

    def __init__(self, kind: str = "euclidean", w: float = -4.0, b: float = 2.0) -> None:
        self.device = torch.device("cpu")
        self.distance = Distance(kind)
        self.w, self.b = w, b

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["x"].float()

    def score_distances(self, distance: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.w * distance + self.b)


def truth(sim: np.ndarray, fov: np.ndarray | None = None) -> SimpleNamespace:
    sim = np.asarray(sim, bool)
    return SimpleNamespace(sim=sim, fov=np.asarray(fov if fov is not None else sim, np.float32))


# database on a line: item j sits at x = j; queries at 0.2 and 3.9
DB = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
Q = torch.tensor([[0.2], [3.9]])
SIM = [[0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]


def test_rank_embeddings_known_ranking_and_metrics() -> None:
    ranking = rank_embeddings(ToyModel(), DB, Q, np.array([0, 1]), truth(SIM), RankingSettings(top_ks=(1, 2), keep_top=5))
    np.testing.assert_array_equal(ranking.top_ids, [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    np.testing.assert_array_equal(ranking.first_positive_rank, [2, 1])
    expected = torch.sigmoid(-4.0 * torch.tensor([0.2, 0.8, 1.8, 2.8, 3.8]) + 2.0).numpy()
    np.testing.assert_allclose(ranking.top_scores[0], expected, rtol=1e-5)
    m = ranking.metrics
    assert m["recall@1"] == pytest.approx(0.5) and m["recall@2"] == pytest.approx(1.0)
    assert m["precision@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["mAP"] == pytest.approx((0.5 + 1.0) / 2)  # AP: 1/2 for query 0, (1 + 2/2)/2 for query 1


def test_cosine_model_ranks_by_angle_not_length() -> None:
    db = torch.tensor([[10.0, 0.0], [1.0, 1.0], [0.0, 0.1]])
    q = torch.tensor([[0.1, 0.12]])
    ranking = rank_embeddings(ToyModel("cosine"), db, q, np.array([0]), truth([[0, 1, 0]]), RankingSettings(keep_top=3))
    np.testing.assert_array_equal(ranking.top_ids, [[1, 2, 0]])  # Euclidean would put [2, 1, 0]
    cos = 1.0 - torch.nn.functional.cosine_similarity(q, db)
    np.testing.assert_allclose(ranking.top_scores[0], torch.sigmoid(-4.0 * cos[[1, 2, 0]] + 2.0).numpy(), rtol=1e-5)


def test_ties_go_to_the_lower_database_index_and_a_rising_head_is_resorted() -> None:
    ids = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [2, 0, 1, 3]])
    scores = np.array([[0.9, 0.9, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [0.8, 0.7, 0.6, 0.5]], np.float32)
    fixed_ids, fixed_scores = canonical_order(ids, scores)
    np.testing.assert_array_equal(fixed_ids, [[1, 3, 0, 2], [3, 2, 1, 0], [2, 0, 1, 3]])
    np.testing.assert_array_equal(fixed_scores[1], np.float32([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_array_equal(ids[0], [3, 1, 2, 0])


def test_a_head_that_rises_with_distance_ranks_far_first() -> None:
    """Retrieval ranks by the model's relevance: with w > 0, far items are the relevant ones."""
    ranking = rank_embeddings(ToyModel(w=3.0, b=-1.0), DB, Q, np.array([0, 1]), truth(SIM), RankingSettings(keep_top=5))
    np.testing.assert_array_equal(ranking.top_ids, [[4, 3, 2, 1, 0], [0, 1, 2, 3, 4]])


def test_ranked_metrics_equal_dense_metrics() -> None:
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 5, (7, 40)).astype(np.float32))  # many ties
    fov = torch.from_numpy(rng.random((7, 40)).astype(np.float32))
    sim = fov > 0.6
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    dense = per_query_retrieval_scores(scores, sim, fov, top_ks=(1, 3, 10), ndcg_k=5)
    ranked = per_query_retrieval_scores(None, sim, fov, top_ks=(1, 3, 10), ndcg_k=5, order=order)
    for name, value in dense.items():
        assert torch.equal(value, ranked[name]), name
    # and the engine's dense path gives the same metrics as its ranked path
    settings = RankingSettings(top_ks=(1, 3, 10), ndcg_k=5, query_chunk=3)
    gt = truth(sim.numpy(), fov.numpy())
    a = rank_scores(scores.numpy(), np.arange(7), gt, settings).metrics
    for name in ("precision@3", "recall@10", "mAP", "ndcg@5"):
        assert a[name] == pytest.approx(float(dense[name if name != "mAP" else "AP"][dense["has_positive"]].mean()))


def test_inlier_reranker_reorders_only_the_top_n() -> None:
    ids = np.array([[5, 3, 7, 1, 0]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    inliers = {5: 0, 3: 12, 7: 12, 1: 50}
    rerank = InlierReranker(3, lambda rows, cand: np.array([[inliers[int(j)] for j in cand[0]]]))
    new_ids, new_scores = rerank(np.array([0]), ids, scores)
    # 3 and 7 tie on inliers: model relevance breaks the tie; item 1 (50 inliers) is outside the top 3
    np.testing.assert_array_equal(new_ids, [[3, 7, 5, 1, 0]])
    np.testing.assert_allclose(new_scores[0], [1 + 12 + 0.4, 1 + 12 + 0.35, 1 + 0 + 0.45, 0.6, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(ids, [[5, 3, 7, 1, 0]])  # the input ranking is not modified


def test_rerank_in_the_engine_keeps_the_before_metrics() -> None:
    settings = RankingSettings(top_ks=(1,), keep_top=5)
    plain = rank_embeddings(ToyModel(), DB, Q, np.array([0, 1]), truth(SIM), settings)
    # the verifier prefers database item 1 for query 0: recall@1 goes from 0.5 to 1
    rerank = InlierReranker(2, lambda rows, cand: (cand == 1).astype(int) * 30)
    fused = rank_embeddings(ToyModel(), DB, Q, np.array([0, 1]), truth(SIM), settings, rerank)
    assert fused.before_rerank == plain.metrics
    assert plain.metrics["recall@1"] == 0.5 and fused.metrics["recall@1"] == 1.0
    np.testing.assert_array_equal(fused.top_ids[0], [1, 0, 2, 3, 4])


def test_miner_measures_cross_pairs_with_the_modules_distance() -> None:
    emb_q = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    emb_d = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    cos = Distance("cosine")
    d = cos.pair(emb_q, emb_d)  # [0, 0]: same directions
    out = PairOutput(emb_q, emb_d, d, -d, torch.sigmoid(-d), torch.ones(2), torch.ones(2),
                     cross_fov=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), distance_fn=cos)
    base = GradedContrastiveLoss(margin=1.2)
    mined = BatchHardContrastive(base, k=1)
    # cross pairs are orthogonal: cosine distance 1, push 0.5 * (1.2 - 1)^2 = 0.02 per row
    assert mined(out).item() == pytest.approx(base(out).item() + 0.02, abs=1e-6)
    euclid = PairOutput(*(getattr(out, f) for f in ("emb_q", "emb_d", "distance", "logits", "score", "target", "fov")),
                        cross_fov=out.cross_fov)
    assert mined(euclid).item() == pytest.approx(base(out).item(), abs=1e-6)  # Euclidean cross pairs lie beyond 1.2


def test_distance_round_trips_through_faiss_metrics() -> None:
    from siamese_retrieval.retrieval.index import IndexConfig, build_index, search

    rng = torch.Generator().manual_seed(0)
    db, q = torch.randn(50, 8, generator=rng), torch.randn(4, 8, generator=rng)
    for kind in ("euclidean", "cosine"):
        dist = Distance(kind)
        index = build_index(dist.for_index(db).numpy(), IndexConfig(metric=dist.faiss_metric))
        faiss_d, ids = search(index, dist.for_index(q).numpy(), k=50)
        expected = dist.cross(q, db).gather(1, torch.from_numpy(ids))
        np.testing.assert_allclose(dist.from_faiss(faiss_d).numpy(), expected.numpy(), atol=1e-4)
        assert (np.diff(dist.from_faiss(faiss_d).numpy(), axis=1) >= -1e-5).all()  # nearest first


def test_settings_reject_bad_values() -> None:
    from siamese_retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^top_ks=\[0\]: every entry must be an integer >= 1$"):
        RankingSettings(top_ks=(0,))
    with pytest.raises(ConfigError, match="^query_chunk=0: must be an integer >= 1$"):
        RankingSettings.from_config({"query_chunk": 0})
    s = RankingSettings.from_config({"top_ks": [1, 5], "index": {"kind": "ivf"}, "unrelated": 3})
    assert s.top_ks == (1, 5) and s.index.kind == "ivf"
