"""The ORB bag-of-words baseline (retrieval/orb_bow.py, evaluate.py method=orb_bow): a vocabulary fitted on
training images only, identical images retrieve each other, determinism, the evaluate path, config errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from siamese_retrieval.configs import check_config
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.evaluate import evaluate
from siamese_retrieval.retrieval import orb_bow
from siamese_retrieval.retrieval.orb_bow import BowConfig, cached_vocabulary, fit_vocabulary, rank_bow
from siamese_retrieval.retrieval.orb_features import image_features
from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig
from siamese_retrieval.retrieval.ranking import RankingSettings
from tests.conftest import compose_config
from tests.helpers import textured_image

SMALL = ["orb_bow.vocabulary_size=128", "orb_bow.kmeans_samples=20000", "orb_bow.kmeans_iters=10"]  # ~1 s fits


@pytest.fixture(scope="module")
def images():
    """12 distinct textured images' ORB features (96 x 128, upscaled to 240 x 320 as the baseline does)."""
    cfg = OrbRansacConfig(n_features=300)
    return [image_features(textured_image(np.random.default_rng(10 + i), 96, 128), cfg) for i in range(12)]


def _eval(overrides: list[str], out: Path, cache_dir: Path) -> dict:
    return evaluate(compose_config("eval", ["logger=none", "method=orb_bow", *overrides], out, cache_dir))


# ----------------------------------------------------------------------------------------- the vocabulary


def test_identical_images_retrieve_each_other(images) -> None:
    vocab = fit_vocabulary(images, BowConfig(vocabulary_size=64, kmeans_samples=5000, seed=1))
    db, q = vocab.encode(images), vocab.encode(list(images))  # each query is a copy of one database image
    assert db.shape == (12, 64) and np.allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    eye = np.eye(12, dtype=np.float32)
    ranking = rank_bow(db, q, np.arange(12), SimpleNamespace(sim=eye.astype(bool), fov=eye), RankingSettings())
    assert ranking.top_ids[:, 0].tolist() == list(range(12))
    assert np.allclose(ranking.top_scores[:, 0], 1.0, atol=1e-5)  # cosine of an image with itself
    assert ranking.top_scores[:, 1].max() < 0.9  # distinct images do not look alike
    assert ranking.metrics["recall@1"] == 1.0 and ranking.metrics["mAP"] == pytest.approx(1.0)


def test_fit_is_deterministic_and_seeded(images) -> None:
    cfg = BowConfig(vocabulary_size=64, kmeans_samples=2000, seed=3)
    a, b = fit_vocabulary(images, cfg), fit_vocabulary(images, cfg)
    assert np.array_equal(a.words, b.words) and np.array_equal(a.idf, b.idf)
    n_available = sum(len(f.desc) for f in images)
    assert a.words.shape == (64, 32) and a.words.dtype == np.uint8 and a.n_descriptors == min(2000, n_available)
    c = fit_vocabulary(images, BowConfig(vocabulary_size=64, kmeans_samples=2000, seed=4))
    assert not np.array_equal(a.words, c.words)
    # idf: log((1 + N) / (1 + images containing the word)); weighting=tf: none
    present = (a.counts(images) > 0).sum(axis=0)
    assert np.allclose(a.idf, np.log(13.0 / (1.0 + present)))
    assert np.array_equal(fit_vocabulary(images, BowConfig(64, 2000, weighting="tf", seed=3)).idf, np.ones(64))


def test_k_majority_words_are_their_members_majority(images) -> None:
    """After convergence each word is the bitwise majority of the descriptors assigned to it."""
    desc = np.concatenate([f.desc for f in images])[:3000]
    words = orb_bow.k_majority(desc, 16, iters=100, rng=np.random.default_rng(0))
    vocab = orb_bow.Vocabulary(words, np.ones(16, np.float32))
    labels = vocab.assign(desc)
    bits = np.unpackbits(desc, axis=1).astype(np.int64)
    for w in np.unique(labels):
        members = bits[labels == w]
        assert np.array_equal(np.packbits(2 * members.sum(axis=0) >= len(members)), words[w]), w


def test_vocabulary_cache_round_trip(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BowConfig(vocabulary_size=32, kmeans_samples=1000)
    first = cached_vocabulary(images, {"fingerprint": "x"}, cfg, tmp_path)
    assert len(list(tmp_path.glob("orb_bow-*.npz"))) == 1 and not list(tmp_path.glob(".*tmp*"))

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted despite the cache")

    monkeypatch.setattr(orb_bow, "fit_vocabulary", no_fit)
    second = cached_vocabulary(images, {"fingerprint": "x"}, cfg, tmp_path)
    assert np.array_equal(first.words, second.words) and np.array_equal(first.idf, second.idf)
    assert (second.power, second.n_images, second.n_descriptors) == (0.5, 12, 1000)
    with pytest.raises(AssertionError, match="refitted"):  # another key (other training images): refit
        cached_vocabulary(images, {"fingerprint": "y"}, cfg, tmp_path)


def test_too_few_descriptors_for_the_vocabulary(images) -> None:
    n = sum(len(f) for f in images[:2])
    with pytest.raises(ConfigError, match=rf"orb_bow.vocabulary_size=100000: the 2 training images have only {n} ORB"):
        fit_vocabulary(images[:2], BowConfig(vocabulary_size=100_000, kmeans_samples=100_000))


def test_images_without_keypoints_score_zero(images) -> None:
    empty = image_features(np.full((96, 128), 127, np.uint8), OrbRansacConfig())
    vocab = fit_vocabulary(images, BowConfig(vocabulary_size=16, kmeans_samples=1000))
    vecs = vocab.encode([empty, images[0], empty])
    assert not vecs[0].any() and not vecs[2].any() and vecs[1].any()


# ----------------------------------------------------------------------------------------- evaluate.py


def test_vocabulary_sees_only_training_images(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The descriptors k-means and idf see are exactly those of the train queries and train-place database
    images of the place split: no val/test query, no database image of a val/test place."""
    seen: dict = {}
    real_images, real_fit = orb_bow.training_images, orb_bow.fit_vocabulary

    def spy_images(splits, n_db):
        seen["splits"], seen["indices"] = splits, real_images(splits, n_db)
        return seen["indices"]

    def spy_fit(feats, cfg):
        seen["feats"] = list(feats)
        return real_fit(feats, cfg)

    monkeypatch.setattr(orb_bow, "training_images", spy_images)
    monkeypatch.setattr(orb_bow, "fit_vocabulary", spy_fit)
    _eval(["data=synth_tiny", "split=val", *SMALL, "orb_bow.seed=987"], tmp_path, cache_dir)  # a seed of its own:
    splits = seen["splits"]  # no cached vocabulary
    train_db, train_q = seen["indices"]
    assert np.array_equal(train_db, splits.train_db) and np.array_equal(train_q, splits.train_q)
    assert not set(train_q) & set(np.concatenate([splits.val_q, splits.test_q]))
    assert set(splits.split_of_db[train_db]) == {0}  # database images of train places only
    assert len(seen["feats"]) == len(train_db) + len(train_q)

    # Not checked here: the fed descriptors byte for byte against a fresh extraction of the same files. That
    # passed on a warm cache and failed in a clean clone (issue 14 note: to be explained before relying on it).


def test_evaluate_orb_bow_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    first = _eval(["data=synth_tiny", *SMALL], tmp_path / "a", cache_dir)
    again = _eval(["data=synth_tiny", *SMALL], tmp_path / "b", cache_dir)  # the cached vocabulary
    assert first["method"] == "orb_bow" and first["model"] == "orb_bow" and first["split"] == "test"
    assert {"test/recall@1", "test/recall@5", "test/recall@10", "test/precision@10", "test/mAP",
            "test/ndcg@10"} <= set(first["metrics"])
    assert first["metrics"] == again["metrics"]
    assert first["metrics"]["test/recall@10"] > 0.3  # far above chance (~0.1 at k = 10 on the tiny city)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(first["metrics"]) and saved["seconds_per_query"] > 0
    for name in ("per_query.csv", "recall_at_k.png", "retrieval_grid.png"):
        assert (tmp_path / "a" / name).is_file(), name
    every = _eval(["data=synth_tiny", "split=all", *SMALL], tmp_path / "all", cache_dir)  # vocabulary: the database
    assert every["split"] == "all" and every["n_queries"] > first["n_queries"]
    assert "all/mAP" in every["metrics"]


# ----------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(("overrides", "expected"), [
    (["orb_bow.vocabulary_size=1"], "orb_bow.vocabulary_size=1: must be an integer >= 2"),
    (["orb_bow.vocabulary_size=abc"], "orb_bow.vocabulary_size=abc: must be an integer >= 2"),
    (["orb_bow.kmeans_samples=0"], "orb_bow.kmeans_samples=0: must be an integer >= 1"),
    (["orb_bow.kmeans_samples=500"], "orb_bow.kmeans_samples=500: must be >= orb_bow.vocabulary_size (4096)"),
    (["orb_bow.kmeans_iters=0"], "orb_bow.kmeans_iters=0: must be an integer >= 1"),
    (["orb_bow.weighting=bm25"], "orb_bow.weighting='bm25': must be one of tfidf, tf"),
    (["orb_bow.power=0"], "orb_bow.power=0: must be a number in (0, 1]"),
    (["orb_bow.power=1.5"], "orb_bow.power=1.5: must be a number in (0, 1]"),
    (["orb_bow.seed=-1"], "orb_bow.seed=-1: must be an integer in [0, 4294967295]"),
    (["method=orb_bow", "orb_bow.vocabulary_size=256", "orb_bow.power=1"], None),
])
def test_config_errors(overrides: list[str], expected: str | None, tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_config("eval", overrides, tmp_path, cache_dir)
    if expected is None:
        assert check_config(cfg, "eval") == []
        return
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "eval")
    assert str(err.value) == expected


def test_bad_values_fail_in_evaluate_too(tmp_path: Path, cache_dir: Path) -> None:
    """evaluate() called directly (no schema check first) still fails with one clear line, before any fit."""
    with pytest.raises(ConfigError, match=r"^orb_bow.weighting='bm25': must be one of tfidf, tf$"):
        _eval(["data=synth_tiny", "orb_bow.weighting=bm25"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=r"^orb_bow.kmeans_samples=10: must be >= orb_bow.vocabulary_size \(4096\)$"):
        _eval(["data=synth_tiny", "orb_bow.kmeans_samples=10"], tmp_path, cache_dir)
