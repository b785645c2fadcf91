"""The classical baseline's verification: ORB + Hamming ratio-test matches + RANSAC homography inliers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from siamese_retrieval.retrieval.orb_features import cached_features, extract_features, image_features
from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig, inlier_count, rerank_scores, score_matrix
from tests.helpers import textured_image


def _warp(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[12, 8], [w - 20, 15], [w - 6, h - 10], [18, h - 4]])  # perspective + shift
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT)


def test_warped_copy_ranks_first_among_distractors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = textured_image(rng, 240, 320)
    distractors = [textured_image(np.random.default_rng(100 + i), 240, 320) for i in range(8)]
    db_images = distractors[:4] + [base] + distractors[4:]  # the original sits in the middle of the database
    paths = []
    for i, img in enumerate(db_images + [_warp(base)]):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), img)
    cfg = OrbRansacConfig()
    feats = extract_features(paths, cfg, workers=2)
    scores = score_matrix([feats[-1]], feats[:-1], cfg, workers=2)
    assert scores.shape == (1, len(db_images))
    assert int(np.argmax(scores[0])) == 4
    assert scores[0, 4] >= 30 and scores[0, 4] > 3 * np.delete(scores[0], 4).max()
    # re-ranking candidates that put the original last brings its inliers along
    inliers = rerank_scores(np.array([[0, 1, 4, -1]]), [feats[-1]], feats[:-1], cfg, workers=1)
    assert inliers.shape == (1, 4) and inliers[0, 2] == scores[0, 4] and inliers[0, 3] == 0


def test_blank_and_tiny_images_score_zero() -> None:
    cfg = OrbRansacConfig()
    blank = image_features(np.full((96, 128), 127, np.uint8), cfg)
    assert len(blank) == 0
    textured = image_features(textured_image(np.random.default_rng(1), 96, 128), cfg)
    assert len(textured) > 100  # small images are upscaled to min_side before ORB
    assert inlier_count(blank, textured, cfg) == 0 and inlier_count(textured, blank, cfg) == 0
    assert score_matrix([blank], [textured, blank], cfg).tolist() == [[0.0, 0.0]]


def test_feature_cache_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), textured_image(rng, 96, 128))
    cfg = OrbRansacConfig(n_features=200)
    first = cached_features(paths, {"fingerprint": "x"}, cfg, tmp_path / "cache", workers=2)
    assert len(list((tmp_path / "cache").glob("orb-*.npz"))) == 1
    second = cached_features(paths, {"fingerprint": "x"}, cfg, tmp_path / "cache", workers=1)
    for a, b in zip(first, second):
        assert np.array_equal(a.points, b.points) and np.array_equal(a.desc, b.desc)
