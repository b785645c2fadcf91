"""Contact sheet of a dataset: each row is a query, its best positives (green) and its hardest
negatives (red: fov = 0 but the closest by a thumbnail distance, i.e. look-alike places)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.images import thumbnail
from siamese_retrieval.drawing import thumb, tile
from siamese_retrieval.io_utils import atomic_path

GREEN, RED, WHITE = (60, 200, 60), (230, 50, 50), (235, 235, 235)  # RGB


def _tile(path: Path, text: str, colour, size: tuple[int, int]) -> np.ndarray:
    return tile(thumb(path, size), colour, text, band=16)


def write_contact_sheet(root, png_path, n_queries: int = 6, n_pos: int = 3, n_neg: int = 3, seed: int = 0, tile_size: tuple[int, int] = (192, 144)) -> Path:
    """Write a PNG contact sheet for the dataset at `root`; returns its path."""
    ds = read_dataset(root, check="exists")
    if ds.is_sparse:  # the sheet compares every database thumbnail with each query: a small-city tool
        raise ValueError(f"{root}: {ds.n_db} database images with sparse ground truth; the contact sheet is for "
                         "small cities (dense gt.h5)")
    rng = np.random.default_rng(seed)
    has_pos = np.flatnonzero(ds.sim.any(1))
    if len(has_pos) == 0:
        raise ValueError(f"{root}: no query has a positive; nothing to preview")
    chosen = np.sort(rng.choice(has_pos, size=min(n_queries, len(has_pos)), replace=False))
    db_thumbs = np.stack([thumbnail(ds.db_file(i)) for i in range(ds.n_db)])
    blank = np.full((tile_size[1] + 8 + 16, tile_size[0] + 8, 3), 40, np.uint8)
    rows = []
    for q in chosen:
        fov = ds.fov[q]
        pos = [i for i in np.argsort(-fov, kind="stable") if ds.sim[q, i]][:n_pos]
        dist = ((db_thumbs - thumbnail(ds.query_file(q))[None]) ** 2).sum(1)
        dist[fov > 0] = np.inf
        neg = [i for i in np.argsort(dist, kind="stable")[:n_neg] if np.isfinite(dist[i])]
        tiles = [_tile(ds.query_file(q), f"query {q}", WHITE, tile_size)]
        tiles += [_tile(ds.db_file(i), f"fov {fov[i]:.2f}", GREEN, tile_size) for i in pos]
        tiles += [blank] * (n_pos - len(pos))
        tiles += [_tile(ds.db_file(i), f"fov {fov[i]:.2f}", RED, tile_size) for i in neg]
        tiles += [blank] * (n_neg - len(neg))
        rows.append(np.hstack(tiles))
    sheet = cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR)
    png_path = Path(png_path)
    # atomic_path gives the file normal permissions (not a temporary's private ones): a preview is for sharing
    with atomic_path(png_path, suffix=png_path.suffix or ".png") as tmp:
        if not cv2.imwrite(str(tmp), sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            raise OSError(f"could not write {png_path}")
    return png_path
