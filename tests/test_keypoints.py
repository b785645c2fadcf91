"""ORB extraction (odd images, order, downscaling), its on-disk cache, and decoded image tensors."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from tests.helpers import make_dataset, textured_image
from siamese_retrieval.data import images as images_mod
from siamese_retrieval.data import keypoints as kp
from siamese_retrieval.data.dataset import read_dataset, write_gt
from siamese_retrieval.data.images import load_images
from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints, extract_orb
from siamese_retrieval.errors import DatasetError

CFG = OrbConfig()


@pytest.fixture
def gray() -> np.ndarray:
    return cv2.cvtColor(textured_image(np.random.default_rng(1), 192, 256), cv2.COLOR_BGR2GRAY)


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", n_streets=2, per_street=5, queries_per_street=4)


def assert_empty(result, n=CFG.n_keypoints):
    desc, geom, mask = result
    assert desc.shape == (n, 32) and desc.dtype == np.uint8 and not desc.any()
    assert geom.shape == (n, 4) and geom.dtype == np.float32 and not geom.any()
    assert mask.shape == (n,) and mask.dtype == bool and not mask.any()


# ----------------------------------------------------------------------------------------- one image


@pytest.mark.parametrize("shape", [(192, 256), (192, 256, 3), (192, 256, 4)])
def test_blank_image_gives_padded_masked_zeros(shape):
    assert_empty(extract_orb(np.full(shape, 128, np.uint8), CFG))


@pytest.mark.parametrize("shape", [(10, 10), (10, 10, 3), (1, 1), (0, 0), (40, 3000)])
def test_tiny_image_gives_padded_masked_zeros(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert_empty(extract_orb(img, CFG))


def test_grayscale_bgr_bgra_agree(gray):
    bgr = cv2.merge([gray, gray, gray])
    bgra = cv2.merge([gray, gray, gray, np.full_like(gray, 255)])
    ref = extract_orb(gray, CFG)
    assert ref[2].all()
    for img in (gray[:, :, None], bgr, bgra, gray.astype(np.uint16) * 257):
        for a, b in zip(ref, extract_orb(img, CFG)):
            np.testing.assert_array_equal(a, b)


def test_textured_image_gives_strongest_keypoints_in_order(gray):
    desc, geom, mask = extract_orb(gray, CFG)
    assert mask.all() and desc.any(axis=1).all()
    assert ((geom >= 0) & (geom <= 1)).all()
    kps, d = CFG.create().detectAndCompute(gray, None)
    resp = np.array([k.response for k in kps])
    top = np.argsort(-resp, kind="stable")[: CFG.n_keypoints]
    assert np.all(np.diff(resp[top]) <= 0)
    xy = np.array([kps[i].pt for i in top]) / [gray.shape[1], gray.shape[0]]
    np.testing.assert_allclose(geom[:, :2], xy, atol=1e-6)
    np.testing.assert_array_equal(desc, d[top])
    # deterministic, and n_keypoints is honoured
    np.testing.assert_array_equal(desc, extract_orb(gray, CFG)[0])
    assert extract_orb(gray, OrbConfig(n_keypoints=3))[0].shape == (3, 32)


def test_huge_image_is_downscaled():
    small = np.random.default_rng(0).integers(0, 256, (100, 150), dtype=np.uint8)
    huge = cv2.resize(small, (6000, 4000), interpolation=cv2.INTER_NEAREST)  # 40-px blocks: corners
    desc, geom, mask = extract_orb(huge, CFG)
    assert mask.all()
    assert ((geom >= 0) & (geom <= 1)).all()


# ----------------------------------------------------------------------------------------- dataset + cache


def cache_files(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir())


def test_dataset_extraction_matches_single_image_and_workers(dataset):
    feats = extract_dataset_keypoints(dataset, CFG, cache_dir=None, workers=2)
    assert feats.db_desc.shape == (dataset.n_db, 10, 32) and feats.q_desc.shape == (dataset.n_query, 10, 32)
    assert feats.db_mask.all() and feats.q_mask.all()
    one = extract_orb(cv2.imread(str(dataset.query_file(2)), cv2.IMREAD_UNCHANGED), CFG)
    np.testing.assert_array_equal(feats.q_desc[2], one[0])
    serial = extract_dataset_keypoints(dataset, CFG, cache_dir=None, workers=1)
    for name, arr in feats.arrays().items():
        np.testing.assert_array_equal(arr, getattr(serial, name))


def test_cache_is_reused_and_keyed(dataset, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = extract_dataset_keypoints(dataset, CFG, cache)
    assert len(cache_files(cache)) == 1

    def boom(*args, **kwargs):
        raise AssertionError("extraction ran although the cache should be used")

    monkeypatch.setattr(kp, "_extract_chunk", boom)
    with caplog.at_level(logging.INFO, logger=kp.__name__):
        again = extract_dataset_keypoints(dataset, CFG, cache)
    assert "cache hit" in caplog.text
    for name, arr in first.arrays().items():
        np.testing.assert_array_equal(arr, getattr(again, name))
    monkeypatch.undo()

    # any OrbConfig field changes the key
    extract_dataset_keypoints(dataset, OrbConfig(fast_threshold=10), cache)
    assert len(cache_files(cache)) == 2
    # so does the ground truth (dataset fingerprint)
    write_gt(dataset.root / "gt.h5", dataset.sim, np.clip(dataset.fov * 0.9, 0, 1))
    changed = read_dataset(dataset.root, check="none")
    assert changed.fingerprint != dataset.fingerprint
    extract_dataset_keypoints(changed, CFG, cache)
    assert len(cache_files(cache)) == 3
    assert not any(name.startswith(".") for name in cache_files(cache))  # no temp files left


def test_corrupt_cache_is_rebuilt(dataset, tmp_path, caplog):
    cache = tmp_path / "cache"
    ref = {name: np.array(arr) for name, arr in extract_dataset_keypoints(dataset, CFG, cache).arrays().items()}
    path = kp.keypoints_cache_file(dataset, CFG, cache)  # (copies: the files below are overwritten in place)
    assert path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == sorted(f"{f}.npy" for f in kp.KeypointFeatures.FIELDS)
    file = path / "db_desc.npy"
    data = file.read_bytes()
    for garbage in (data[: len(data) // 2], b"not an npy file at all"):
        file.write_bytes(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=kp.__name__):
            rebuilt = extract_dataset_keypoints(dataset, CFG, cache)
        assert "unreadable" in caplog.text and "rebuilding" in caplog.text
        for name, arr in ref.items():
            np.testing.assert_array_equal(getattr(rebuilt, name), arr)
        assert file.read_bytes() == data  # rewritten in full
    assert cache_files(cache) == [path.name]


def test_interrupted_cache_write_leaves_no_file(dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []

    def killed(paths, cfg):
        if calls:
            raise KeyboardInterrupt  # the second chunk: the first one is already in the cache's files
        calls.append(paths)
        return kp.empty_features(cfg.n_keypoints, len(paths))

    monkeypatch.setattr(kp, "_extract_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset_keypoints(dataset, CFG, cache, workers=1)
    assert calls and (not cache.exists() or cache_files(cache) == [])


def test_undecodable_image_names_the_file(dataset):
    bad = dataset.db_file(3)
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DatasetError, match=bad.name):
        extract_dataset_keypoints(dataset, CFG, cache_dir=None)
    bad.unlink()
    with pytest.raises(DatasetError, match=bad.name):
        load_images(dataset, (32, 48))


# ----------------------------------------------------------------------------------------- images


def test_load_images_rgb_resized_and_cached(dataset, tmp_path, monkeypatch):
    blue = np.zeros((50, 70, 4), np.uint8)
    blue[..., 0] = 255  # BGRA pure blue
    blue[..., 3] = 255
    cv2.imwrite(str(dataset.root / dataset.q_paths[0]).replace(".jpg", ".png"), blue)
    dataset.q_paths[0] = dataset.q_paths[0].replace(".jpg", ".png")
    gray = np.full((40, 40), 77, np.uint8)
    cv2.imwrite(str(dataset.db_file(0)), gray)

    cache = tmp_path / "cache"
    db, q = load_images(dataset, (32, 48), cache, workers=2)
    assert db.shape == (dataset.n_db, 3, 32, 48) and q.shape == (dataset.n_query, 3, 32, 48)
    assert db.dtype == q.dtype == np.uint8
    assert (q[0, 2] == 255).all() and (q[0, :2] == 0).all()  # RGB order, alpha dropped
    assert np.abs(db[0].astype(int) - 77).max() <= 2  # grayscale -> 3 equal channels
    assert len(list(cache.iterdir())) == 1

    monkeypatch.setattr(images_mod, "decode_resized", lambda *a, **k: pytest.fail("cache not used"))
    db2, q2 = load_images(dataset, (32, 48), cache)
    np.testing.assert_array_equal(db, db2)
    np.testing.assert_array_equal(q, q2)
    monkeypatch.undo()
    load_images(dataset, (24, 24), cache)
    assert len(list(cache.iterdir())) == 2
