"""rerank=learned_matches (retrieval/learned_matches.py): the learned match verifier.

The network is permutation-invariant in its matches and blind to padding; the per-match features are right
on an image and its shifted copy; fitting writes a tensors-only cache whose weights give the same scores; and
evaluate.py re-ranks with it end to end on the tiny city.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from siamese_retrieval.errors import ConfigError
from siamese_retrieval.retrieval import learned_matches as lm
from siamese_retrieval.retrieval import verifier_fit as vf
from siamese_retrieval.retrieval.orb_features import Features, OrbFeatureConfig, cached_features, image_features
from tests.conftest import compose_config
from tests.helpers import textured_image

TINY_TRAIN = ["rerank.train.epochs=2", "rerank.train.lookalikes=2", "rerank.network.hidden=8",
              "rerank.network.blocks=1"]


def _net(pool: str, seed: int = 0) -> lm.MatchNet:
    torch.manual_seed(seed)
    return lm.MatchNet(lm.NetworkConfig(hidden=16, blocks=2, pool=pool)).eval()


@pytest.mark.parametrize("pool", ("inliers", "learned"))
def test_scores_do_not_depend_on_the_order_of_the_matches(pool: str) -> None:
    net = _net(pool)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, lm.N_INPUTS, generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    with torch.no_grad():
        logits, pair = net(x, mask)
        perm = torch.randperm(20, generator=g)
        logits_p, pair_p = net(x[:, perm], mask[:, perm])
    torch.testing.assert_close(pair_p, pair, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_p, logits[:, perm], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(pair).all()


@pytest.mark.parametrize("pool", ("inliers", "learned"))
def test_padded_matches_and_batch_neighbours_change_nothing(pool: str) -> None:
    with torch.no_grad():
        _padding_case(_net(pool), pool)


def _padding_case(net: lm.MatchNet, pool: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, lm.N_INPUTS, generator=g)
    alone_logits, alone = net(x, torch.ones(1, 7, dtype=torch.bool))
    # the same pair padded to 30 with garbage, next to two other pairs (one of them with no match at all)
    big = torch.randn(3, 30, lm.N_INPUTS, generator=g) * 100
    big[1, :7] = x[0]
    mask = torch.zeros(3, 30, dtype=torch.bool)
    mask[0, :25], mask[1, :7] = True, True
    logits, pair = net(big, mask)
    torch.testing.assert_close(pair[1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1, :7], alone_logits[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(pair).all()  # a pair with no match gets a finite score
    scores = net.pair_scores(pair)
    assert (scores >= 0).all()
    if pool == "inliers":
        assert float(scores[2]) == pytest.approx(0.0, abs=1e-9)


def _shifted_pair(dx: int = 24, dy: int = 10) -> tuple[Features, Features, np.ndarray]:
    img = textured_image(np.random.default_rng(0), 240, 320)
    shifted = cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, dy]]), (320, 240), borderMode=cv2.BORDER_REFLECT)
    cfg = OrbFeatureConfig(n_features=300)
    return image_features(img, cfg), image_features(shifted, cfg), img


def test_per_match_features_of_an_image_and_its_shifted_copy() -> None:
    dx, dy = 24, 10
    a, b, img = _shifted_pair(dx, dy)
    assert a.wh.tolist() == [320.0, 240.0] and len(a) > 100  # 240 x 320: no resizing, so pixels are pixels
    other = image_features(textured_image(np.random.default_rng(9), 240, 320), OrbFeatureConfig(n_features=300))
    mt = lm.match_features(a, [b, None, other], lm.MatchingConfig(ratio=0.9, max_matches=128))
    assert mt.x.shape == (3, 128, lm.N_INPUTS) and mt.mask.shape == (3, 128)
    assert not mt.mask[1].any() and (mt.qi[1] == -1).all()  # no candidate: no match
    valid = mt.mask[0]
    assert valid.sum() >= 40 and valid.sum() > 3 * mt.mask[2].sum()
    assert valid[: valid.sum()].all()  # matches are packed at the front
    x = mt.x[0, valid]
    shift = np.stack([x[:, 2] - x[:, 0], x[:, 3] - x[:, 1]], axis=1) * [320, 240]
    good = np.abs(shift - [dx, dy]).max(axis=1) < 1.5
    assert good.mean() > 0.9  # the matched points moved by the shift
    g = x[good]
    np.testing.assert_allclose(g[:, 6], 1.0, atol=0.02)  # cos(angle difference): same orientation
    np.testing.assert_allclose(g[:, 7], 0.0, atol=0.2)  # sin
    assert np.mean(np.abs(g[:, 8]) < 1e-5) > 0.95  # log size ratio: same scale (a few cross pyramid levels)
    assert np.all(g[:, 4] <= 0.25) and np.all(g[:, 5] < 0.9)  # small Hamming distances, ratio test passed
    assert np.all(np.diff(x[:, 5]) >= 0)  # best ratio first
    # the features are the stated quantities of the matched keypoints
    qi, di = mt.qi[0, valid], mt.di[0, valid]
    np.testing.assert_allclose(x[:, 0], a.points[qi, 0] / 320, rtol=1e-6)
    np.testing.assert_allclose(x[:, 3], b.points[di, 1] / 240, rtol=1e-6)
    ham = np.unpackbits(a.desc[qi] ^ b.desc[di], axis=1).sum(axis=1)
    np.testing.assert_allclose(x[:, 4], ham / 256, rtol=1e-6)
    # mutual: each candidate keypoint is matched once at most
    assert len(np.unique(di)) == len(di)


def test_matching_of_empty_and_single_feature_images() -> None:
    a, _, _ = _shifted_pair()
    blank = image_features(np.full((96, 128), 127, np.uint8))
    assert len(blank) == 0
    for q, cands in ((blank, [a]), (a, [blank, blank]), (a, [])):
        mt = lm.match_features(q, cands)
        assert not mt.mask.any() and mt.x.shape == (len(cands), 128, lm.N_INPUTS)


@pytest.fixture(scope="module")
def tiny_city(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """The tiny city's datamodule, set up with its place split, and rerank=learned_matches's config."""
    from omegaconf import OmegaConf

    from siamese_retrieval.data.datamodule import build_datamodule, evaluation_data_config
    from siamese_retrieval.data.inputs import NoInputs
    from siamese_retrieval.evaluate import load_split

    out = tmp_path_factory.mktemp("lm_city")
    cfg = compose_config("eval", ["data=synth_tiny", "rerank=learned_matches", "logger=none", *TINY_TRAIN], out,
                         cache_dir)
    dm = build_datamodule(evaluation_data_config(cfg.data, None), NoInputs())
    load_split(dm, "test")
    return dm, lm.LearnedMatchesConfig.from_mapping(OmegaConf.to_container(cfg.rerank, resolve=True))


def _train_data(dm, cfg: lm.LearnedMatchesConfig, cache: Path) -> vf.TrainData:
    from siamese_retrieval.data.ground_truth import as_ground_truth

    ds = dm.dataset
    db_files, q_files = [ds.db_file(j) for j in range(ds.n_db)], [ds.query_file(i) for i in range(ds.n_query)]
    feats = cached_features(db_files + q_files, {"fingerprint": ds.fingerprint}, cfg.features, cache, 1)
    return vf.TrainData(feats[ds.n_db :], feats[: ds.n_db], q_files, db_files, dm.splits.train_q,
                        dm.splits.train_db, as_ground_truth(ds), {"fingerprint": ds.fingerprint})


def test_training_uses_the_train_split_and_writes_a_loadable_deterministic_cache(tiny_city, tmp_path: Path) -> None:
    dm, cfg = tiny_city
    data = _train_data(dm, cfg, tmp_path)
    pairs = vf.training_candidates(data, cfg.train)
    assert pairs and {q for q, _ in pairs} <= set(dm.splits.train_q.tolist())
    assert set(np.concatenate([c for _, c in pairs]).tolist()) <= set(dm.splits.train_db.tolist())
    net = vf.fit_or_load(data, cfg, tmp_path)
    files = list(tmp_path.glob("learned_matches-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))  # written atomically, no temporary left
    state = torch.load(files[0], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # data only, no pickled code
    loaded = vf.load_weights(files[0], cfg.network)
    rows, q_idx = np.arange(3), dm.splits.test_q[:3]
    candidates = np.tile(np.arange(6), (3, 1))
    candidates[0, -1] = -1  # FAISS's "no result"
    verify = lambda n: lm.LearnedVerifier(n, [data.q_feats[i] for i in q_idx], data.db_feats, cfg.matching)  # noqa
    scores = verify(net)(rows, candidates)
    assert scores.shape == (3, 6) and scores[0, -1] == 0 and np.all(scores >= 0)
    np.testing.assert_array_equal(verify(loaded)(rows, candidates), scores)
    again = vf.fit_or_load(data, cfg, tmp_path)  # a cache hit: no refit, the same weights
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    refit, _ = vf.fit(data, cfg)  # deterministic given the seed
    for k, v in refit.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # an architecture that does not fit the file: not loaded (refitted by fit_or_load)
    assert vf.load_weights(files[0], lm.NetworkConfig(hidden=cfg.network.hidden + 1, blocks=1)) is None


def test_reranker_orders_by_score_then_the_models_order() -> None:
    ids = np.array([[10, 11, 12, 13, 14]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    verify = lambda rows, cand: np.array([[0.0, 3.0, 0.0, 3.0, 9.0]])[:, : cand.shape[1]]  # noqa: E731
    new_ids, new_scores = lm.LearnedReranker(4, verify)(np.array([0]), ids, scores)
    assert new_ids[0].tolist() == [11, 13, 10, 12, 14]  # 14 is outside the top 4
    assert np.all(np.diff(new_scores[0, :4]) <= 0) and new_scores[0, 3] > new_scores[0, 4]
    new_ids, _ = lm.LearnedReranker(4, verify, model_weight=10.0)(np.array([0]), ids, scores)
    assert new_ids[0].tolist() == [11, 13, 10, 12, 14]  # 3 + 8 > 0 + 9 and 3 + 6 > 0 + 9 (tie: model order)
    with pytest.raises(ConfigError):
        lm.LearnedReranker(0, verify)


@pytest.mark.parametrize("change, message", [
    ({"network": {"pool": "mean"}}, "rerank.network.pool='mean': must be one of inliers, learned"),
    ({"train": {"labels": "fov"}}, "rerank.train.labels='fov': must be one of ransac, ransac_relevant"),
    ({"matching": {"ratio": 1.5}}, "rerank.matching.ratio=1.5: must be a number in (0, 1]"),
    ({"network": {"widht": 3}}, "widht"),
    ({"combine": "mean"}, "rerank.combine='mean': must be one of trusted, replace, fused"),
    ({"saturate": 4}, "rerank.saturate=4: must be >= rerank.min_inliers (12) or null"),
])
def test_bad_settings_are_one_line_config_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        lm.LearnedMatchesConfig.from_mapping({"name": "learned_matches", **change})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_evaluate_with_learned_matches_on_the_tiny_city(tiny_checkpoint: Path, tmp_path: Path, cache_dir: Path,
                                                        tiny_city, monkeypatch: pytest.MonkeyPatch) -> None:
    from siamese_retrieval import evaluate as evaluate_module
    from siamese_retrieval.evaluate import evaluate

    # max_seconds: a cache key no other test of this session shares, so the explicit fit below really fits
    overrides = ["data=synth_tiny", f"ckpt_path={tiny_checkpoint}", "rerank=learned_matches", "rerank.top_n=10",
                 "rerank.combine=replace", "logger=none", "rerank.train.max_seconds=119.5", *TINY_TRAIN]
    # the explicit command: a Lightning fit on the training split, logged (2 epochs) and cached, no checkpoint needed
    fitted = evaluate(compose_config("eval", ["fit_only=true", *(o for o in overrides if not o.startswith("ckpt_path"))],
                                           tmp_path / "fit", cache_dir))
    assert fitted == {"status": "fitted", "rerank": "learned_matches", "data": "synth_tiny"}
    logged = (tmp_path / "fit" / "verifier" / "metrics.csv").read_text().splitlines()
    assert logged[0].split(",")[:2] == ["epoch", "step"] and len(logged) == 3, logged  # a row per epoch
    assert (tmp_path / "fit" / "verifier" / "checkpoints" / "last.ckpt").is_file()
    assert len(list(cache_dir.glob("learned_matches-*.pt"))) >= 1 and not (tmp_path / "fit" / "metrics.json").exists()
    result = evaluate(compose_config("eval", overrides, tmp_path / "a", cache_dir))
    assert not (tmp_path / "a" / "verifier").exists()  # loaded from the cache: nothing fitted, nothing logged
    m = result["metrics"]
    assert result["method"] == "model+rerank_learned_matches"
    # the top 10 is permuted, never changed: precision@10 and recall@10 stay
    assert m["test/precision@10"] == pytest.approx(m["test/before_rerank/precision@10"], abs=1e-6)
    assert m["test/recall@10"] == pytest.approx(m["test/before_rerank/recall@10"], abs=1e-6)
    assert list(cache_dir.glob("learned_matches-*.pt"))  # fitted at first use and cached
    again = evaluate(compose_config("eval", overrides, tmp_path / "b", cache_dir))  # from the cache: same numbers
    assert again["metrics"] == result["metrics"]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["method"] == "model+rerank_learned_matches"
    # split=all has no training split: the verifier of the reference training set (the synthetic city's; here the
    # tiny city's, so that the test fits nothing new: its train split is the one fitted above, a cache hit)
    dm = tiny_city[0]
    monkeypatch.setattr(evaluate_module, "reference_training_set", lambda cache: (dm.dataset, dm.splits))
    before = sorted(cache_dir.glob("learned_matches-*.pt"))
    every = evaluate(compose_config("eval", overrides + ["split=all"], tmp_path / "c", cache_dir))["metrics"]
    assert sorted(cache_dir.glob("learned_matches-*.pt")) == before and not (tmp_path / "c" / "verifier").exists()
    assert every["all/precision@10"] == pytest.approx(every["all/before_rerank/precision@10"], abs=1e-6)
    # combine=fused reuses the fitted verifier (its cache key holds no combine knob); with a threshold no soft
    # inlier count reaches, nothing is verified and the ranking is exactly the model's
    fitted = sorted(cache_dir.glob("learned_matches-*.pt"))
    never = evaluate(compose_config("eval", overrides + ["rerank.combine=fused", "rerank.min_inliers=100000"],
                                    tmp_path / "d", cache_dir))["metrics"]
    assert sorted(cache_dir.glob("learned_matches-*.pt")) == fitted
    for name in ("recall@1", "recall@5", "mAP", "ndcg@10"):
        assert never[f"test/{name}"] == pytest.approx(never[f"test/before_rerank/{name}"], abs=1e-6)
    # combine=trusted (the default): the same verifier, split=all; the trust rule is fitted with the verifier's
    # agreement as a 7th feature and cached apart from rerank=fused's; every query's decision is in per_query.csv
    from siamese_retrieval.retrieval.trusted_rerank import SECOND_OPINION, load_rule

    rules = set(cache_dir.glob("trust-rule-*.json"))
    trusted = evaluate(compose_config("eval", [o for o in overrides if o != "rerank.combine=replace"] + ["split=all"],
                                      tmp_path / "t", cache_dir))["metrics"]
    assert sorted(cache_dir.glob("learned_matches-*.pt")) == fitted
    new_rules = [load_rule(p) for p in set(cache_dir.glob("trust-rule-*.json")) - rules]
    assert len(new_rules) == 1 and new_rules[0].features == SECOND_OPINION
    rows = list(csv.DictReader(open(tmp_path / "t" / "per_query.csv")))
    assert rows and all(r["why"].split(":")[0] in ("re-ranked", "abstained", "kept") for r in rows)
    assert sum(r["reranked"] == "1" for r in rows) == round(trusted["all/rerank/reranked_fraction"] * len(rows))
    assert trusted["all/recall@10"] == pytest.approx(trusted["all/before_rerank/recall@10"], abs=1e-6)
    with pytest.raises(ConfigError, match="rerank.combine='fused' needs rerank.network.pool='inliers'"):
        evaluate(compose_config("eval", overrides + ["rerank.combine=fused", "rerank.network.pool=learned"],
                                tmp_path / "e", cache_dir))
