"""Retrieval example grids: a query followed by its top-k, bordered green (relevant) or red.

`thumb` and `tile` are the image-tile helpers of every picture the package draws (these grids and
the synthetic city's contact sheet, data/synth/preview.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from siamese_retrieval.io_utils import atomic_path

GREEN, RED, GREY, WHITE = (40, 180, 60), (210, 40, 40), (90, 90, 90), (255, 255, 255)  # RGB


def thumb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The image at `path` as uint8 RGB resized to `size` = (W, H); mid-grey if it cannot be read."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        img = np.full((size[1], size[0], 3), 128, np.uint8)
    return cv2.cvtColor(cv2.resize(img, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def tile(img: np.ndarray, colour: tuple[int, int, int], label: str, border: int = 4, band: int = 0) -> np.ndarray:
    """`img` framed by `border` px of `colour` and labelled: in white over its bottom-left corner, or,
    with `band` > 0, in `colour` on a dark strip `band` px high below the frame."""
    framed = cv2.copyMakeBorder(img, border, border, border, border, cv2.BORDER_CONSTANT, value=colour)
    if not band:
        cv2.putText(framed, label, (border + 2, framed.shape[0] - border - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    WHITE, 1, cv2.LINE_AA)
        return framed
    strip = np.full((band, framed.shape[1], 3), 25, np.uint8)
    cv2.putText(strip, label, (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return np.vstack([framed, strip])


def retrieval_grid(
    query_files: Sequence[Path],
    ranked_files: Sequence[Sequence[Path]],
    relevant: Sequence[Sequence[bool]] | None,
    scores: Sequence[Sequence[float]] | None = None,
    thumb_size: tuple[int, int] = (128, 96),
) -> np.ndarray:
    """RGB uint8 grid: one row per query, then its ranked results.

    With labels, results are bordered green/red and the query grey; without (`relevant=None`, e.g. a
    user's own photo), results are grey and the query white.
    """
    rows = []
    for i, qf in enumerate(query_files):
        tiles = [tile(thumb(qf, thumb_size), GREY if relevant is not None else WHITE, "query")]
        for j, f in enumerate(ranked_files[i]):
            label = f"#{j + 1}" + (f" {scores[i][j]:.2f}" if scores is not None else "")
            colour = GREY if relevant is None else GREEN if relevant[i][j] else RED
            tiles.append(tile(thumb(f, thumb_size), colour, label))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path
