"""rerank=fused (retrieval/ranking.py FusedReranker): verification added to the model's score, not put in its place.

The constructed cases: a model ranking with a known recall@1 and verifiers that are uninformative (no
structure: every count below the threshold; repeated facades: every candidate gets many inliers), misleading
for some queries, or informative. The rule must never fall below the better of its two inputs (the model's
order, the inlier order) where verification says nothing, and must take what verification knows when it does.
"""

from __future__ import annotations

import numpy as np
import pytest

from siamese_retrieval.errors import ConfigError
from siamese_retrieval.retrieval.ranking import FusedReranker, InlierReranker

N_Q, N_DB, TOP = 200, 50, 20


def model_ranking(seed: int = 0, recall1: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, scores, positive id) per query: database item `positive` is the one true match; the model ranks
    it first for `recall1` of the queries and somewhere in 2..TOP for the others."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(N_DB) for _ in range(N_Q)])
    positive = np.empty(N_Q, np.int64)
    for i in range(N_Q):
        rank = 0 if rng.random() < recall1 else int(rng.integers(1, TOP))
        positive[i] = ids[i, rank]
    scores = np.sort(rng.uniform(0.3, 0.6, (N_Q, N_DB)).astype(np.float32), axis=1)[:, ::-1].copy()
    return ids, scores, positive


def recall_at_1(ids: np.ndarray, positive: np.ndarray) -> float:
    return float(np.mean(ids[:, 0] == positive))


def verifier(table: np.ndarray):
    """verify(rows, candidates) -> inliers looked up in a (N_Q, N_DB) table, as evaluate.py's ORB verifier."""
    calls = []

    def verify(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        calls.append(np.asarray(rows).copy())
        return table[np.asarray(rows)[:, None], candidates].astype(np.float32)

    verify.calls = calls  # type: ignore[attr-defined]
    return verify


def both_inputs(ids, scores, positive, table) -> tuple[float, float, float]:
    """recall@1 of the model, of the inlier order (rerank=orb_ransac) and of the fused rule, same top N."""
    rows = np.arange(N_Q)
    by_inliers, _ = InlierReranker(TOP, verifier(table))(rows, ids, scores)
    fused, _ = FusedReranker(TOP, verifier(table))(rows, ids, scores)
    return recall_at_1(ids, positive), recall_at_1(by_inliers, positive), recall_at_1(fused, positive)


@pytest.mark.parametrize("kind", ["no_structure", "repeated_facades", "weak_noise"])
def test_uninformative_verification_never_costs_recall(kind: str) -> None:
    ids, scores, positive = model_ranking(seed=1)
    rng = np.random.default_rng(2)
    table = {
        "no_structure": rng.poisson(3.0, (N_Q, N_DB)),          # planar-free scenes: nothing reaches 12
        "repeated_facades": rng.integers(25, 60, (N_Q, N_DB)),  # everything matches everything
        "weak_noise": rng.poisson(9.0, (N_Q, N_DB)),            # counts around the threshold, no signal
    }[kind]
    model, inliers, fused = both_inputs(ids, scores, positive, table)
    assert model == pytest.approx(0.7, abs=0.08)
    assert inliers < model - 0.3  # the inlier order alone is close to chance here: the replacement rule fails
    assert fused >= max(model, inliers)  # the fused rule does not
    if kind != "weak_noise":  # nothing verified at all: exactly the model's order
        new_ids, _ = FusedReranker(TOP, verifier(table))(np.arange(N_Q), ids, scores)
        np.testing.assert_array_equal(new_ids, ids)


def test_informative_verification_fixes_what_the_model_missed() -> None:
    ids, scores, positive = model_ranking(seed=3, recall1=0.6)
    rng = np.random.default_rng(4)
    table = rng.poisson(4.0, (N_Q, N_DB))
    table[np.arange(N_Q), positive] = rng.integers(20, 80, N_Q)  # the true match is verified clearly
    model, inliers, fused = both_inputs(ids, scores, positive, table)
    assert model == pytest.approx(0.6, abs=0.08)
    assert inliers == 1.0 and fused == 1.0


def test_verification_right_for_some_queries_and_silent_for_the_rest() -> None:
    """Half the queries have structure (the true match verified), half none: the fused rule takes the
    verified half and keeps the model's answers for the rest, so it beats both inputs."""
    ids, scores, positive = model_ranking(seed=5, recall1=0.6)
    rng = np.random.default_rng(6)
    table = rng.poisson(2.0, (N_Q, N_DB))
    structured = np.arange(N_Q) < N_Q // 2
    table[structured, positive[structured]] = 40
    model, inliers, fused = both_inputs(ids, scores, positive, table)
    assert fused > max(model, inliers) + 0.1


def test_verified_candidates_move_first_in_the_models_order_and_the_rest_keeps_it() -> None:
    ids = np.arange(100, 125)[None, :]  # 25 candidates, the top 20 verified
    scores = np.linspace(0.9, 0.4, 25, dtype=np.float32)[None, :]
    table = np.zeros((1, 125))
    table[0, 100:125] = [0, 1, 30, 2, 13, 0, 1, 2, 0, 1, 3, 0, 2, 1, 0, 0, 1, 2, 0, 1, 90, 0, 0, 0, 0]
    new_ids, new_scores = FusedReranker(20, verifier(table), min_inliers=12)(np.array([0]), ids, scores)
    # 102 (30 inliers) and 104 (13) are verified: ahead, in the model's order (saturate = min_inliers);
    # 120 (90 inliers) is outside the top 20 and stays where the model put it
    expected = [102, 104, 100, 101, 103, *range(105, 125)]
    np.testing.assert_array_equal(new_ids[0], expected)
    rel = dict(zip(ids[0].tolist(), scores[0].tolist()))
    np.testing.assert_allclose(new_scores[0, :3], [1 + 13 + rel[102] / 2, 1 + 13 + rel[104] / 2, 1 + rel[100] / 2],
                               rtol=1e-6)
    np.testing.assert_allclose(new_scores[0, 20:], scores[0, 20:])  # below the top N: the model's scores
    assert np.all(np.diff(new_scores[0]) <= 0)  # scores stay sorted with the order
    # saturate above min_inliers: more inliers (up to it) rank a verified candidate higher
    new_ids, _ = FusedReranker(20, verifier(table), min_inliers=12, saturate=40)(np.array([0]), ids, scores)
    np.testing.assert_array_equal(new_ids[0, :2], [102, 104])
    table[0, 104] = 35
    new_ids, _ = FusedReranker(20, verifier(table), min_inliers=12, saturate=40)(np.array([0]), ids, scores)
    np.testing.assert_array_equal(new_ids[0, :2], [104, 102])


def test_a_count_must_stand_out_from_the_querys_other_candidates() -> None:
    ids = np.arange(20)[None, :]
    scores = np.linspace(0.9, 0.2, 20, dtype=np.float32)[None, :]
    table = np.random.default_rng(0).integers(28, 34, (1, 20)).astype(float)  # every candidate matches
    rerank = FusedReranker(20, verifier(table), min_inliers=12)
    np.testing.assert_array_equal(rerank(np.array([0]), ids, scores)[0], ids)  # nothing stands out
    table[0, 5] = 120
    np.testing.assert_array_equal(rerank(np.array([0]), ids, scores)[0][0, :2], [5, 0])


def test_confident_queries_are_not_verified() -> None:
    ids = np.tile(np.arange(20), (3, 1))
    scores = np.tile(np.linspace(0.6, 0.3, 20, dtype=np.float32), (3, 1))
    scores[0, 0] = 0.95  # query 0 leads by 0.35: confident
    table = np.zeros((3, 20))
    table[:, 7] = 50
    verify = verifier(table)
    rerank = FusedReranker(20, verify, skip_margin=0.02)
    new_ids, _ = rerank(np.array([0, 1, 2]), ids, scores)
    np.testing.assert_array_equal(np.concatenate(verify.calls), [1, 2])  # query 0 is never verified
    np.testing.assert_array_equal(new_ids[0], np.arange(20))
    np.testing.assert_array_equal(new_ids[1:, :2], [[7, 0], [7, 0]])
    assert rerank.verified_queries == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_n=0), "rerank.top_n=0: must be an integer >= 1"),
    (dict(min_inliers=0), "rerank.min_inliers=0: must be an integer >= 1"),
    (dict(min_inliers=12, saturate=5), "rerank.saturate=5: must be >= rerank.min_inliers (12) or null"),
    (dict(outlier_z=-1), "rerank.outlier_z=-1: must be a number >= 0"),
    (dict(skip_margin=-0.1), "rerank.skip_margin=-0.1: must be a number >= 0 or null"),
])
def test_bad_settings_name_the_value(kwargs: dict, message: str) -> None:
    args = dict(top_n=5, verify=lambda rows, cand: np.zeros(cand.shape)) | kwargs
    with pytest.raises(ConfigError) as err:
        FusedReranker(**args)
    assert str(err.value) == message
