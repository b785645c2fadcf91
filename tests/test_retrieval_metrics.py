"""Retrieval metrics against a hand-computed example and against torchmetrics' functional ops."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_average_precision,
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_precision,
)

from siamese_retrieval.models.pair_metrics import RangeAccuracy, range_accuracy
from siamese_retrieval.retrieval.metrics import (
    RetrievalScores,
    per_query_retrieval_scores,
    prefixed,
)

L3 = math.log2(3)  # discount of rank 2 is 1/log2(2+1) = 1/1.5849625; rank 1: 1/log2(2) = 1; rank 3: 1/log2(4) = 1/2

# 3 queries x 6 database items.
SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # q0: ranking = items 0,1,2,3,4,5
        [0.1, 0.7, 0.7, 0.3, 0.9, 0.2],  # q1: ranking = 4, 1, 2 (tie with 1: lower index first), 3, 5, 0
        [0.3, 0.2, 0.1, 0.6, 0.5, 0.4],  # q2: no positive at all
    ]
)
SIM = torch.tensor(
    [
        [0, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)
FOV = torch.tensor(
    [
        [0.2, 0.9, 0.0, 0.6, 0.3, 0.0],
        [0.5, 0.4, 1.0, 0.1, 0.8, 0.0],
        [0.3, 0.0, 0.1, 0.0, 0.0, 0.2],
    ]
)

# q0: relevance in ranked order [0, 1, 0, 1, 0, 0]  (2 positives, at ranks 2 and 4)
#   precision@1 = 0/1 = 0            precision@5 = 2/5 = 0.4
#   recall@1    = 0                  recall@5    = 1
#   AP = (1/2 + 2/4) / 2 = 0.5
#   fov in ranked order [0.2, 0.9, 0.0, ...]:  DCG@3 = 0.2/1 + 0.9/1.5849625 + 0.0/2 = 0.2 + 0.5678377 = 0.7678377
#   ideal: 3 largest fov of the row [0.9, 0.6, 0.3]: IDCG@3 = 0.9 + 0.6/1.5849625 + 0.3/2 = 0.9 + 0.3785585 + 0.15 = 1.4285585
#   nDCG@3 = 0.7678377 / 1.4285585 = 0.5374911
Q0_NDCG = (0.2 + 0.9 / L3) / (0.9 + 0.6 / L3 + 0.3 / 2)
# q1: ranking 4, 1, 2, 3, 5, 0 -> relevance [1, 0, 1, 0, 0, 1]  (3 positives, at ranks 1, 3 and 6)
#   precision@1 = 1/1 = 1            precision@5 = 2/5 = 0.4
#   recall@1    = 1                  recall@5    = 1
#   AP = (1/1 + 2/3 + 3/6) / 3 = (1 + 0.6666667 + 0.5) / 3 = 0.7222222
#   fov in ranked order [0.8, 0.4, 1.0, 0.1, 0.0, 0.5]: DCG@3 = 0.8 + 0.4/1.5849625 + 1.0/2 = 0.8 + 0.2523719 + 0.5 = 1.5523719
#   ideal [1.0, 0.8, 0.5]: IDCG@3 = 1.0 + 0.8/1.5849625 + 0.5/2 = 1.0 + 0.5047438 + 0.25 = 1.7547438
#   nDCG@3 = 1.5523719 / 1.7547438 = 0.8846721
#   (were the tie broken the other way, the ranking would start 4, 2, 1 and AP = (1 + 2/2 + 3/6)/3 = 0.8333)
Q1_NDCG = (0.8 + 0.4 / L3 + 1.0 / 2) / (1.0 + 0.8 / L3 + 0.5 / 2)
# q2: no positive -> counted in n_queries_without_positive, left out of every average.
# Means over q0 and q1:
EXPECTED = {
    "precision@1": (0.0 + 1.0) / 2,  # 0.5
    "precision@5": (0.4 + 0.4) / 2,  # 0.4
    "recall@1": (0.0 + 1.0) / 2,  # 0.5
    "recall@5": (1.0 + 1.0) / 2,  # 1.0
    "mAP": (0.5 + (1 + 2 / 3 + 3 / 6) / 3) / 2,  # (0.5 + 0.7222222) / 2 = 0.6111111
    "ndcg@3": (Q0_NDCG + Q1_NDCG) / 2,  # (0.5374911 + 0.8846721) / 2 = 0.7110816
    "n_queries": 3.0,
    "n_queries_without_positive": 1.0,
}


def test_hand_computed_example():
    assert Q0_NDCG == pytest.approx(0.5374911, abs=1e-6) and Q1_NDCG == pytest.approx(0.8846721, abs=1e-6)
    metric = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    metric.update(SCORES, SIM, FOV)
    result = metric.compute()
    assert set(result) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert result[name].item() == pytest.approx(value, abs=1e-6), name


def test_per_query_values_and_no_positive_mask():
    per_q = per_query_retrieval_scores(SCORES, SIM, FOV, top_ks=(1, 5), ndcg_k=3)
    assert per_q["has_positive"].tolist() == [True, True, False]
    assert per_q["AP"][:2].tolist() == pytest.approx([0.5, 0.7222222], abs=1e-6)
    assert per_q["ndcg@3"][:2].tolist() == pytest.approx([Q0_NDCG, Q1_NDCG], abs=1e-6)


def test_two_chunks_equal_one_and_merge_states():
    one = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    one.update(SCORES, SIM, FOV)
    chunked = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    chunked.update(SCORES[:1], SIM[:1], FOV[:1])
    chunked.update(SCORES[1:], SIM[1:], FOV[1:])
    # what DDP does: each rank holds some queries, the sum states are added
    rank0, rank1 = RetrievalScores(top_ks=(1, 5), ndcg_k=3), RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    rank0.update(SCORES[[2, 0]], SIM[[2, 0]], FOV[[2, 0]])
    rank1.update(SCORES[1:2], SIM[1:2], FOV[1:2])
    rank0.merge_state(rank1)
    expected = one.compute()
    for other in (chunked.compute(), rank0.compute()):
        for name, value in expected.items():
            assert other[name].item() == pytest.approx(value.item(), abs=1e-7), name


def test_only_queries_without_positive_give_nan_means():
    metric = RetrievalScores()
    metric.update(SCORES[2:], SIM[2:], FOV[2:])
    result = metric.compute()
    assert math.isnan(result["precision@1"].item()) and math.isnan(result["mAP"].item())
    assert result["n_queries"].item() == 1 and result["n_queries_without_positive"].item() == 1


def test_negative_scores_rank_like_positive_ones():
    # negated distances are all <= 0; torchmetrics' functional precision/AP would count nothing relevant
    a = per_query_retrieval_scores(SCORES, SIM, FOV, ndcg_k=3)
    b = per_query_retrieval_scores(SCORES - 10.0, SIM, FOV, ndcg_k=3)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_equals_torchmetrics_functional_on_random_data():
    g = torch.Generator().manual_seed(0)
    n_q, n_db, top_ks, ndcg_k = 60, 200, (1, 5, 10), 10
    scores = torch.rand(n_q, n_db, generator=g) + 0.01  # positive: torchmetrics ignores items with score <= 0
    fov = torch.rand(n_q, n_db, generator=g) * (torch.rand(n_q, n_db, generator=g) < 0.1)
    sim = fov >= 0.5
    sim[:3] = False  # a few queries without positive
    metric = RetrievalScores(top_ks=top_ks, ndcg_k=ndcg_k)
    for start in range(0, n_q, 25):  # uneven chunks
        metric.update(scores[start : start + 25], sim[start : start + 25], fov[start : start + 25])
    result = metric.compute()

    ref: dict[str, list[float]] = {}
    for i in range(n_q):
        if not sim[i].any():
            continue
        for k in top_ks:
            ref.setdefault(f"precision@{k}", []).append(retrieval_precision(scores[i], sim[i], top_k=k).item())
            ref.setdefault(f"recall@{k}", []).append(retrieval_hit_rate(scores[i], sim[i], top_k=k).item())
        ref.setdefault("mAP", []).append(retrieval_average_precision(scores[i], sim[i]).item())
        ref.setdefault(f"ndcg@{ndcg_k}", []).append(retrieval_normalized_dcg(scores[i], fov[i], top_k=ndcg_k).item())
    assert result["n_queries"].item() == n_q and result["n_queries_without_positive"].item() == 3
    for name, values in ref.items():
        assert result[name].item() == pytest.approx(sum(values) / len(values), abs=1e-6), name


def test_update_speed_500_queries_x_1000_database():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(500, 1000, generator=g)
    fov = torch.rand(500, 1000, generator=g) * (torch.rand(500, 1000, generator=g) < 0.05)
    metric = RetrievalScores()
    metric.update(scores[:10], fov[:10] >= 0.5, fov[:10])  # warm-up
    t0 = time.perf_counter()
    metric.update(scores, fov >= 0.5, fov)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"RetrievalScores.update took {elapsed:.3f} s for 500 x 1000"  # measured ~0.013 s


def test_prefixed_names():
    metric = RetrievalScores()
    metric.update(SCORES, SIM, FOV)
    names = set(prefixed(metric.compute(), "val"))
    assert {"val/precision@10", "val/recall@1", "val/mAP", "val/ndcg@10", "val/n_queries",
            "val/n_queries_without_positive"} <= names


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        RetrievalScores().update(SCORES, SIM[:, :5], FOV)


def test_range_accuracy_hand_example_and_boundary():
    # margin 0.25 and dyadic values so that |d| == margin is exact in floating point
    pred = torch.tensor([0.50, 0.50, 0.50, 0.50, 0.125])
    target = torch.tensor([0.50, 0.625, 0.75, 0.25, 1.0])
    # |d| = 0 (in), 0.125 (in), 0.25 (== margin: NOT in), 0.25 (NOT in), 0.875 (out)  -> 2 / 5 = 0.4
    assert range_accuracy(pred, target, margin=0.25).item() == pytest.approx(0.4, abs=1e-6)
    # default margin 0.01: |d| = 0.005 (in), 0.02 (out), 0 (in), 0.5 (out) -> 2 / 4 = 0.5
    assert range_accuracy(torch.tensor([0.505, 0.52, 0.3, 1.0]), torch.tensor([0.5, 0.5, 0.3, 0.5])).item() == 0.5

    metric = RangeAccuracy(margin=0.25)
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    assert metric.compute().item() == pytest.approx(0.4, abs=1e-6)
