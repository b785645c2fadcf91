"""The one ORB extractor: every ORB keypoint of the project comes from `detect`.

The model inputs (data/keypoints.py: keypoint_snn's strongest 10, keypoint_set's 256-512), ORB + RANSAC,
the ORB bag of words and the learned match verifier (retrieval/orb_features.py) differ only in their settings,
read from any config object by attribute name:

    n_features        keypoints ORB detects                       (required)
    fast_threshold    FAST's threshold                            (default 20)
    scale_factor, n_levels, edge_threshold, patch_size            (OpenCV's defaults: 1.2, 8, 31, 31)
    min_side          smaller images are upscaled first           (default: none)
    max_side          larger images are downscaled first          (required)

OpenCV's ORB with its default Harris score; the grey image is resized once (`image_scale`, then into
[min_side, max_side]); nothing is detected on an image too small for ORB's border.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from siamese_retrieval.data.images import to_gray


def create_orb(cfg: Any, n_features: int | None = None) -> cv2.ORB:
    """OpenCV's ORB with the config's detector and pyramid knobs (`n_features`: instead of cfg.n_features)."""
    return cv2.ORB_create(
        nfeatures=int(cfg.n_features if n_features is None else n_features),
        scaleFactor=float(getattr(cfg, "scale_factor", 1.2)),
        nlevels=int(getattr(cfg, "n_levels", 8)),
        edgeThreshold=int(getattr(cfg, "edge_threshold", 31)),
        firstLevel=0,
        WTA_K=2,
        scoreType=cv2.ORB_HARRIS_SCORE,
        patchSize=int(getattr(cfg, "patch_size", 31)),
        fastThreshold=int(getattr(cfg, "fast_threshold", 20)),
    )


def resized_gray(image: np.ndarray, cfg: Any, image_scale: float = 1.0) -> np.ndarray:
    """The grey image scaled by `image_scale`, then up to cfg.min_side (shorter side) and down to cfg.max_side
    (longer side), whichever applies last winning."""
    gray = to_gray(image)
    h, w = gray.shape[:2]
    if h == 0 or w == 0:
        return gray
    scale = float(image_scale)
    min_side = getattr(cfg, "min_side", 0)
    if min(h, w) * scale < min_side:
        scale = min_side / min(h, w)
    if max(h, w) * scale > cfg.max_side:
        scale = cfg.max_side / max(h, w)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return gray


@dataclass
class Detected:
    """ORB's keypoints on one resized image of w x h px, in OpenCV's order; `desc` (n, 32) uint8."""

    kps: Sequence[cv2.KeyPoint]
    desc: np.ndarray
    w: int
    h: int

    def points(self) -> np.ndarray:
        return np.array([k.pt for k in self.kps], np.float64).reshape(-1, 2)


def detect(image: np.ndarray, cfg: Any, orb: cv2.ORB | None = None, image_scale: float = 1.0) -> Detected | None:
    """ORB on one decoded image (grey, BGR or BGRA): no keypoints when nothing is found (blank, too small for
    ORB's border); None for an empty image. Never raises."""
    gray = resized_gray(image, cfg, image_scale)
    h, w = gray.shape[:2]
    if h == 0 or w == 0:
        return None
    nothing = Detected((), np.zeros((0, 32), np.uint8), w, h)
    border = max(getattr(cfg, "edge_threshold", 31), getattr(cfg, "patch_size", 31) // 2 + 1)
    if min(h, w) <= 2 * border:
        return nothing  # nothing can be detected that far from every border
    kps, desc = (orb or create_orb(cfg)).detectAndCompute(gray, None)
    if desc is None or not len(kps):  # OpenCV returns None descriptors when nothing is detected
        return nothing
    return Detected(kps, np.ascontiguousarray(desc, np.uint8), w, h)
