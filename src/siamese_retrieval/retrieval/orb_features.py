"""The verification wing's ORB features and their cache (detected by data/orb.py, the project's one extractor).

ORB + RANSAC (the baseline and `rerank=orb_ransac|fused`), the ORB bag of words (`method=orb_bow`) and the
learned match verifier (`rerank=learned_matches`) read the same features: OpenCV ORB on the grey image resized
so that its shorter side is at least `min_side` (the tiny synthetic city is 128x96: ORB's 31-px border would
leave almost nothing) and its longer side at most `max_side`. Each image's features are extracted once per
setting and cached as one .npz per image list (`cached_features`), whichever of them asks first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.search import OrbFeatures
from siamese_retrieval.data.images import read_image
from siamese_retrieval.data.orb import create_orb, detect
from siamese_retrieval.io_utils import cached_npz, stable_hash
from siamese_retrieval.parallel import chunked_map, opencv_single_threaded
from siamese_retrieval.progress import counted, progress

log = logging.getLogger(__name__)

ORB_CACHE_VERSION = 1
FEATURE_FIELDS = ("n_features", "fast_threshold", "min_side", "max_side")  # what the features depend on


@dataclass(frozen=True)
class OrbFeatureConfig:
    n_features: int = 1000  # ORB features per image
    fast_threshold: int = 20  # ORB's FAST threshold
    min_side: int = 240  # smaller images are upscaled first
    max_side: int = 640  # larger images are downscaled first

    def __post_init__(self) -> None:
        check_fields(self, OrbFeatures, "features")


@dataclass
class Features:
    """One image's ORB features: points (n, 2) px in the resized frame, desc (n, 32) uint8, angle (n,) degrees,
    size (n,) px, and the (width, height) of the resized frame."""

    points: np.ndarray
    desc: np.ndarray
    angle: np.ndarray
    size: np.ndarray
    wh: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


def empty(wh: tuple[float, float] = (1.0, 1.0)) -> Features:
    return Features(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), np.zeros(0, np.float32),
                    np.ones(0, np.float32), np.asarray(wh, np.float32))


def image_features(image: np.ndarray, cfg: Any = OrbFeatureConfig(), orb: cv2.ORB | None = None) -> Features:
    """ORB on one decoded image (gray, BGR or BGRA). Never raises for blank or tiny images."""
    det = detect(image, cfg, orb)
    if det is None:
        return empty()
    if not len(det.kps):
        return empty((float(det.w), float(det.h)))
    kps = det.kps
    return Features(det.points().astype(np.float32), det.desc, np.array([k.angle for k in kps], np.float32),
                    np.array([k.size for k in kps], np.float32), np.asarray((float(det.w), float(det.h)), np.float32))


def extract_features(paths: Sequence[str | os.PathLike], cfg: Any = OrbFeatureConfig(),
                     workers: int = 2) -> list[Features]:
    """ORB features of every file, on a thread pool (DatasetError names the first undecodable file)."""

    def chunk(ps: Sequence[Path]) -> list[Features]:
        orb = create_orb(cfg)
        return [image_features(read_image(p), cfg, orb) for p in ps]

    paths = [Path(p) for p in paths]
    with progress("ORB features", total=len(paths)) as advance:
        parts = chunked_map(counted(chunk, advance), paths, workers, max_chunk=32, pool_context=opencv_single_threaded)
    return [f for part in parts for f in part]


# The per-feature arrays of a cache, in Features' order: (name, shape of one feature, dtype). The cache holds them
# concatenated over the files, the offsets of each file's first feature and one (width, height) per file.
PER_FEATURE = (("points", (2,), np.float32), ("desc", (32,), np.uint8), ("angle", (), np.float32),
               ("size", (), np.float32))
ARRAYS = ("offsets", *(name for name, _, _ in PER_FEATURE), "wh")


def _pack(feats: Sequence[Features]) -> dict[str, np.ndarray]:
    counts = np.array([len(f) for f in feats], np.int64)
    packed = {"offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
    for name, shape, dtype in PER_FEATURE:
        packed[name] = np.concatenate([getattr(f, name) for f in feats]) if feats else np.zeros((0, *shape), dtype)
    packed["wh"] = np.stack([f.wh for f in feats]) if feats else np.zeros((0, 2), np.float32)
    return packed


def _unpack(z: Mapping[str, np.ndarray]) -> list[Features]:
    off = z["offsets"]
    return [Features(*(z[k][off[i] : off[i + 1]] for k, _, _ in PER_FEATURE), z["wh"][i])
            for i in range(len(off) - 1)]


def features_problem(z: Mapping[str, np.ndarray], n_files: int) -> str | None:
    """Why the arrays of an ORB feature cache cannot be the features of `n_files` files (None: they can): one
    int64 offset per file (+1), from 0, increasing; every per-feature array that long, of its dtype (float32,
    descriptors uint8 (n, 32)) and finite; one (width, height) per file. The cache is data: every array is checked."""
    off = z["offsets"]
    if off.dtype != np.int64 or off.shape != (n_files + 1,):
        return f"has offsets of dtype {off.dtype} and shape {off.shape}, expected int64 {(n_files + 1,)}"
    if off[0] != 0 or np.any(np.diff(off) < 0):
        return "has offsets that do not start at 0 and increase"
    n = int(off[-1])
    expected = [(name, (n, *shape), dtype) for name, shape, dtype in PER_FEATURE] + [("wh", (n_files, 2), np.float32)]
    for name, shape, dtype in expected:
        arr = z[name]
        if arr.dtype != dtype or arr.shape != shape:
            return f"has {name} of dtype {arr.dtype} and shape {arr.shape}, expected {np.dtype(dtype)} {shape}"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"has non-finite {name}"
    return None


def cached_features(files: Sequence[Path], key: Mapping[str, Any], cfg: Any, cache_dir: str | os.PathLike | None,
                    workers: int = 2) -> list[Features]:
    """`extract_features`, cached in `cache_dir` as one .npz keyed by `key` (e.g. the dataset fingerprint), the
    file list and the feature settings; written atomically. No cache when `cache_dir` is None."""
    if cache_dir is None:
        return extract_features(files, cfg, workers)
    # the feature knobs of any config that has them (OrbFeatureConfig, OrbRansacConfig): the cache key
    settings = {name: getattr(cfg, name) for name in FEATURE_FIELDS}
    digest = stable_hash({**key, "files": [str(f) for f in files], "cfg": settings, "version": ORB_CACHE_VERSION,
                          "cv2": cv2.__version__.split(".")[0]})
    arrays = cached_npz(Path(cache_dir) / f"orb-{digest}.npz", ARRAYS, "ORB feature",
                        lambda: _pack(extract_features(files, cfg, workers)),
                        logger=log, problem=lambda a: features_problem(a, len(files)))
    return _unpack(arrays)
