"""ORB keypoints per image (the study's features), with OpenCV, in parallel, cached on disk.

Detected by the project's one ORB extractor (data/orb.py). The study ran scikit-image's `ORB(n_keypoints=10)`; OpenCV's ORB gives the same kind of
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import cv2
import numpy as np

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Inputs
from siamese_retrieval.data.images import read_image
from siamese_retrieval.data.orb import Detected, create_orb, detect
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
        check_fields(self, Inputs, "model.inputs")

    def create(self) -> cv2.ORB:
        return create_orb(self, max(4 * self.n_keypoints, 100))


def _detect_strongest(image: np.ndarray, cfg: "OrbConfig | KeypointSetConfig", orb: cv2.ORB | None,
                      image_scale: float = 1.0) -> tuple[Detected, np.ndarray, np.ndarray, np.ndarray] | None:
    """ORB (data/orb.py) on one image resized by `image_scale` (and down to `cfg.max_side`): the detection, its
    points, responses and the order of its `cfg.n_keypoints` strongest by response, ties by (y, x) so the
    choice is deterministic; None when nothing is detected (blank, tiny)."""
    det = detect(image, cfg, orb or cfg.create(), image_scale)
    if det is None or not len(det.kps):
        return None
    resp = np.array([k.response for k in det.kps], np.float64)
    pts = det.points()
    order = np.lexsort((pts[:, 0], pts[:, 1], -resp))[: cfg.n_keypoints]  # strongest first, ties by (y, x)
    return det, pts, resp, order


def empty_features(n: int, count: int = 1, width: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(desc, geometry, mask) of `count` images with `n` keypoints each, all zero (= no keypoint); the geometry
    is `width` wide (4: geom; N_SET_FEATURES: a keypoint set's feat)."""
    return np.zeros((count, n, DESC_BYTES), np.uint8), np.zeros((count, n, width), np.float32), np.zeros((count, n), bool)


def extract_orb(image: np.ndarray, cfg: OrbConfig = OrbConfig(), orb: cv2.ORB | None = None):
    """ORB on one image (grayscale, BGR or BGRA). Never raises for blank, tiny or odd-channel images."""
    desc, geom, mask = (a[0] for a in empty_features(cfg.n_keypoints))
    found = _detect_strongest(image, cfg, orb)
    if found is None:
        return desc, geom, mask
    det, pts, _, order = found
    kps, h, w = det.kps, det.h, det.w
    k = len(order)
    desc[:k] = det.desc[order]
    geom[:k, 0] = pts[order, 0] / w
    geom[:k, 1] = pts[order, 1] / h
    geom[:k, 2] = [kps[i].size / max(h, w) for i in order]
    geom[:k, 3] = [(kps[i].angle % 360.0) / 360.0 for i in order]
    np.clip(geom, 0.0, 1.0, out=geom)
    mask[:k] = True
    return desc, geom, mask


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
class KeypointSetConfig(OrbConfig):
    """ORB detection for keypoint sets: `OrbConfig`'s detector knobs (and checks), keeping more keypoints.
    `n_features` candidates are detected over the pyramid (OpenCV spreads them over the levels) and the
    `n_keypoints` strongest are kept. `image_scale` resizes the image first (> 1 finds more, finer keypoints on
    small images; the default city is 256 x 192); `max_side` then applies to the resized image."""

    n_keypoints: int = 256
    n_features: int = 500
    image_scale: float = 1.0

    def create(self) -> cv2.ORB:
        return create_orb(self, self.n_features)


def extract_orb_set(image: np.ndarray, cfg: KeypointSetConfig = KeypointSetConfig(), orb: cv2.ORB | None = None):
    """(desc, feat, mask) of one image (grayscale, BGR or BGRA). Never raises for blank, tiny or odd images."""
    desc, feat, mask = (a[0] for a in empty_features(cfg.n_keypoints, width=N_SET_FEATURES))
    found = _detect_strongest(image, cfg, orb, image_scale=cfg.image_scale)
    if found is None:
        return desc, feat, mask
    det, pts, resp, order = found
    h, w = det.h, det.w
    k = len(order)
    sel = [det.kps[i] for i in order]
    angle = np.deg2rad(np.array([kp.angle % 360.0 for kp in sel], np.float64))
    size = np.array([max(kp.size, 1e-3) for kp in sel], np.float64)
    top = resp[order].max()
    desc[:k] = det.desc[order]
    feat[:k, 0] = np.clip(pts[order, 0] / w, 0.0, 1.0)
    feat[:k, 1] = np.clip(pts[order, 1] / h, 0.0, 1.0)
    feat[:k, 2] = np.cos(angle)
    feat[:k, 3] = np.sin(angle)
    feat[:k, 4] = np.log(size / max(h, w))
    feat[:k, 5] = np.clip(resp[order] / top, 0.0, 1.0) if top > 0 else 1.0
    feat[:k, 6] = np.array([kp.octave for kp in sel], np.float64) / max(1, cfg.n_levels - 1)
    mask[:k] = True
    return desc, feat, mask


# ----------------------------------------------------------------------------------------- dataset caches
#
# One pipeline for both kinds: extraction in chunks on a thread pool, written straight into the memory-mapped
# cache files of io_utils.cached_arrays. `_KINDS` holds what differs: the geometry array's name and width, the
# per-image extractor, the cache directory's prefix and version, and the words of the log lines.


@dataclass(frozen=True)
class _Kind:
    geometry: str  # the name of the (n, width) float array: "geom" | "feat"
    width: int
    extract: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]  # (image, cfg, orb) -> (desc, geometry, mask)
    prefix: str  # the cache directory: <prefix>-<key>
    version: int
    noun: str  # "keypoint" | "keypoint set"
    key_extra: tuple[tuple[str, Any], ...] = ()  # more cache-key entries


_KINDS: dict[type, _Kind] = {
    OrbConfig: _Kind("geom", 4, extract_orb, "keypoints", KEYPOINTS_CACHE_VERSION, "keypoint"),
    KeypointSetConfig: _Kind("feat", N_SET_FEATURES, extract_orb_set, "keypoint-sets", KEYPOINT_SET_CACHE_VERSION,
                             "keypoint set", (("features", list(SET_FEATURES)),)),
}


class _DatasetArrays:
    """What both dataclasses below share: rows are images (db_* then q_*), columns keypoints."""

    @property
    def n_keypoints(self) -> int:
        return self.db_desc.shape[1]  # type: ignore[attr-defined]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def side(self, side: str) -> dict[str, np.ndarray]:
        """One side's arrays ("db" | "q") under their short names: desc, geom or feat, mask."""
        return {name[len(side) + 1:]: a for name, a in self.arrays().items() if name.startswith(f"{side}_")}


@dataclass
class KeypointFeatures(_DatasetArrays):
    db_desc: np.ndarray  # (n_db, n, 32) uint8
    db_geom: np.ndarray  # (n_db, n, 4) float32
    db_mask: np.ndarray  # (n_db, n) bool
    q_desc: np.ndarray
    q_geom: np.ndarray
    q_mask: np.ndarray

    FIELDS: ClassVar[tuple[str, ...]] = ("db_desc", "db_geom", "db_mask", "q_desc", "q_geom", "q_mask")


@dataclass
class KeypointSetFeatures(_DatasetArrays):
    db_desc: np.ndarray  # (n_db, n, 32) uint8
    db_feat: np.ndarray  # (n_db, n, 7) float32: SET_FEATURES
    db_mask: np.ndarray  # (n_db, n) bool
    q_desc: np.ndarray
    q_feat: np.ndarray
    q_mask: np.ndarray


def _extract_chunk(paths: Sequence[str], cfg: OrbConfig | KeypointSetConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker: one ORB object per chunk (cv2 objects are not shared between threads)."""
    kind = _KINDS[type(cfg)]
    orb = cfg.create()
    desc, geom, mask = empty_features(cfg.n_keypoints, len(paths), kind.width)
    for i, p in enumerate(paths):
        desc[i], geom[i], mask[i] = kind.extract(read_image(p), cfg, orb)
    return desc, geom, mask


def _extract_into(paths: Sequence[str], cfg: OrbConfig | KeypointSetConfig, workers: int,
                  out: tuple[np.ndarray, np.ndarray, np.ndarray], advance: Advance) -> None:
    """ORB of `paths` written into the rows of `out` = (desc, geometry, mask), one chunk at a time: only a
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
    out = empty_features(cfg.n_keypoints, len(paths), _KINDS[type(cfg)].width)
    if paths:
        with progress("extracting ORB keypoints", total=len(paths)) as advance:
            _extract_into(paths, cfg, workers, out, advance)
    return out


def keypoints_cache_file(dataset, cfg: OrbConfig | KeypointSetConfig, cache_dir: str | os.PathLike) -> Path:
    """The cache of `extract_dataset_keypoints` (an OrbConfig) or `extract_dataset_keypoint_sets` (a
    KeypointSetConfig) for this dataset and config: a directory of .npy files."""
    kind = _KINDS[type(cfg)]
    key = stable_hash({"fingerprint": dataset.fingerprint, "cfg": asdict(cfg), "db_paths": list(dataset.db_paths),
                       "q_paths": list(dataset.q_paths), "version": kind.version, "cv2": cv2.__version__.split(".")[0],
                       **dict(kind.key_extra)})
    return Path(cache_dir) / f"{kind.prefix}-{key}"


def _dataset_arrays(dataset, cfg: OrbConfig | KeypointSetConfig, cache_dir: str | os.PathLike | None,
                    workers: int) -> dict[str, np.ndarray]:
    kind = _KINDS[type(cfg)]
    path = keypoints_cache_file(dataset, cfg, cache_dir) if cache_dir is not None else None
    what = f"ORB {kind.noun}s"

    def extract(out: dict[str, np.ndarray]) -> None:
        log.info("extracting %s from %d images%s", what, dataset.n_db + dataset.n_query,
                 f" (cache miss: {path})" if path is not None else "")
        with progress(f"extracting {what}", total=dataset.n_db + dataset.n_query) as advance:
            for side, rel in (("db", dataset.db_paths), ("q", dataset.q_paths)):
                files = [str(dataset.root / p) for p in rel]
                _extract_into(files, cfg, workers,
                              (out[f"{side}_desc"], out[f"{side}_{kind.geometry}"], out[f"{side}_mask"]), advance)

    n = cfg.n_keypoints
    specs: dict[str, tuple[tuple[int, ...], Any]] = {}
    for side, count in (("db", dataset.n_db), ("q", dataset.n_query)):
        specs[f"{side}_desc"] = ((count, n, DESC_BYTES), np.uint8)
        specs[f"{side}_{kind.geometry}"] = ((count, n, kind.width), np.float32)
        specs[f"{side}_mask"] = ((count, n), np.bool_)
    return cached_arrays(path, specs, kind.noun, extract, logger=log)


def extract_dataset_keypoints(
    dataset,
    cfg: OrbConfig = OrbConfig(),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> KeypointFeatures:
    """ORB features of every database and query image; cached in `cache_dir` when given (then the
    arrays are copy-on-write memmaps of the cache: read lazily, writable, never written back)."""
    return KeypointFeatures(**_dataset_arrays(dataset, cfg, cache_dir, workers))


def extract_dataset_keypoint_sets(
    dataset,
    cfg: KeypointSetConfig = KeypointSetConfig(),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> KeypointSetFeatures:
    """Keypoint sets of every database and query image; cached in `cache_dir` when given (copy-on-write
    memmaps of the cache, as `extract_dataset_keypoints`)."""
    return KeypointSetFeatures(**_dataset_arrays(dataset, cfg, cache_dir, workers))
