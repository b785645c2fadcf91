"""ORB keypoints per image (the study's features), with OpenCV, in parallel, cached on disk.

The study ran scikit-image's `ORB(n_keypoints=10)`; OpenCV's ORB gives the same kind of
32-byte binary descriptors roughly 70x faster. Per image we detect more candidates than needed
and keep the `n_keypoints` strongest (by response, ties broken by position), so the order is
deterministic. Images with fewer keypoints (blank, tiny) are zero-padded and masked.
A dataset's features are cached in a directory `keypoints-<key>/` of one `.npy` per array below
(db_* and q_*), written chunk by chunk straight into those files and opened memory-mapped
(io_utils.cached_arrays), so extraction and training on 1M images never hold them in RAM.

    desc  uint8   (n, 32)  packed BRIEF descriptors
    geom  float32 (n, 4)   x / width, y / height, size / max(width, height), angle / 360
    mask  bool    (n,)     True where a keypoint exists

Keypoint SETS (model=keypoint_set, below: `KeypointSetConfig`, `extract_dataset_keypoint_sets`) keep
256-512 keypoints per image with richer geometry (`SET_FEATURES`) in their own cache, `keypoint-sets-<key>/`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import cv2
import numpy as np

from siamese_retrieval.data.images import read_image, to_gray
from siamese_retrieval.io_utils import cached_arrays, release_mapped_pages, stable_hash
from siamese_retrieval.parallel import chunked_map, opencv_single_threaded
from siamese_retrieval.progress import Advance, counted, progress

log = logging.getLogger(__name__)

KEYPOINTS_CACHE_VERSION = 2  # 2: a directory of memory-mapped .npy files (1: one .npz)
DESC_BYTES = 32


@dataclass(frozen=True)
class OrbConfig:
    n_keypoints: int = 10
    scale_factor: float = 1.2
    n_levels: int = 8
    edge_threshold: int = 31
    fast_threshold: int = 20
    patch_size: int = 31
    max_side: int = 1024  # larger images are downscaled first (memory and time stay bounded)

    def __post_init__(self) -> None:
        if self.n_keypoints < 1:
            raise ValueError(f"n_keypoints must be >= 1, got {self.n_keypoints}")
        if self.max_side < 8:
            raise ValueError(f"max_side must be >= 8, got {self.max_side}")

    def create(self) -> cv2.ORB:
        return cv2.ORB_create(
            nfeatures=max(4 * self.n_keypoints, 100),
            scaleFactor=float(self.scale_factor),
            nlevels=int(self.n_levels),
            edgeThreshold=int(self.edge_threshold),
            firstLevel=0,
            WTA_K=2,
            scoreType=cv2.ORB_HARRIS_SCORE,
            patchSize=int(self.patch_size),
            fastThreshold=int(self.fast_threshold),
        )


def empty_features(n: int, count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((count, n, DESC_BYTES), np.uint8),
        np.zeros((count, n, 4), np.float32),
        np.zeros((count, n), bool),
    )


def extract_orb(image: np.ndarray, cfg: OrbConfig = OrbConfig(), orb: cv2.ORB | None = None):
    """ORB on one image (grayscale, BGR or BGRA). Never raises for blank, tiny or odd-channel images."""
    n = cfg.n_keypoints
    desc, geom, mask = (a[0] for a in empty_features(n))
    gray = to_gray(image)
    h, w = gray.shape[:2]
    if h == 0 or w == 0:
        return desc, geom, mask
    if max(h, w) > cfg.max_side:
        scale = cfg.max_side / max(h, w)
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        h, w = gray.shape
    if min(h, w) <= 2 * max(cfg.edge_threshold, cfg.patch_size // 2 + 1):
        return desc, geom, mask  # nothing can be detected that far from every border
    kps, d = (orb or cfg.create()).detectAndCompute(gray, None)
    if d is None or not len(kps):
        return desc, geom, mask
    resp = np.array([k.response for k in kps], np.float64)
    pts = np.array([k.pt for k in kps], np.float64).reshape(-1, 2)
    order = np.lexsort((pts[:, 0], pts[:, 1], -resp))[:n]  # strongest first, ties by (y, x)
    k = len(order)
    desc[:k] = d[order]
    geom[:k, 0] = pts[order, 0] / w
    geom[:k, 1] = pts[order, 1] / h
    geom[:k, 2] = [kps[i].size / max(h, w) for i in order]
    geom[:k, 3] = [(kps[i].angle % 360.0) / 360.0 for i in order]
    np.clip(geom, 0.0, 1.0, out=geom)
    mask[:k] = True
    return desc, geom, mask


# ----------------------------------------------------------------------------------------- dataset


@dataclass
class KeypointFeatures:
    db_desc: np.ndarray  # (n_db, n, 32) uint8
    db_geom: np.ndarray  # (n_db, n, 4) float32
    db_mask: np.ndarray  # (n_db, n) bool
    q_desc: np.ndarray
    q_geom: np.ndarray
    q_mask: np.ndarray

    FIELDS: ClassVar[tuple[str, ...]] = ("db_desc", "db_geom", "db_mask", "q_desc", "q_geom", "q_mask")

    @property
    def n_keypoints(self) -> int:
        return self.db_desc.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.FIELDS}


def _extract_chunk(paths: Sequence[str], cfg: OrbConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker: one ORB object per chunk (cv2 objects are not shared between threads)."""
    orb = cfg.create()
    desc, geom, mask = empty_features(cfg.n_keypoints, len(paths))
    for i, p in enumerate(paths):
        desc[i], geom[i], mask[i] = extract_orb(read_image(p), cfg, orb)
    return desc, geom, mask


def _extract_into(paths: Sequence[str], cfg: OrbConfig, workers: int,
                  out: tuple[np.ndarray, np.ndarray, np.ndarray], advance: Advance) -> None:
    """ORB of `paths` written into the rows of `out` = (desc, geom, mask), one chunk at a time: only a
    chunk's features are ever held besides `out` (which may be a memmap of the cache)."""
    desc, geom, mask = out

    def run(indices: range) -> None:
        d, g, m = _extract_chunk([paths[i] for i in indices], cfg)
        rows = slice(indices.start, indices.stop)
        desc[rows], geom[rows], mask[rows] = d, g, m
        release_mapped_pages()  # written rows leave this process's RSS (at most once a second; io_utils)

    chunked_map(counted(run, advance), range(len(paths)), workers, pool_context=opencv_single_threaded)


def extract_paths(
    paths: Sequence[str | os.PathLike], cfg: OrbConfig, workers: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORB for many files, in chunks, on a thread pool.

    Threads, not processes: cv2 releases the GIL while decoding and detecting, and a process pool
    pays its start-up on every call. Measured on 2 cores, 500 JPEGs of 256x192: 1 thread ~800
    images/s, 2 threads ~1400 images/s, 2 spawned processes ~800 images/s.
    """
    paths = [str(p) for p in paths]
    out = empty_features(cfg.n_keypoints, len(paths))
    if paths:
        with progress("extracting ORB keypoints", total=len(paths)) as advance:
            _extract_into(paths, cfg, workers, out, advance)
    return out


def keypoints_cache_file(dataset, cfg: OrbConfig, cache_dir: str | os.PathLike) -> Path:
    """The cache of `extract_dataset_keypoints` for this dataset and config: a directory of .npy files."""
    key = stable_hash(
        {
            "fingerprint": dataset.fingerprint,
            "cfg": asdict(cfg),
            "db_paths": list(dataset.db_paths),
            "q_paths": list(dataset.q_paths),
            "version": KEYPOINTS_CACHE_VERSION,
            "cv2": cv2.__version__.split(".")[0],
        }
    )
    return Path(cache_dir) / f"keypoints-{key}"


def feature_specs(n_db: int, n_q: int, n: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of every `KeypointFeatures` field."""
    specs: dict[str, tuple[tuple[int, ...], Any]] = {}
    for side, count in (("db", n_db), ("q", n_q)):
        specs[f"{side}_desc"] = ((count, n, DESC_BYTES), np.uint8)
        specs[f"{side}_geom"] = ((count, n, 4), np.float32)
        specs[f"{side}_mask"] = ((count, n), np.bool_)
    return specs


def extract_dataset_keypoints(
    dataset,
    cfg: OrbConfig = OrbConfig(),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> KeypointFeatures:
    """ORB features of every database and query image; cached in `cache_dir` when given (then the
    arrays are copy-on-write memmaps of the cache: read lazily, writable, never written back)."""
    path = keypoints_cache_file(dataset, cfg, cache_dir) if cache_dir is not None else None

    def extract(out: dict[str, np.ndarray]) -> None:
        log.info("extracting ORB keypoints from %d images%s", dataset.n_db + dataset.n_query,
                 f" (cache miss: {path})" if path is not None else "")
        with progress("extracting ORB keypoints", total=dataset.n_db + dataset.n_query) as advance:
            for side, rel in (("db", dataset.db_paths), ("q", dataset.q_paths)):
                files = [str(dataset.root / p) for p in rel]
                _extract_into(files, cfg, workers, (out[f"{side}_desc"], out[f"{side}_geom"], out[f"{side}_mask"]),
                              advance)

    specs = feature_specs(dataset.n_db, dataset.n_query, cfg.n_keypoints)
    return KeypointFeatures(**cached_arrays(path, specs, "keypoint", extract, logger=log))


# ----------------------------------------------------------------------------------------- keypoint sets
#
# model=keypoint_set (models/keypoint_set.py) reads a SET of 256-512 keypoints per image, each with its
# descriptor and its geometry. The arrays of one image:
#
#     desc  uint8   (n, 32)  packed BRIEF descriptors (the model expands them to +-1 bits)
#     feat  float32 (n, 7)   SET_FEATURES below
#     mask  bool    (n,)     True where a keypoint exists; padded rows are all zeros
#
# Rows are kept strongest first (response, ties by (y, x)) so that the cache is deterministic; the model is
# permutation-invariant and never reads the row order.

KEYPOINT_SET_CACHE_VERSION = 1
SET_FEATURES: tuple[str, ...] = (
    "x",          # x / width of the (scaled) image, in [0, 1]
    "y",          # y / height, in [0, 1]
    "cos",        # cos of the keypoint's orientation
    "sin",        # sin of the keypoint's orientation
    "log_size",   # log(size / max(width, height)): scale-free, about -3 (fine) .. -1 (coarse)
    "response",   # Harris response / the image's strongest response, in [0, 1]
    "octave",     # pyramid level / (n_levels - 1), in [0, 1]
)
N_SET_FEATURES = len(SET_FEATURES)


@dataclass(frozen=True)
class KeypointSetConfig:
    """ORB detection for keypoint sets. `n_features` candidates are detected over the pyramid (OpenCV spreads
    them over the levels) and the `n_keypoints` strongest are kept. `image_scale` resizes the image first
    (> 1 finds more, finer keypoints on small images; the default city is 256 x 192)."""

    n_keypoints: int = 256
    n_features: int = 500
    image_scale: float = 1.0
    scale_factor: float = 1.2
    n_levels: int = 8
    edge_threshold: int = 31
    fast_threshold: int = 20
    patch_size: int = 31
    max_side: int = 1024  # larger images (after image_scale) are downscaled to this side first

    def __post_init__(self) -> None:
        if self.n_keypoints < 1:
            raise ValueError(f"n_keypoints must be >= 1, got {self.n_keypoints}")
        if self.n_features < self.n_keypoints:
            raise ValueError(f"n_features ({self.n_features}) must be >= n_keypoints ({self.n_keypoints})")
        if not self.image_scale > 0:
            raise ValueError(f"image_scale must be > 0, got {self.image_scale}")
        if self.max_side < 8:
            raise ValueError(f"max_side must be >= 8, got {self.max_side}")
        if self.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")

    def create(self) -> cv2.ORB:
        return cv2.ORB_create(
            nfeatures=int(self.n_features),
            scaleFactor=float(self.scale_factor),
            nlevels=int(self.n_levels),
            edgeThreshold=int(self.edge_threshold),
            firstLevel=0,
            WTA_K=2,
            scoreType=cv2.ORB_HARRIS_SCORE,
            patchSize=int(self.patch_size),
            fastThreshold=int(self.fast_threshold),
        )


def empty_set_features(n: int, count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((count, n, DESC_BYTES), np.uint8),
        np.zeros((count, n, N_SET_FEATURES), np.float32),
        np.zeros((count, n), bool),
    )


def extract_orb_set(image: np.ndarray, cfg: KeypointSetConfig = KeypointSetConfig(), orb: cv2.ORB | None = None):
    """(desc, feat, mask) of one image (grayscale, BGR or BGRA). Never raises for blank, tiny or odd images."""
    n = cfg.n_keypoints
    desc, feat, mask = (a[0] for a in empty_set_features(n))
    gray = to_gray(image)
    h, w = gray.shape[:2]
    if h == 0 or w == 0:
        return desc, feat, mask
    scale = float(cfg.image_scale)
    if max(h, w) * scale > cfg.max_side:
        scale = cfg.max_side / max(h, w)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        h, w = gray.shape
    if min(h, w) <= 2 * max(cfg.edge_threshold, cfg.patch_size // 2 + 1):
        return desc, feat, mask
    kps, d = (orb or cfg.create()).detectAndCompute(gray, None)
    if d is None or not len(kps):
        return desc, feat, mask
    resp = np.array([k.response for k in kps], np.float64)
    pts = np.array([k.pt for k in kps], np.float64).reshape(-1, 2)
    order = np.lexsort((pts[:, 0], pts[:, 1], -resp))[:n]  # strongest first, ties by (y, x)
    k = len(order)
    sel = [kps[i] for i in order]
    angle = np.deg2rad(np.array([kp.angle % 360.0 for kp in sel], np.float64))
    size = np.array([max(kp.size, 1e-3) for kp in sel], np.float64)
    top = resp[order].max()
    desc[:k] = d[order]
    feat[:k, 0] = np.clip(pts[order, 0] / w, 0.0, 1.0)
    feat[:k, 1] = np.clip(pts[order, 1] / h, 0.0, 1.0)
    feat[:k, 2] = np.cos(angle)
    feat[:k, 3] = np.sin(angle)
    feat[:k, 4] = np.log(size / max(h, w))
    feat[:k, 5] = np.clip(resp[order] / top, 0.0, 1.0) if top > 0 else 1.0
    feat[:k, 6] = np.array([kp.octave for kp in sel], np.float64) / max(1, cfg.n_levels - 1)
    mask[:k] = True
    return desc, feat, mask


@dataclass
class KeypointSetFeatures:
    db_desc: np.ndarray  # (n_db, n, 32) uint8
    db_feat: np.ndarray  # (n_db, n, 7) float32
    db_mask: np.ndarray  # (n_db, n) bool
    q_desc: np.ndarray
    q_feat: np.ndarray
    q_mask: np.ndarray

    FIELDS: ClassVar[tuple[str, ...]] = ("db_desc", "db_feat", "db_mask", "q_desc", "q_feat", "q_mask")

    @property
    def n_keypoints(self) -> int:
        return self.db_desc.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.FIELDS}


def _extract_set_into(paths: Sequence[str], cfg: KeypointSetConfig, workers: int,
                      out: tuple[np.ndarray, np.ndarray, np.ndarray], advance: Advance) -> None:
    """As `_extract_into`, for keypoint sets: one ORB object per chunk, rows written into `out`."""
    desc, feat, mask = out

    def run(indices: range) -> None:
        orb = cfg.create()
        d, f, m = empty_set_features(cfg.n_keypoints, len(indices))
        for j, i in enumerate(indices):
            d[j], f[j], m[j] = extract_orb_set(read_image(paths[i]), cfg, orb)
        rows = slice(indices.start, indices.stop)
        desc[rows], feat[rows], mask[rows] = d, f, m
        release_mapped_pages()

    chunked_map(counted(run, advance), range(len(paths)), workers, pool_context=opencv_single_threaded)


def keypoint_set_cache_file(dataset, cfg: KeypointSetConfig, cache_dir: str | os.PathLike) -> Path:
    """The cache of `extract_dataset_keypoint_sets` for this dataset and config: a directory of .npy files."""
    key = stable_hash(
        {
            "fingerprint": dataset.fingerprint,
            "cfg": asdict(cfg),
            "features": list(SET_FEATURES),
            "db_paths": list(dataset.db_paths),
            "q_paths": list(dataset.q_paths),
            "version": KEYPOINT_SET_CACHE_VERSION,
            "cv2": cv2.__version__.split(".")[0],
        }
    )
    return Path(cache_dir) / f"keypoint-sets-{key}"


def set_feature_specs(n_db: int, n_q: int, n: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of every `KeypointSetFeatures` field."""
    specs: dict[str, tuple[tuple[int, ...], Any]] = {}
    for side, count in (("db", n_db), ("q", n_q)):
        specs[f"{side}_desc"] = ((count, n, DESC_BYTES), np.uint8)
        specs[f"{side}_feat"] = ((count, n, N_SET_FEATURES), np.float32)
        specs[f"{side}_mask"] = ((count, n), np.bool_)
    return specs


def extract_dataset_keypoint_sets(
    dataset,
    cfg: KeypointSetConfig = KeypointSetConfig(),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> KeypointSetFeatures:
    """Keypoint sets of every database and query image; cached in `cache_dir` when given (copy-on-write
    memmaps of the cache, as `extract_dataset_keypoints`)."""
    path = keypoint_set_cache_file(dataset, cfg, cache_dir) if cache_dir is not None else None

    def extract(out: dict[str, np.ndarray]) -> None:
        log.info("extracting ORB keypoint sets from %d images%s", dataset.n_db + dataset.n_query,
                 f" (cache miss: {path})" if path is not None else "")
        with progress("extracting ORB keypoint sets", total=dataset.n_db + dataset.n_query) as advance:
            for side, rel in (("db", dataset.db_paths), ("q", dataset.q_paths)):
                files = [str(dataset.root / p) for p in rel]
                _extract_set_into(files, cfg, workers, (out[f"{side}_desc"], out[f"{side}_feat"], out[f"{side}_mask"]),
                                  advance)

    specs = set_feature_specs(dataset.n_db, dataset.n_query, cfg.n_keypoints)
    return KeypointSetFeatures(**cached_arrays(path, specs, "keypoint set", extract, logger=log))
