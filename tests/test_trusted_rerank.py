"""rerank=fused's trust rule (retrieval/trusted_rerank.py): evidence, the per-query decision, and the stress sets."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from siamese_retrieval.retrieval.orb_ransac import EVIDENCE, OrbRansacConfig, pair_evidence
from siamese_retrieval.retrieval.trusted_rerank import (
    FEATURES,
    SECOND_OPINION,
    TrustedReranker,
    TrustRule,
    fit_logistic,
    fit_rule,
    fit_signed,
    load_rule,
    query_features,
    save_rule,
)
from tests.conftest import ROOT, compose_config

STRESS = ROOT / "experiments" / "beat_verification" / "stress_sets.py"


def ev(inliers: float, ratio: float = 0.5, cover: float = 0.5, one: float = 0.9, sane: float = 1.0) -> list[float]:
    return [inliers, ratio, cover, one, sane]


def test_query_features_known_answer() -> None:
    evidence = np.array([
        [ev(10, 0.2, 0.25), ev(40, 0.8, 0.75, 0.5), ev(30), ev(0, 0, 0, 0, 0)],  # challenger: rank 2 (40 inliers)
        [ev(0, 0, 0, 0, 0)] * 4,  # no homography anywhere
        [ev(20), ev(20), ev(5), ev(5)],  # a tie: the model's order wins, margin 0, crowd 1/3
    ], np.float32)
    best, features, verified = query_features(evidence)
    assert best.tolist() == [1, 0, 0] and verified.tolist() == [True, False, True]
    # ratio, cover, 1:1, sane of the challenger; margin (40 - 30) / 40; crowd: 30 >= 20 of 3 others
    np.testing.assert_allclose(features[0], [0.8, 0.75, 0.5, 1.0, 0.25, 1 / 3], rtol=1e-6)
    assert not features[1].any()
    np.testing.assert_allclose(features[2, 4:], [0.0, 1 / 3], rtol=1e-6)


def test_a_second_verifiers_agreement_is_one_more_feature() -> None:
    """rerank=learned_matches: a 6th evidence column (the learned verifier's score) adds `agree`, its score of the
    RANSAC challenger over its best score; the rule then needs it: a disagreeing verifier vetoes the promotion."""
    def row(learned: list[float]) -> list[list[float]]:
        return [ev(5) + [learned[0]], ev(50, cover=0.9) + [learned[1]], ev(3) + [learned[2]]]

    evidence = np.array([row([2.0, 8.0, 1.0]), row([8.0, 2.0, 1.0]), row([0.0, 0.0, 0.0])], np.float32)
    best, features, _ = query_features(evidence)
    assert best.tolist() == [1, 1, 1] and features.shape == (3, len(SECOND_OPINION))
    np.testing.assert_allclose(features[:, -1], [1.0, 0.25, 0.0], rtol=1e-6)
    trust = TrustRule((0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 10.0), -9.0, "test", 100, 0.5, 0.9, SECOND_OPINION)
    rerank = TrustedReranker(3, lambda rows, cand: evidence[rows], trust)
    ids = np.tile(np.arange(10, 15), (3, 1))
    new_ids, _ = rerank(np.arange(3), ids, np.tile(np.linspace(0.9, 0.5, 5, dtype=np.float32), (3, 1)))
    assert new_ids[:, 0].tolist() == [11, 10, 10]
    assert "agree 1.00" in rerank.decisions[0][1] and rerank.decisions[1][1].startswith("abstained: challenger")


def test_logistic_fit_separates_and_keeps_the_signs() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (400, 2))
    y = (x[:, 0] + 0.1 * rng.normal(size=400) > 0.5).astype(float)
    w, b = fit_logistic(x, y)
    assert w[0] > 5 and abs(w[1]) < 1.5 and -b / w[0] == pytest.approx(0.5, abs=0.1)
    # feature 1 anti-correlated with y, but its sign says it may only help: it is dropped, feature 0 kept
    x[:, 1] = 1 - x[:, 0] + 0.05 * rng.normal(size=400)
    w, _ = fit_signed(x, y, signs=(1, 1))
    assert w[1] == 0.0 and w[0] > 5


def rule(weights: tuple[float, ...], bias: float) -> TrustRule:
    return TrustRule(weights, bias, "test", 100, 0.5, 0.9)


def test_trusted_reranker_promotes_only_what_it_trusts() -> None:
    # trust the challenger when coverage is high (weight 10 on coverage, bias -5: p >= 0.5 iff coverage >= 0.5)
    trust = rule((0.0, 10.0, 0.0, 0.0, 0.0, 0.0), -5.0)
    table = {0: [ev(5), ev(50, cover=0.9), ev(3)],  # trusted challenger at rank 2
             1: [ev(5), ev(50, cover=0.1), ev(3)],  # challenger with little coverage: abstain
             2: [ev(60, cover=0.9), ev(5), ev(3)],  # the model's first is the best verified: kept
             3: [ev(0, 0, 0, 0, 0)] * 3}  # no homography
    evidence = lambda rows, cand: np.array([table[int(r)] for r in rows], np.float32)  # noqa: E731
    rerank = TrustedReranker(3, evidence, trust)
    ids = np.tile(np.arange(10, 15), (4, 1))
    scores = np.tile(np.linspace(0.9, 0.5, 5, dtype=np.float32), (4, 1))
    new_ids, new_scores = rerank(np.arange(4), ids, scores)
    assert new_ids[0].tolist() == [11, 10, 12, 13, 14]
    assert new_ids[1:].tolist() == ids[1:].tolist()
    assert (np.diff(new_scores, axis=1) <= 0).all()  # scores stay sorted, the top N above the rest
    decided = {row: d for row, d in rerank.decisions.items()}
    assert [decided[r][0] for r in range(4)] == [True, False, False, False]
    assert decided[0][1].startswith("re-ranked: challenger at model rank 2 trusted, p=0.98 (ratio 0.50, cover 0.90")
    assert decided[1][1].startswith("abstained: challenger at model rank 2 not trusted, p=0.02")
    assert decided[2][1].startswith("kept: the model's first is the best verified")
    assert decided[3][1] == "abstained: no homography among the top candidates"


def test_a_challenger_far_down_the_models_list_abstains() -> None:
    trust = rule((0.0, 10.0, 0.0, 0.0, 0.0, 0.0), -5.0)
    evidence = lambda rows, cand: np.array([[ev(5)] * 11 + [ev(50, cover=0.9)]], np.float32)  # noqa: E731
    ids, scores = np.arange(12)[None], np.linspace(1, 0.5, 12, dtype=np.float32)[None]
    far = TrustedReranker(12, evidence, trust, max_rank=10)
    assert far(np.array([0]), ids, scores)[0].tolist() == ids.tolist()
    assert far.decisions[0][1].startswith("abstained: challenger at model rank 12 is below rank 10, p=0.98")
    near = TrustedReranker(12, evidence, trust, max_rank=12)
    assert near(np.array([0]), ids, scores)[0][0, 0] == 11


def test_too_little_to_learn_from_means_no_rule_and_never_trusts() -> None:
    from siamese_retrieval.retrieval.trusted_rerank import NEVER, fitted_rule

    evidence = lambda rows, cand: np.array([[ev(30, cover=0.8)] * cand.shape[1] for _ in rows], np.float32)  # noqa
    few = fitted_rule(evidence, np.arange(5), [np.arange(4)] * 5, lambda q, c: c == 0, "five queries", width=4)
    assert few is None  # 5 queries: under the 20 a rule is fitted from
    one_label = fitted_rule(evidence, np.arange(30), [np.arange(4)] * 30, lambda q, c: c >= 0, "all right", width=4)
    assert one_label is None
    rerank = TrustedReranker(3, lambda rows, cand: np.array([[ev(5), ev(90, cover=1.0), ev(3)]], np.float32), NEVER)
    ids = np.arange(5)[None]
    assert rerank(np.array([0]), ids, np.linspace(1, 0.5, 5, dtype=np.float32)[None])[0].tolist() == ids.tolist()
    assert rerank.decisions[0][1].startswith("abstained: challenger at model rank 2 not trusted, p=0.00")


def test_rule_file_round_trip_and_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = fit_rule(np.array([[0.9, 0.8, 1, 1, 0.9, 0], [0.1, 0.1, 0.5, 0, 0.1, 0.8]] * 20), np.array([1.0, 0.0] * 20),
                 "test")
    path = tmp_path / "trust-rule.json"
    save_rule(r, path)
    assert load_rule(path) == r and r.train_accuracy == 1.0
    second = fit_rule(np.array([[0.9, 0.8, 1, 1, 0.9, 0, 1.0], [0.1, 0.1, 0.5, 0, 0.1, 0.8, 0.2]] * 20),
                      np.array([1.0, 0.0] * 20), "test")
    save_rule(second, tmp_path / "second.json")
    assert second.features == SECOND_OPINION and load_rule(tmp_path / "second.json") == second
    for text in ("not json", json.dumps({**json.loads(path.read_text()), "weights": ["__import__('os')"] * 6}),
                 json.dumps({**json.loads(path.read_text()), "bias": float("nan")})):
        path.write_text(text)
        with caplog.at_level(logging.WARNING):
            assert load_rule(path) is None
        assert "not a usable trust rule" in caplog.text


def test_pair_evidence_of_an_image_with_itself_and_with_noise(tmp_path: Path) -> None:
    import cv2

    from siamese_retrieval.retrieval.orb_features import extract_features

    rng = np.random.default_rng(0)
    textured = cv2.GaussianBlur(rng.integers(0, 255, (240, 320), dtype=np.uint8), (3, 3), 0)
    noise = rng.integers(0, 255, (240, 320), dtype=np.uint8)
    for name, image in (("a.png", textured), ("b.png", noise)):
        cv2.imwrite(str(tmp_path / name), image)
    cfg = OrbRansacConfig()
    a, b = extract_features([tmp_path / "a.png", tmp_path / "b.png"], cfg, 1)
    same = dict(zip(EVIDENCE, pair_evidence(a, a, cfg)))
    assert same["inliers"] > 100 and same["inlier_ratio"] == pytest.approx(1.0)
    assert same["coverage"] >= 0.75 and same["one_to_one"] > 0.95 and same["sane"] == 1.0
    other = dict(zip(EVIDENCE, pair_evidence(a, b, cfg)))
    assert other["inliers"] < 0.1 * same["inliers"]


@pytest.fixture(scope="module")
def stress_module():
    spec = importlib.util.spec_from_file_location("stress_sets", STRESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["stress_sets"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stress_sets(stress_module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("stress")
    return {"repetitive": stress_module.repetitive_set(out / "repetitive", places_per_texture=3),
            "viewpoint": stress_module.viewpoint_set(out / "viewpoint", places_per_photo=2, distractors_per_photo=2)}


def _evidence_against_all(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.retrieval.orb_features import extract_features

    ds = read_dataset(root)
    cfg = OrbRansacConfig()
    feats = extract_features([ds.root / p for p in ds.db_paths + ds.q_paths], cfg, 2)
    db, qs = feats[: ds.n_db], feats[ds.n_db :]
    evidence = np.stack([[pair_evidence(q, d, cfg) for d in db] for q in qs])
    return evidence, np.asarray(ds.sim, bool)


def test_repetitive_stress_set_gives_wrong_places_many_inliers(stress_sets: dict[str, Path]) -> None:
    """The failure the rule guards against: on a repetitive wall, other places of the same wall verify too (a
    homography with at least 12 inliers, what the old rule called verified), several per query."""
    evidence, sim = _evidence_against_all(stress_sets["repetitive"])
    inliers = evidence[..., 0]
    wrong = np.where(sim, 0, inliers)
    assert len(sim) == 18
    assert (wrong.max(axis=1) >= 12).mean() >= 0.8
    assert (wrong >= 12).sum(axis=1).mean() >= 1.5  # a crowd: the other places of the query's wall


def test_viewpoint_stress_set_is_solved_by_verification(stress_sets: dict[str, Path]) -> None:
    """Strong viewpoint changes on textured scenes: the right place has the most inliers for most queries."""
    evidence, sim = _evidence_against_all(stress_sets["viewpoint"])
    best = evidence[..., 0].argmax(axis=1)
    assert len(sim) == 21 and sim[np.arange(len(sim)), best].mean() >= 0.7


@pytest.fixture(scope="module")
def tiny_reference(cache_dir: Path):
    """The tiny city and its place split: a small stand-in for the synthetic city's reference training set."""
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.data.splits import split_by_place
    from siamese_retrieval.data.synth import SynthConfig, ensure_city

    dataset = read_dataset(ensure_city(cache_dir, SynthConfig.from_preset("tiny", seed=0)), check="exists")
    return dataset, split_by_place(dataset, fractions=(0.6, 0.2, 0.2), cell_size_m=1000.0, seed=0)


def test_fused_on_a_stress_set_with_split_all_writes_each_decision(stress_sets: dict[str, Path], tiny_checkpoint: Path,
                                                                   tiny_reference, tmp_path: Path, cache_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """split=all: the rule comes from the reference training set (here the tiny city, to keep the test fast), is
    cached, and per_query.csv says for every query whether it was re-ranked and why."""
    from siamese_retrieval import evaluate as evaluate_module
    from siamese_retrieval.evaluate import evaluate

    monkeypatch.setattr(evaluate_module, "reference_training_set", lambda cache: tiny_reference)
    rules_before = set(cache_dir.glob("trust-rule-*.json"))
    cfg = compose_config("eval", ["data=msls_city", f"data.root={stress_sets['viewpoint']}", "split=all",
                                  f"ckpt_path={tiny_checkpoint}", "rerank=fused", "logger=none"], tmp_path / "run",
                         cache_dir)
    metrics = evaluate(cfg)["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "per_query.csv")))
    assert len(rows) == 21 and {r["reranked"] for r in rows} <= {"0", "1"}
    assert all(r["why"].split(":")[0] in ("re-ranked", "abstained", "kept") for r in rows)
    assert sum(r["reranked"] == "1" for r in rows) == round(metrics["all/rerank/reranked_fraction"] * 21)
    assert all("p=" in r["why"] or r["why"].endswith("no homography among the top candidates") for r in rows)
    fitted = set(cache_dir.glob("trust-rule-*.json")) - rules_before
    assert len(fitted) <= 1 and set(cache_dir.glob("trust-rule-*.json")), "the fitted rule is cached"
    rules = [load_rule(p) for p in cache_dir.glob("trust-rule-*.json")]  # rerank=learned_matches' too: 7 features
    assert any(r is not None and r.features == FEATURES for r in rules)


def test_retrieve_with_fused_reports_each_querys_decision(stress_sets: dict[str, Path], tiny_checkpoint: Path,
                                                          tiny_reference, tmp_path: Path, cache_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from siamese_retrieval import retrieve as retrieve_module

    monkeypatch.setattr(retrieve_module, "reference_training_set", lambda cache: tiny_reference)
    root = stress_sets["viewpoint"]
    cfg = compose_config("retrieve", ["data=msls_city", f"data.root={root}", f"ckpt_path={tiny_checkpoint}",
                                      f"query={root / 'q_0000.png'}", "rerank=fused", "top_k=3", "output=json",
                                      "grid.dir=null", "cache=false"], tmp_path / "run", cache_dir)
    query = retrieve_module.retrieve(cfg)["queries"][0]
    assert isinstance(query["reranked"], bool) and len(query["results"]) == 3
    assert query["why"].split(":")[0] in ("re-ranked", "abstained", "kept")
