"""Decoding images from a dataset root, and decoded RGB tensors for the CNN encoders (cached).

`read_image` is the single place that turns a file into pixels: it raises `DatasetError` naming the
file when it cannot be decoded, or when its header claims more pixels than data.max_image_pixels (checked
before decoding: image_header.py). `load_images` resizes every database and query image to (H, W),
converts grayscale / BGRA / 16-bit to 8-bit RGB and returns channel-first uint8 arrays, cached
in a directory `images-<H>x<W>-<key>/` of two `.npy` files (db, q) keyed by the dataset fingerprint,
the paths, the size and a format version. The cache is decoded straight into those files and opened
memory-mapped (io_utils.cached_arrays), so 100k+ images never have to fit in RAM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from siamese_retrieval.errors import DatasetError
from siamese_retrieval.image_header import check_pixels
from siamese_retrieval.io_utils import cached_arrays, release_mapped_pages, stable_hash
from siamese_retrieval.parallel import chunked_map
from siamese_retrieval.progress import counted, progress

log = logging.getLogger(__name__)

IMAGES_CACHE_VERSION = 2  # 2: a directory of memory-mapped .npy files (1: one .npz)


# ----------------------------------------------------------------------------------------- decoding


def read_image(path: str | os.PathLike, max_pixels: int | None = None, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode `path` as stored (grayscale, BGR or BGRA; any bit depth), or as cv2.imdecode's `flags` say (e.g.
    cv2.IMREAD_GRAYSCALE); DatasetError if impossible, or when its header says it has more than `max_pixels` pixels
    (None: data.max_image_pixels, image_header.py), which is never decoded."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # unlike cv2.imread, works for any path encoding
            data = f.read()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if not data:
        raise DatasetError(f"{path}: not a decodable image")
    check_pixels(path, data, max_pixels)  # before decoding: a small file can claim a huge image
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if img is None or img.size == 0:
        raise DatasetError(f"{path}: not a decodable image")
    return img


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Any-depth image -> uint8 (16-bit scaled by 1/257, floats assumed in [0, 1])."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img.astype(np.uint32) // 257).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(np.nan_to_num(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)


def _uint8_channels(img: np.ndarray) -> tuple[np.ndarray, int]:
    """Grayscale (H, W, [1]), BGR or BGRA -> (the image as uint8, its channels: 1, 3 or 4); a gray image comes
    back (H, W). ValueError for any other shape."""
    img = to_uint8(np.asarray(img))
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return img, 1
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return img, img.shape[2]
    raise ValueError(f"unsupported image shape {img.shape}")


def to_gray(img: np.ndarray) -> np.ndarray:
    """Grayscale (H, W, [1]), BGR or BGRA -> uint8 (H, W). Equal-channel BGR gives back the gray image."""
    img, channels = _uint8_channels(img)
    if channels == 1:
        return np.ascontiguousarray(img)
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grayscale, BGR or BGRA (as decoded by OpenCV) -> uint8 RGB (H, W, 3)."""
    img, channels = _uint8_channels(img)
    return cv2.cvtColor(img, {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}[channels])


def thumbnail(path: Path, size: tuple[int, int] = (16, 12)) -> np.ndarray:
    """Standardised grayscale thumbnail (flattened float32): the cheap look-alike measure (the contact sheet's
    hard negatives, learned_matches' look-alike pairs, the thumbnail baseline of retrieval/thumbnail.py)."""
    img = read_image(path, flags=cv2.IMREAD_GRAYSCALE)  # as cv2.imread, size checked first
    t = cv2.resize(img, size, interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    return (t - t.mean()) / (t.std() + 1e-6)


# ----------------------------------------------------------------------------------------- tensors


def _load_into(out: np.ndarray, paths: Sequence[Path], indices: range, size: tuple[int, int]) -> None:
    h, w = size
    for i in indices:
        rgb = to_rgb(read_image(paths[i]))
        if rgb.shape[:2] != (h, w):
            shrinking = rgb.shape[0] >= h and rgb.shape[1] >= w
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        out[i] = rgb.transpose(2, 0, 1)
        release_mapped_pages()  # written rows leave this process's RSS (at most once a second; io_utils)


def decode_resized(paths: Sequence[Path], size: tuple[int, int], workers: int = 2,
                   description: str = "decoding images", out: np.ndarray | None = None) -> np.ndarray:
    """(n, 3, H, W) uint8 RGB; threads fill one preallocated array (cv2 releases the GIL).
    `out` (e.g. a memmap of the cache) is filled in place instead of a new array, so the decoded images
    need not fit in RAM. A DatasetError names the first undecodable image. A progress bar named
    `description` (progress.py)."""
    h, w = int(size[0]), int(size[1])
    if out is None:
        out = np.empty((len(paths), 3, h, w), dtype=np.uint8)
    elif out.shape != (len(paths), 3, h, w) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(len(paths), 3, h, w)}, got {out.dtype} {out.shape}")
    with progress(description, total=len(paths)) as advance:
        chunked_map(counted(lambda indices: _load_into(out, paths, indices, (h, w)), advance), range(len(paths)),
                    workers)
    return out


def images_cache_file(dataset, size: tuple[int, int], cache_dir: str | os.PathLike) -> Path:
    """The cache of `load_images` for this dataset and size: a directory (db.npy, q.npy)."""
    key = stable_hash(
        {
            "fingerprint": dataset.fingerprint,
            "size": [int(size[0]), int(size[1])],
            "db_paths": list(dataset.db_paths),
            "q_paths": list(dataset.q_paths),
            "version": IMAGES_CACHE_VERSION,
        }
    )
    return Path(cache_dir) / f"images-{int(size[0])}x{int(size[1])}-{key}"


def load_images(
    dataset,
    size: tuple[int, int] = (192, 256),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Database and query images as uint8 RGB (n, 3, H, W), resized to exactly `size` = (H, W).
    With `cache_dir`: copy-on-write memmaps of the cache (read lazily, writable, never written back)."""
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"image size must be positive, got {size}")
    path = images_cache_file(dataset, size, cache_dir) if cache_dir is not None else None

    def decode(out: dict[str, np.ndarray]) -> None:
        log.info("decoding %d images at %dx%d%s", dataset.n_db + dataset.n_query, size[0], size[1],
                 f" (cache miss: {path})" if path is not None else "")
        decode_resized([dataset.root / p for p in dataset.db_paths], size, workers, "decoding database images",
                       out=out["db"])
        decode_resized([dataset.root / p for p in dataset.q_paths], size, workers, "decoding query images",
                       out=out["q"])

    specs = {"db": ((dataset.n_db, 3, *size), np.uint8), "q": ((dataset.n_query, 3, *size), np.uint8)}
    arrays = cached_arrays(path, specs, "image", decode, logger=log)
    return arrays["db"], arrays["q"]
