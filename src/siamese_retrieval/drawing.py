"""The image-tile helpers of every picture the package draws: the retrieval grids (retrieval/visualize.py), the
W&B per-query table (wandb_runs.py) and the synthetic city's contact sheet (data/synth/preview.py).

A foundation module (cv2, numpy and image_header.py only), so that each layer draws with the same tiles without
importing a layer above it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from siamese_retrieval.image_header import pixel_problem

WHITE = (255, 255, 255)  # RGB
FONT = cv2.FONT_HERSHEY_SIMPLEX


def thumb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The image at `path` as uint8 RGB resized to `size` = (W, H); mid-grey if it cannot be read, or if its header
    claims more pixels than data.max_image_pixels (image_header.py: never decoded)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    img = None
    if data and pixel_problem(data) is None:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # as cv2.imread(path, IMREAD_COLOR)
    if img is None:
        img = np.full((size[1], size[0], 3), 128, np.uint8)
    return cv2.cvtColor(cv2.resize(img, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def tile(img: np.ndarray, colour: tuple[int, int, int], label: str, border: int = 4, band: int = 0) -> np.ndarray:
    """`img` framed by `border` px of `colour` and labelled: in white over its bottom-left corner, or,
    with `band` > 0, in `colour` on a dark strip `band` px high below the frame."""
    framed = cv2.copyMakeBorder(img, border, border, border, border, cv2.BORDER_CONSTANT, value=colour)
    if not band:
        cv2.putText(framed, label, (border + 2, framed.shape[0] - border - 4), FONT, 0.38, WHITE, 1, cv2.LINE_AA)
        return framed
    strip = np.full((band, framed.shape[1], 3), 25, np.uint8)
    cv2.putText(strip, label, (4, 12), FONT, 0.4, colour, 1, cv2.LINE_AA)
    return np.vstack([framed, strip])
