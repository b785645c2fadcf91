"""Small, valid, on-disk datasets for tests: real JPEGs with texture (ORB finds keypoints).

Layout: `n_streets` straight streets running north, `street_spacing_m` apart in the east
direction (each street is its own place for any cell size below that spacing). Along each street
`per_street` database cameras stand `step_m` apart and `queries_per_street` query cameras stand
between them. Every camera sees the stretch [north, north + view_m] of its street; `fov` is the
IoU of two stretches on the same street (0 across streets) and `sim = fov >= sim_threshold`.
Images are crops of one textured strip per street at the camera's position, so overlapping
cameras see overlapping content. Pass `sim=` / `fov=` to override the ground truth.
The default 144 x 192 images give every image its 10 ORB keypoints (ORB ignores a 31-px border);
pass smaller sizes where keypoints do not matter (faster).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from siamese_retrieval.data.dataset import DatasetFiles, RetrievalDataset, read_dataset, write_dataset


def textured_image(rng: np.random.Generator, height: int = 192, width: int = 256) -> np.ndarray:
    """A BGR uint8 image with rectangles, circles, lines and noise: plenty of ORB corners."""
    img = np.full((height, width, 3), rng.integers(60, 200, 3), np.uint8)
    for _ in range(max(8, height * width // 1200)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        kind = rng.integers(3)
        if kind == 0:
            x1, y1 = x0 + int(rng.integers(5, 40)), y0 + int(rng.integers(5, 40))
            cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
        elif kind == 1:
            cv2.circle(img, (x0, y0), int(rng.integers(3, 20)), color, -1)
        else:
            cv2.line(img, (x0, y0), (int(rng.integers(0, width)), int(rng.integers(0, height))), color, 2)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def interval_iou(a0: np.ndarray, b0: np.ndarray, length: float) -> np.ndarray:
    """IoU of [a0, a0 + length] and [b0, b0 + length] for all pairs (len(a0), len(b0))."""
    inter = np.clip(length - np.abs(a0[:, None] - b0[None, :]), 0, None)
    return (inter / (2 * length - inter)).astype(np.float32)


def make_dataset(
    root: str | Path,
    n_streets: int = 3,
    per_street: int = 8,
    queries_per_street: int | None = None,
    *,
    street_spacing_m: float = 2000.0,
    step_m: float = 10.0,
    view_m: float = 30.0,
    sim_threshold: float = 0.5,
    height: int = 144,
    width: int = 192,
    px_per_m: float = 4.0,
    seed: int = 0,
    sim: np.ndarray | None = None,
    fov: np.ndarray | None = None,
    files: DatasetFiles | None = None,
    ext: str = ".jpg",
    check: str = "none",
) -> RetrievalDataset:
    """Write a dataset under `root` and return it as read back by `read_dataset`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    queries_per_street = per_street if queries_per_street is None else queries_per_street
    db_paths, db_loc, db_street, db_pos = [], [], [], []
    q_paths, q_loc, q_street, q_pos = [], [], [], []
    for s in range(n_streets):
        length_m = (max(per_street, queries_per_street) + 1) * step_m + view_m
        strip = textured_image(rng, height, int(length_m * px_per_m) + width)
        east = s * street_spacing_m

        def shoot(kind: str, j: int, north: float, noisy: bool) -> str:
            x = int(round(north * px_per_m))
            img = strip[:, x : x + width].copy()
            if noisy:
                img = np.clip(img.astype(np.int16) + rng.integers(-20, 21), 0, 255).astype(np.uint8)
            rel = f"{kind}/images/s{s:02d}_{j:03d}{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(ext, img)
            assert ok
            buf.tofile(str(root / rel))
            return rel

        for j in range(per_street):
            north = j * step_m
            db_paths.append(shoot("database", j, north, False))
            db_loc.append([east, north, 0.0])
            db_street.append(s)
            db_pos.append(north)
        for j in range(queries_per_street):
            north = (j + 0.5) * step_m
            q_paths.append(shoot("query", j, north, True))
            q_loc.append([east, north, 0.0])
            q_street.append(s)
            q_pos.append(north)
    db_street, q_street = np.array(db_street), np.array(q_street)
    if fov is None:
        fov = interval_iou(np.array(q_pos), np.array(db_pos), view_m)
        fov[q_street[:, None] != db_street[None, :]] = 0.0
    fov = np.asarray(fov, np.float32)
    if sim is None:
        sim = fov >= sim_threshold
    write_dataset(root, db_paths, np.array(db_loc), q_paths, np.array(q_loc), sim, fov, files=files)
    return read_dataset(root, files=files, check=check)
