"""Known-answer tests: tiny examples whose expected values are worked out by hand in the comments, on the edge
cases a mutation audit (experiments/mutation_audit.py) found the rest of the suite did not pin down: a query
with more positives than k, positives beyond the searched top k, queries without any positive, a pair exactly
on the radius, headings 359 and 1, a view exactly at min_fov, padding present, a full ranking through a
compressed index, ... Every expected number is computed here on paper, never by the code under test.
Fast on purpose (tiny tensors and arrays, no city, no training)."""

from __future__ import annotations

import math
import os
import subprocess
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from siamese_retrieval.data.ground_truth import DenseRelevance, SparseRelevance, heading_difference, radius_pairs
from siamese_retrieval.retrieval.index import IndexConfig
from siamese_retrieval.retrieval.metrics import RetrievalScores, per_query_retrieval_scores
from siamese_retrieval.retrieval.ranking import RankingSettings, rank_embeddings, rank_scores
from tests.test_streaming import Identity  # embeddings = inputs, relevance = -distance


def ranked_scores(orders: list[list[int]], n_db: int) -> np.ndarray:
    """Scores that rank database items in `orders[q]` (best first): n_db - rank."""
    scores = np.zeros((len(orders), n_db), np.float32)
    for q, order in enumerate(orders):
        scores[q, order] = n_db - np.arange(len(order))
    return scores


def truth_of(positives: list[list[int]], n_db: int) -> DenseRelevance:
    sim = np.zeros((len(positives), n_db), bool)
    for q, pos in enumerate(positives):
        sim[q, pos] = True
    return DenseRelevance(sim, sim.astype(np.float32))


# ----------------------------------------------------------------------------------------- streaming top-k


def test_map_at_k_with_more_positives_than_k() -> None:
    n_db = 8
    # q0: 5 positives (0..4), ranked 0, 1, 2, ... -> its top 3 are all positives
    # q1: 4 positives (0..3), ranked 5, 0, 1, 2, 3, ... -> hits at ranks 2, 3 (and 4, 5 beyond k = 3)
    positives = [[0, 1, 2, 3, 4], [0, 1, 2, 3]]
    orders = [[0, 1, 2, 3, 4, 5, 6, 7], [5, 0, 1, 2, 3, 4, 6, 7]]
    truth, scores = truth_of(positives, n_db), ranked_scores(orders, n_db)
    top = rank_scores(scores, np.arange(2), truth, RankingSettings(top_ks=(1, 2), ndcg_k=1, search_k=3)).metrics
    # AP@3 = sum of P@r at the hits within the top 3 / min(3, n_pos):
    #   q0: (1 + 1 + 1) / min(3, 5) = 1          (all of the top 3 are positives: a perfect score)
    #   q1: (1/2 + 2/3) / min(3, 4) = 7/18
    assert top["mAP@3"] == pytest.approx((1 + 7 / 18) / 2, rel=1e-6)
    assert top["precision@1"] == pytest.approx(0.5) and top["precision@2"] == pytest.approx((1 + 0.5) / 2)
    assert top["recall@1"] == pytest.approx(0.5) and top["recall@2"] == 1.0
    assert top["ndcg@1"] == pytest.approx(0.5) and top["n_queries_without_positive"] == 0
    # the whole ranking: q0 (5 hits at ranks 1..5) AP = 1; q1 hits at 2..5: (1/2 + 2/3 + 3/4 + 4/5) / 4
    full = rank_scores(scores, np.arange(2), truth, RankingSettings(top_ks=(1, 2), ndcg_k=1)).metrics
    assert full["mAP"] == pytest.approx((1 + (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4) / 2, rel=1e-6)


def test_streaming_metrics_count_positives_beyond_the_top_k() -> None:
    n_db = 8
    # q0: positives 0 (rank 1) and 6 (rank 7, beyond k = 3); q1: its only positive 7 is ranked last
    truth = truth_of([[0, 6], [7]], n_db)
    scores = ranked_scores([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]], n_db)
    ranking = rank_scores(scores, np.arange(2), truth, RankingSettings(top_ks=(1,), ndcg_k=1, search_k=3))
    m = ranking.metrics
    # q0: AP@3 = 1 / min(3, 2) = 0.5 (one of its two positives found); q1: AP@3 = 0, it HAS a positive
    assert m["mAP@3"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@1"] == pytest.approx(0.5) and m["precision@1"] == pytest.approx(0.5)
    assert m["ndcg@1"] == pytest.approx(0.5)  # q0: 1/1, q1: gain 0 / ideal 1
    assert m["n_queries"] == 2 and m["n_queries_without_positive"] == 0
    np.testing.assert_array_equal(ranking.first_positive_rank, [1, 4])  # q1: beyond the top 3 -> k + 1


def test_first_positive_rank_beyond_the_top_k_is_k_plus_one() -> None:
    n_db = 6
    # q0: positive 4 at rank 5; q1: no positive; q2: positive 1 at rank 2
    truth = truth_of([[4], [], [1]], n_db)
    scores = ranked_scores([list(range(6))] * 3, n_db)
    streamed = rank_scores(scores, np.arange(3), truth, RankingSettings(top_ks=(1,), ndcg_k=1, search_k=3))
    np.testing.assert_array_equal(streamed.first_positive_rank, [3 + 1, 0, 2])
    full = rank_scores(scores, np.arange(3), truth, RankingSettings(top_ks=(1,), ndcg_k=1))
    np.testing.assert_array_equal(full.first_positive_rank, [5, 0, 2])


def test_queries_without_positive_are_left_out_of_every_mean() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0]] * 3)  # every query ranks items 0, 1, 2
    sim = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])  # q2 has no positive
    metric = RetrievalScores(top_ks=(1,), ndcg_k=2)
    metric.update(scores, sim, sim.float())
    m = metric.compute()
    # q0: P@1 = R@1 = AP = nDCG@2 = 1; q1: P@1 = R@1 = 0, AP = 1/2, nDCG@2 = (1/log2(3)) / 1; q2 left out
    assert m["precision@1"].item() == pytest.approx(0.5) and m["recall@1"].item() == pytest.approx(0.5)
    assert m["mAP"].item() == pytest.approx(0.75)
    assert m["ndcg@2"].item() == pytest.approx((1 + 1 / math.log2(3)) / 2, rel=1e-6)
    assert m["n_queries"].item() == 3 and m["n_queries_without_positive"].item() == 1
    only_empty = RetrievalScores(top_ks=(1,), ndcg_k=2)
    only_empty.update(scores[2:], sim[2:], sim[2:].float())
    assert math.isnan(only_empty.compute()["mAP"].item())  # nothing to average


# ----------------------------------------------------------------------------------------- metrics


def test_precision_at_k_beyond_a_small_database_divides_by_k() -> None:
    metric = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    metric.update(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1, 0, 1]]), torch.tensor([[1.0, 0.0, 1.0]]))
    m = metric.compute()
    # 3 database items, 2 positives: precision@5 = 2 / 5 (divided by 5, not by the 3 items there are)
    assert m["precision@5"].item() == pytest.approx(0.4) and m["precision@1"].item() == 1.0
    assert m["recall@5"].item() == 1.0
    assert m["mAP"].item() == pytest.approx((1 + 2 / 3) / 2)  # hits at ranks 1 and 3


def test_hand_worked_ranking_metrics() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])  # ranking 0, 1, 2, 3, 4
    sim = torch.tensor([[0, 1, 0, 1, 0]])  # positives at ranks 2 and 4
    fov = torch.tensor([[0.2, 1.0, 0.0, 0.6, 0.9]])  # item 4 (rank 5) has the second largest fov
    out = per_query_retrieval_scores(scores, sim, fov, top_ks=(1, 2, 3), ndcg_k=2)
    assert out["precision@1"].item() == 0.0 and out["recall@1"].item() == 0.0
    assert out["precision@2"].item() == pytest.approx(1 / 2) and out["recall@2"].item() == 1.0
    assert out["precision@3"].item() == pytest.approx(1 / 3) and out["recall@3"].item() == 1.0
    assert out["AP"].item() == pytest.approx((1 / 2 + 2 / 4) / 2)  # P@2 and P@4, over 2 positives
    # nDCG@2: DCG = 0.2/log2(2) + 1.0/log2(3); ideal: the row's two largest fov, 1.0 and 0.9 (item 4, not retrieved)
    dcg = 0.2 / 1.0 + 1.0 / math.log2(3)
    idcg = 1.0 / 1.0 + 0.9 / math.log2(3)
    assert out["ndcg@2"].item() == pytest.approx(dcg / idcg, rel=1e-6)
    assert bool(out["has_positive"].item())


# ----------------------------------------------------------------------------------------- radius and heading


def test_radius_boundary_is_inclusive() -> None:
    # UTM-sized coordinates; q0 is 3 m east and 4 m north of db0: exactly 5 m
    db = np.array([[500000.0, 4000000.0], [500100.0, 4000000.0]])
    q = np.array([[500003.0, 4000004.0],  # 5 m from db0 (on the radius)
                  [500100.0, 4000005.0],  # 5 m from db1 (on the radius)
                  [500100.0, 4000005.5],  # 5.5 m from db1 (outside)
                  [500096.0, 3999997.0]])  # 4 m west, 3 m south of db1: 5 m again
    qi, di = radius_pairs(q, db, 5.0)
    assert list(zip(qi.tolist(), di.tolist())) == [(0, 0), (1, 1), (3, 1)]
    dense = SparseRelevance.from_coordinates(db, q, 5.0).to_dense()[0]
    np.testing.assert_array_equal(dense, [[True, False], [False, True], [False, False], [False, True]])
    assert radius_pairs(q, db, 4.99)[0].size == 0
    # radius 0: only identical positions
    assert radius_pairs(db, db, 0.0)[1].tolist() == [0, 1]


def test_heading_difference_wraps_around_north() -> None:
    np.testing.assert_array_equal(heading_difference([359.0, 1.0, 0.0, 10.0, -10.0, 720.0, 90.0],
                                                     [1.0, 359.0, 180.0, 350.0, 10.0, 0.0, 270.0]),
                                  [2.0, 2.0, 180.0, 20.0, 20.0, 0.0, 180.0])


def test_heading_rule_is_inclusive_and_wraps() -> None:
    # one query heading 350 and four database images at its position, headings 20, 21, 359, 180:
    # differences 30 (exactly the limit: kept), 31, 9 (across north: kept), 170
    xy = np.zeros((4, 2))
    qi, di = radius_pairs(xy[:1], xy, 1.0, q_heading=np.array([350.0]), db_heading=np.array([20.0, 21.0, 359.0, 180.0]),
                          max_heading_deg=30.0)
    assert di.tolist() == [0, 2] and qi.tolist() == [0, 0]
    # 359 vs 1 are 2 degrees apart: a 2-degree rule keeps them, a 1.9-degree rule does not
    one = {"q_heading": np.array([359.0]), "db_heading": np.array([1.0])}
    assert radius_pairs(xy[:1], xy[:1], 1.0, max_heading_deg=2.0, **one)[1].tolist() == [0]
    assert radius_pairs(xy[:1], xy[:1], 1.0, max_heading_deg=1.9, **one)[1].tolist() == []


def test_vpr_file_name_heading_is_taken_modulo_360() -> None:
    from siamese_retrieval.data.layouts import parse_vpr_name, vpr_file_name

    for given, expected in ((370, 10.0), (-10, 350.0), (359.5, 359.5), (360, 0.0)):
        parsed = parse_vpr_name(vpr_file_name({"UTM_east": 500001.5, "UTM_north": 4000002, "heading": given}))
        assert parsed.heading == pytest.approx(expected) and (parsed.east, parsed.north) == (500001.5, 4000002.0)
    assert parse_vpr_name(vpr_file_name({"UTM_east": 1, "UTM_north": 2})).heading is None


def _msls_split(folder: Path, rows: list[tuple[str, float, float, float]]) -> None:
    (folder / "images").mkdir(parents=True)
    post = ",key,easting,northing\n" + "".join(f"{i},{k},{e},{n}\n" for i, (k, e, n, _) in enumerate(rows))
    raw = ",key,ca,pano\n" + "".join(f"{i},{k},{ca},False\n" for i, (k, _, _, ca) in enumerate(rows))
    (folder / "postprocessed.csv").write_text(post)
    (folder / "raw.csv").write_text(raw)


def test_msls_compass_angle_is_taken_modulo_360_and_radius_is_inclusive(tmp_path: Path) -> None:
    from siamese_retrieval.data.layouts import read_msls_official

    city = tmp_path / "train_val" / "town"
    # db0 at the origin, heading 370 (= 10); db1 30 m north, heading 0; q0 3 m east + 4 m north of db0 (5 m),
    # heading -5 (= 355): 15 degrees from db0 across north
    _msls_split(city / "database", [("d0", 500000.0, 4000000.0, 370.0), ("d1", 500000.0, 4000030.0, 0.0)])
    _msls_split(city / "query", [("q0", 500003.0, 4000004.0, -5.0)])
    ds = read_msls_official(tmp_path, "town", radius_m=5.0, max_heading_deg=15.0, check="none")
    np.testing.assert_allclose(ds.db_loc[:, 2], [10.0, 0.0])
    np.testing.assert_allclose(ds.q_loc[:, 2], [355.0])
    np.testing.assert_array_equal(np.asarray(ds.sim), [[True, False]])
    tight = read_msls_official(tmp_path, "town", radius_m=5.0, max_heading_deg=14.0, check="none")
    np.testing.assert_array_equal(np.asarray(tight.sim), [[False, False]])


# ----------------------------------------------------------------------------------------- training-only city


def test_training_city_sharing_only_the_last_street_is_refused() -> None:
    from siamese_retrieval.data.synth import SynthConfig
    from siamese_retrieval.data.train_views import check_no_shared_places
    from siamese_retrieval.errors import ConfigError

    eval_city = SynthConfig.from_preset("tiny", n_streets=4, first_street=10)  # streets 10..13
    with pytest.raises(ConfigError, match=r"\(1 shared\)"):
        check_no_shared_places(eval_city, SynthConfig.from_preset("tiny", n_streets=2, first_street=13))  # 13..14
    with pytest.raises(ConfigError, match=r"\(1 shared\)"):
        check_no_shared_places(eval_city, SynthConfig.from_preset("tiny", n_streets=2, first_street=9))  # 9..10
    check_no_shared_places(eval_city, SynthConfig.from_preset("tiny", n_streets=2, first_street=14))  # 14..15
    check_no_shared_places(eval_city, SynthConfig.from_preset("tiny", n_streets=2, first_street=8))  # 8..9


def test_joined_views_offset_the_training_city_database_ids() -> None:
    from siamese_retrieval.data.train_views import join_views

    # evaluation dataset (no training positives of its own): 2 queries x 3 database images, q0 sees d1 (fov 0.8),
    # q1 sees d2 (fov 0.3, sim 0)
    main = SimpleNamespace(sim=np.array([[0, 1, 0], [0, 0, 0]], bool),
                           fov=np.array([[0, 0.8, 0], [0, 0, 0.3]], np.float32), train_relevance=None)
    # training city: 1 query x 2 database images, its q0 sees its d1 (fov 1)
    views = DenseRelevance(np.array([[0, 1]], bool), np.array([[0, 1.0]], np.float32))
    q_in, db_in = {"x": torch.tensor([[0.0], [1.0]])}, {"x": torch.tensor([[10.0], [11.0], [12.0]])}
    vq_in, vdb_in = {"x": torch.tensor([[5.0]])}, {"x": torch.tensor([[20.0], [21.0]])}
    joined = join_views(main, q_in, db_in, np.array([1]), np.array([0, 1]), views, vq_in, vdb_in)
    # one index space: the training city's query is query 2, its database images 3 and 4
    rows, ids, sim, fov = joined.truth.overlaps(np.arange(3))
    assert rows.tolist() == [0, 1, 2] and ids.tolist() == [1, 2, 4]
    assert sim.tolist() == [True, False, True] and fov.tolist() == pytest.approx([0.8, 0.3, 1.0])
    assert joined.truth.n_query == 3 and joined.truth.n_db == 5
    assert joined.train_q.tolist() == [1, 2] and joined.train_db.tolist() == [0, 1, 3, 4]
    assert joined.q_inputs["x"].flatten().tolist() == [0.0, 1.0, 5.0]
    assert joined.db_inputs["x"].flatten().tolist() == [10.0, 11.0, 12.0, 20.0, 21.0]


# ----------------------------------------------------------------------------------------- place batches


def test_places_whose_views_one_query_sees_are_kept_apart() -> None:
    from siamese_retrieval.data.place_batches import PlaceConfig, PlaceSampler

    # train places: anchors q0 (view d0), q1 (view d1), q3 (view d3); q2 (a val query, not a place) sees d0
    # and d1 a little: nothing says d0 and d1 do not overlap, so places 0 and 1 must not share a batch.
    # No anchor sees another place's database image (the database rule alone would allow them together).
    truth = SparseRelevance.from_pairs(4, 4, [0, 1, 2, 2, 3], [0, 1, 0, 1, 3], sim=[1, 1, 0, 0, 1],
                                       fov=[0.9, 0.9, 0.3, 0.3, 0.9])
    sampler = PlaceSampler(truth, np.array([0, 1, 3]), np.arange(4), PlaceConfig(P=3, K=2))
    assert sampler.anchors.tolist() == [0, 1, 3]
    assert sampler.overlap(0, 1) and sampler.overlap(1, 0)
    assert not sampler.overlap(0, 2) and not sampler.overlap(1, 2)
    for epoch in range(6):
        for batch in sampler.pack(epoch):
            assert not {0, 1} <= set(batch)


def test_a_view_exactly_at_min_fov_counts() -> None:
    from siamese_retrieval.data.place_batches import PlaceConfig, PlaceSampler

    # q0 -> d0 at fov 0.5 (= min_fov: a view), q1 -> d1 at 0.5, q2 -> d2 at 0.49 (not a view: q2 is skipped)
    truth = SparseRelevance.from_pairs(3, 3, [0, 1, 2], [0, 1, 2], sim=[1, 1, 0], fov=[0.5, 0.5, 0.49])
    sampler = PlaceSampler(truth, np.arange(3), np.arange(3), PlaceConfig(P=2, K=2, min_fov=0.5))
    assert sampler.n_places == 2 and sampler.n_skipped == 1 and sampler.anchors.tolist() == [0, 1]
    assert sampler.views.row(0).tolist() == [0] and sampler.views.row(1).tolist() == [1]


def test_random_packing_defers_overlapping_places_to_a_later_batch() -> None:
    from siamese_retrieval.data.place_batches import PlaceConfig, PlaceSampler

    # four places, P = 2: A (q0) and B (q1) share database image d4, C (q2) and D (q3) share d5; otherwise
    # apart. Whatever the order, the first batch is a place X and the first later place that is not X's
    # partner, Y; the two left are X's and Y's partners, which do not overlap: so every epoch packs exactly
    # two batches of two holding all four places (a place skipped for the open batch must come back later).
    truth = SparseRelevance.from_pairs(4, 6, [0, 0, 1, 1, 2, 2, 3, 3], [0, 4, 1, 4, 2, 5, 3, 5],
                                       sim=[1, 0, 1, 0, 1, 0, 1, 0], fov=[0.9, 0.2] * 4)
    sampler = PlaceSampler(truth, np.arange(4), np.arange(6), PlaceConfig(P=2, K=2))
    assert sampler.overlap(0, 1) and sampler.overlap(2, 3) and not sampler.overlap(0, 2)
    for epoch in range(20):
        batches = sampler.pack(epoch)
        assert len(batches) == 2 and sorted(p for b in batches for p in b) == [0, 1, 2, 3], (epoch, batches)
        for batch in batches:
            assert sorted(batch) not in ([0, 1], [2, 3])


# ----------------------------------------------------------------------------------------- miners


def _pairs(emb_q, emb_d, fov, **extra):
    from siamese_retrieval.models.losses import PairOutput

    n = len(fov)
    fov_t = torch.tensor(fov, dtype=torch.float32)
    return PairOutput(torch.tensor(emb_q, dtype=torch.float32), torch.tensor(emb_d, dtype=torch.float32),
                      torch.zeros(n), torch.zeros(n), torch.zeros(n), (fov_t >= 0.5).float(), fov_t, **extra)


def test_batch_hard_miner_boundary_and_denominators() -> None:
    from siamese_retrieval.models.losses import ContrastiveLoss
    from siamese_retrieval.models.mining import BatchHardContrastive, known_cross_fov

    nan = float("nan")
    # three queries at the origin; database images at distances 0.1, 0.2 and 0.3 (margin 0.5)
    # known cross fov: row 0: d0 at fov 0.5 (= max_fov: NOT a negative), d1 at 0 (negative)
    #                  row 1: d1 at 0 (negative); row 2: only d2 at fov 1 (no negative at all)
    cross = torch.tensor([[0.5, 0.0, nan], [nan, 0.0, nan], [nan, nan, 1.0]])
    out = _pairs([[0.0, 0.0]] * 3, [[0.0, 0.1], [0.0, 0.2], [0.0, 0.3]], [0.5, 0.0, 1.0], cross_fov=cross)
    miner = BatchHardContrastive(ContrastiveLoss(0.5), k=2)
    # push of a negative at distance d: 0.5 * (1 - fov) * (0.5 - d)^2 = 0.5 * 0.3^2 = 0.045 for d1
    # row 0: one negative among its k = 2 -> 0.045; row 1: 0.045; row 2 has none -> left out: mean 0.045
    assert miner.mined_term(out).item() == pytest.approx(0.045, abs=1e-6)
    # without cross_fov the cross pairs are known only where (query, database) is a sampled pair:
    # pairs (q0, d10, fov 1), (q0, d11, fov 0), (q1, d12, fov 0)
    out = _pairs([[0.0, 0.0]] * 3, [[0.0, 0.1]] * 3, [1.0, 0.0, 0.0], q_idx=torch.tensor([0, 0, 1]),
                 d_idx=torch.tensor([10, 11, 12]))
    expected = torch.tensor([[1.0, 0.0, nan], [1.0, 0.0, nan], [nan, nan, 0.0]])
    torch.testing.assert_close(known_cross_fov(out), expected, equal_nan=True)


def test_multi_similarity_miner_keeps_only_the_hard_pairs() -> None:
    from siamese_retrieval.models.metric_losses import MultiSimilarity

    # unit vectors at 0, 30 degrees (place 0) and 50, 120 degrees (place 1): cosine = cos(angle difference)
    angles = [0.0, 30.0, 50.0, 120.0]
    emb = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    labels = torch.tensor([0, 0, 1, 1])

    def s(i: int, j: int) -> float:
        return math.cos(math.radians(angles[i] - angles[j]))

    alpha, beta, base, eps = 2.0, 10.0, 0.5, 0.1
    # the miner (epsilon 0.1) keeps a negative n of anchor i when S_in + eps > min over positives of S_ip, and a
    # positive p when S_ip - eps < max over negatives of S_in:
    #   anchor 0: pos 1 (.866), negs 2 (.643), 3 (-.5): .743 and -.4 < .866, and .766 > .643 -> nothing kept
    #   anchor 1: pos 0 (.866), negs 2 (.940), 3 (0): keeps neg 2 (1.04 > .866) and pos 0 (.766 < .940)
    #   anchor 2: pos 3 (.342), negs 0 (.643), 1 (.940): keeps both negatives and pos 3 (.242 < .940)
    #   anchor 3: pos 2 (.342), negs 0 (-.5), 1 (0): -.4, .1 < .342 and .242 > 0 -> nothing kept
    kept = {1: ([0], [2]), 2: ([3], [0, 1])}

    def term(i: int) -> float:
        pos, neg = kept.get(i, ([], []))
        lp = math.log1p(sum(math.exp(-alpha * (s(i, p) - base)) for p in pos)) / alpha
        ln = math.log1p(sum(math.exp(beta * (s(i, n) - base)) for n in neg)) / beta
        return lp + ln

    expected = sum(term(i) for i in range(4)) / 4  # every image is an anchor; one without pairs adds 0
    loss = MultiSimilarity(alpha=alpha, beta=beta, base=base, miner_epsilon=eps)
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-5)


def test_multi_similarity_pair_batch_positive_at_exactly_pos_fov() -> None:
    from siamese_retrieval.models.metric_losses import MultiSimilarity

    # a pair batch of one orthogonal pair (cosine 0) with fov exactly pos_fov = 0.5: a positive
    out = _pairs([[1.0, 0.0]], [[0.0, 1.0]], [0.5])
    loss = MultiSimilarity(alpha=2.0, beta=10.0, base=0.5, miner_epsilon=0.1, pos_fov=0.5)
    # positive term: 1/alpha log(1 + exp(-alpha (0 - 0.5))) = log(1 + e) / 2
    assert loss(out).item() == pytest.approx(math.log1p(math.e) / 2, rel=1e-6)
    out = _pairs([[1.0, 0.0]], [[0.0, 1.0]], [0.49])  # a negative: log(1 + exp(10 (0 - 0.5))) / 10
    assert loss(out).item() == pytest.approx(math.log1p(math.exp(-5.0)) / 10, rel=1e-5)


# ----------------------------------------------------------------------------------------- keypoint_set masks


def test_masked_poolings_by_hand() -> None:
    from siamese_retrieval.models.keypoint_set import MaskedGeM, MaskedMean, masked_softmax

    x = torch.tensor([[[1.0], [3.0], [100.0]]])  # two keypoints and one padded row holding junk
    mask = torch.tensor([[True, True, False]])
    assert MaskedMean(1)(x, mask).item() == pytest.approx(2.0)  # (1 + 3) / 2
    gem = MaskedGeM(1, p=2.0, learnable=False, out_dim=1)
    with torch.no_grad():
        gem.proj.weight.fill_(1.0)
        gem.proj.bias.zero_()
    assert gem(x, mask).item() == pytest.approx(math.sqrt((1.0 + 9.0) / 2), rel=1e-5)  # (mean of squares)^(1/2)
    logits = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    w = masked_softmax(logits, torch.tensor([[True, True, False], [False] * 3]), dim=-1)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("pooling", ["mean", "gem", "attention", "netvlad"])
def test_keypoint_set_padding_amount_does_not_change_the_embedding(pooling: str) -> None:
    from siamese_retrieval.models.keypoint_set import KeypointSetEncoder

    # the same 5 keypoints: alone (no padding), padded to 8 and to 12 (junk in the padding, interleaved):
    # one embedding, since padded keypoints are never attended to and never pooled
    g = torch.Generator().manual_seed(0)
    desc = torch.randint(0, 256, (1, 5, 32), generator=g, dtype=torch.uint8)
    feat = torch.rand(1, 5, 7, generator=g)
    cfg = {"name": pooling, "queries": 2, "clusters": 3, "dim": 12}

    def build(n: int) -> KeypointSetEncoder:
        torch.manual_seed(1)
        return KeypointSetEncoder(n_keypoints=n, d_model=16, n_heads=2, embedding_dim=8, n_layers=1, pooling=cfg)

    alone = build(5)
    if pooling == "netvlad":  # clusters from a first training batch, as training does
        alone.train()
        alone({"desc": desc.repeat(2, 1, 1), "feat": feat.repeat(2, 1, 1), "mask": torch.ones(2, 5, dtype=torch.bool)})
    alone.eval()
    with torch.no_grad():
        expected = alone({"desc": desc, "feat": feat, "mask": torch.ones(1, 5, dtype=torch.bool)})
        for n, slots in ((8, [0, 1, 2, 3, 4]), (12, [1, 3, 4, 8, 11])):
            enc = build(n)
            enc.load_state_dict(alone.state_dict())
            enc.eval()
            pad_desc = torch.randint(0, 256, (1, n, 32), generator=g, dtype=torch.uint8)
            pad_feat = torch.randn(1, n, 7, generator=g) * 100
            mask = torch.zeros(1, n, dtype=torch.bool)
            pad_desc[0, slots], pad_feat[0, slots], mask[0, slots] = desc[0], feat[0], True
            got = enc({"desc": pad_desc, "feat": pad_feat, "mask": mask})
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- compressed index


@pytest.mark.parametrize("index", [
    IndexConfig(kind="ivf", nlist=8, nprobe=1),
    IndexConfig(kind="ivfpq", nlist=8, nprobe=1, pq_m=4, pq_bits=4),
    IndexConfig(factory="IVF{nlist},PQ4x4,Refine(Flat)", nlist=8, nprobe=1, k_factor=2),
], ids=["ivf", "ivfpq", "ivfpq_refine"])
def test_full_ranking_through_compressed_indexes_ranks_every_item(index: IndexConfig) -> None:
    # a full ranking (search_k null) probes every inverted list, whatever nprobe says: each query's ranking
    # holds every database item exactly once; with exact vectors (ivf, Refine) it is the exact distance order
    g = torch.Generator().manual_seed(0)
    n_db, n_q = 400, 12
    db, q = torch.randn(n_db, 8, generator=g), torch.randn(n_q, 8, generator=g)
    sim = np.zeros((n_q, n_db), bool)
    sim[np.arange(n_q), np.arange(n_q) * 7] = True
    settings = RankingSettings(top_ks=(1,), ndcg_k=1, keep_top=n_db, index=index)
    ranking = rank_embeddings(Identity(), db, q, np.arange(n_q), DenseRelevance(sim, sim.astype(np.float32)), settings)
    assert ranking.top_ids.shape == (n_q, n_db)
    for row in ranking.top_ids:
        assert sorted(row.tolist()) == list(range(n_db))
    assert (ranking.first_positive_rank >= 1).all()  # every query's positive is found somewhere
    if index.kind != "ivfpq":
        exact = np.argsort(((q.numpy()[:, None] - db.numpy()[None]) ** 2).sum(-1), axis=1, kind="stable")
        np.testing.assert_array_equal(ranking.top_ids[:, :20], exact[:, :20])


def test_tuning_uses_the_lower_confidence_bound() -> None:
    from siamese_retrieval.retrieval.index import build_index, tune_search_params

    g = np.random.default_rng(0)
    db = g.standard_normal((200, 4)).astype(np.float32)
    q = g.standard_normal((20, 4)).astype(np.float32)
    exact = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :2]
    # the reference's top 2 of every other query holds one far item no search returns in a top 2: the best
    # agreement possible is 1 for half the queries and 1/2 for the others, mean 0.75 with a standard error > 0
    far = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1, kind="stable")[:, -1]
    reference = exact.copy()
    reference[1::2, 1] = far[1::2]
    index = build_index(db, IndexConfig(kind="ivf", nlist=4, nprobe=1))
    tuned = tune_search_params(index, reference, q, target_recall=0.75, k=2, nprobes=[1, 4], repeats=1)
    # mean 0.75 - 1.645 standard errors < 0.75: not reached; the most exact setting (all 4 lists) is kept
    assert tuned.reached is False and tuned.nprobe == 4 and tuned.recall == pytest.approx(0.75)
    at_mean = tune_search_params(index, reference, q, target_recall=0.75, k=2, nprobes=[4], z=0.0, repeats=1)
    assert at_mean.reached is True  # z = 0 compares the mean itself


# ----------------------------------------------------------------------------------------- sparse ground truth


def test_sparse_lookup_of_missing_ids() -> None:
    # q0 sees database image 3 (the last id), q1 sees image 0; FAISS's -1 ("no result") is never relevant
    sparse = SparseRelevance.from_pairs(2, 4, [0, 1], [3, 0], fov=[1.0, 0.7])
    sim, fov = sparse.to_dense()
    dense = DenseRelevance(sim, fov)
    ids = np.array([[-1, 0, 3], [-1, 3, 0]])
    for truth in (sparse, dense):
        got_sim, got_fov = truth.lookup(np.array([1, 0]), ids)
        np.testing.assert_array_equal(got_sim, [[False, True, False], [False, True, False]])
        np.testing.assert_allclose(got_fov, [[0.0, 0.7, 0.0], [0.0, 1.0, 0.0]])


def test_sparse_n_positives_counts_sim_pairs_only() -> None:
    # q0 overlaps d0 (sim 1), d1 (fov 0.3, sim 0) and d2 (sim 1); q1 overlaps d1 (fov 0.2, sim 0)
    truth = SparseRelevance.from_pairs(2, 3, [0, 0, 0, 1], [0, 1, 2, 1], sim=[1, 0, 1, 0], fov=[1.0, 0.3, 0.7, 0.2])
    assert truth.n_positives(np.array([0, 1])).tolist() == [2, 0]
    np.testing.assert_allclose(truth.ideal_fov(np.array([0, 1]), 2), [[1.0, 0.7], [0.2, 0.0]])


# ----------------------------------------------------------------------------------------- splits


def test_split_excludes_database_images_seen_by_val_and_test_queries() -> None:
    from siamese_retrieval.data.splits import split_by_place

    # three 100 m places X, Y, Z along a street, one query each; every place has three database images:
    # 'own' (seen by its query only), 'prev' (also seen by the previous place's query) and 'next' (also
    # by the next one's), the places in a cycle X -> Y -> Z -> X. With fractions 1:1:1 each split gets one
    # place; the train place's 'prev' and 'next' images are seen by the val and the test query, so
    # train_db is exactly the train place's 'own' image.
    centre = {0: 50.0, 1: 150.0, 2: 250.0}
    db_loc, owner, kind = [], [], []
    for p in range(3):
        for j, k in enumerate(("own", "prev", "next")):
            db_loc.append([centre[p] - 20 + 20 * j, 50.0, 0.0])
            owner.append(p)
            kind.append(k)
    q_loc = np.array([[centre[p], 50.0, 0.0] for p in range(3)])
    fov = np.zeros((3, 9), np.float32)
    for d, (p, k) in enumerate(zip(owner, kind)):
        fov[p, d] = 0.9
        if k == "prev":
            fov[(p - 1) % 3, d] = 0.2
        if k == "next":
            fov[(p + 1) % 3, d] = 0.2
    dataset = SimpleNamespace(q_loc=q_loc, db_loc=np.array(db_loc), sim=fov >= 0.5, fov=fov)
    for seed in range(4):
        s = split_by_place(dataset, fractions=(1, 1, 1), cell_size_m=100.0, seed=seed)
        assert len(s.train_q) == len(s.val_q) == len(s.test_q) == 1
        train_place = int(s.train_q[0])  # query p lies in place p
        assert s.train_db.tolist() == [3 * train_place], seed  # its 'own' image only
        assert s.summary()["n_train_db_excluded_overlap"] == 2


def test_assign_places_fills_every_split_with_the_last_places() -> None:
    from siamese_retrieval.data.splits import _assign_places

    # places of 1, 10 and 1 queries, fractions 0.7 / 0.15 / 0.15 (targets 8.4, 1.8, 1.8): the first goes to
    # train (largest deficit); then only two places are left for the two empty splits: val, then test
    frac = np.array([0.7, 0.15, 0.15])
    assert _assign_places(np.array([1, 10, 1]), frac).tolist() == [0, 1, 2]
    # with places to spare the greedy rule decides: 5, 5, 1, 1 -> train, train (deficit 3.4 > 1.8), val, test
    assert _assign_places(np.array([5, 5, 1, 1]), frac).tolist() == [0, 0, 1, 2]


# ----------------------------------------------------------------------------------------- fused re-ranking


def test_fused_reranker_by_hand() -> None:
    from siamese_retrieval.retrieval.ranking import FusedReranker

    inliers_of = {0: 12, 5: 2, 7: 3, 9: 1, 1: 2, 2: 3, 3: 1}

    def verify(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return np.vectorize(inliers_of.get)(candidates)

    ids = np.array([[5, 7, 0, 9], [1, 2, 0, 3]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.99, 0.2, 0.1, 0.05]], np.float32)
    # query 0 inliers 2, 3, 12, 1: median 2.5; MAD median(.5, .5, 9.5, 1.5) = 1 -> 1.4826; IQR (q25 1.75,
    # q75 5.25) 3.5 / 1.349 = 2.594; sqrt(2.5) = 1.58: spread 2.594; with outlier_z = 2 the bar is
    # 2.5 + 5.19 = 7.69, so database image 0 (12 inliers, exactly min_inliers) is verified and moves first:
    # score 1 + (1 + min(12, 12)) + 0.7 / 2 = 14.35; the others keep their order, 1 + relevance / 2.
    # query 1 leads by 0.79 > skip_margin 0.5: confident, not verified (its image 0 would be).
    rerank = FusedReranker(top_n=4, verify=verify, min_inliers=12, outlier_z=2.0, skip_margin=0.5)
    new_ids, new_scores = rerank(np.arange(2), ids, scores)
    assert new_ids.tolist() == [[0, 5, 7, 9], [1, 2, 0, 3]]
    np.testing.assert_allclose(new_scores[0], [14.35, 1.45, 1.4, 1.3], rtol=1e-6)
    np.testing.assert_array_equal(new_scores[1], scores[1])
    assert rerank.verified_queries == 1


# ----------------------------------------------------------------------------------------- trust allowlist


def test_trust_refuses_non_optimizer_classes_in_torch_optim_and_os_classes_by_alias() -> None:
    from siamese_retrieval.trust import is_allowed

    # classes that merely live in the scheduler module's namespace are no schedulers
    for name in ("Counter", "Tensor", "Optimizer", "partial"):
        assert not is_allowed(f"torch.optim.lr_scheduler.{name}"), name
    assert is_allowed("torch.optim.lr_scheduler.StepLR")
    # pathlib.Path re-exported by a harmless module is still an operating-system class, allowed or not
    alias = "siamese_retrieval.io_utils.Path"
    assert not is_allowed(alias, allow=[alias])
    assert is_allowed("collections.OrderedDict", allow=["collections.OrderedDict"])


# ----------------------------------------------------------------------------------------- cache atomicity


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    from siamese_retrieval.io_utils import atomic_file, atomic_write_text

    target = tmp_path / "cache.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["cache.json"]
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half of a third vers")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["cache.json"]  # no temporary left


def test_a_live_writers_temporary_is_not_removed(tmp_path: Path) -> None:
    from siamese_retrieval.io_utils import make_temp_dir, remove_stale_temporaries

    target = tmp_path / "cache"
    mine = make_temp_dir(target)  # .cache.tmp-<random>-<this pid>: this process is alive
    child = subprocess.Popen(["true"])
    child.wait()  # a finished (dead) writer
    dead = tmp_path / f".cache.tmp-abc-{child.pid}"
    dead.mkdir()
    remove_stale_temporaries(target)
    assert mine.is_dir() and not dead.exists()


# ----------------------------------------------------------------------------------------- checkpoint inputs


class _Opens:
    """Unpickling this calls open(path, "w"): what weights_only=True must refuse to do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_read_checkpoint_checks_every_target_and_loads_weights_only(tmp_path: Path) -> None:
    from siamese_retrieval.checkpoints import read_checkpoint
    from siamese_retrieval.errors import UserError

    victim = tmp_path / "victim.txt"
    encoder = {"_target_": "siamese_retrieval.models.cnn.PlainCNN"}
    bad = tmp_path / "inputs.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": encoder, "inputs": {
        "_target_": "builtins.open", "file": str(victim), "mode": "w"}}}, bad)
    with pytest.raises(UserError, match=r"refusing to instantiate inputs\._target_='builtins\.open'"):
        read_checkpoint(bad)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": encoder}}, good)
    assert read_checkpoint(good)["hyper_parameters"]["encoder"] == encoder
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": encoder}, "x": _Opens(str(victim))}, pickled)
    with pytest.raises(UserError, match="is not a loadable torch checkpoint"):
        read_checkpoint(pickled)
    assert not victim.exists()


def test_checkpoint_inputs_are_built_with_the_users_allow_list() -> None:
    from siamese_retrieval.checkpoints import LoadedCheckpoint
    from siamese_retrieval.trust import UntrustedTargetError

    cfg = {"_target_": "collections.OrderedDict"}
    allowed = LoadedCheckpoint(Path("x.ckpt"), None, cfg, {}, ("collections.OrderedDict",))  # type: ignore[arg-type]
    assert isinstance(allowed.build_inputs(), OrderedDict)
    with pytest.raises(UntrustedTargetError, match="checkpoint x.ckpt: inputs: refusing"):
        LoadedCheckpoint(Path("x.ckpt"), None, cfg, {}).build_inputs()  # type: ignore[arg-type]
