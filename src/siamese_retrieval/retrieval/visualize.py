"""Retrieval pictures: example grids (a query, its top-k bordered green (relevant) or red, and its best positive)
and the recall@k curve with its chance line. `ranking` is a retrieval.ranking.Ranking (not imported: it draws).

The image tiles come from drawing.py, shared with every other picture the package draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from siamese_retrieval.drawing import FONT, WHITE, thumb
from siamese_retrieval.io_utils import atomic_path

GREEN, RED, GREY = (40, 180, 60), (210, 40, 40), (90, 90, 90)  # RGB
BLUE = (40, 110, 230)  # the best ground-truth positive
LIGHT, DARK, PAPER = (235, 235, 235), (25, 25, 25), (255, 255, 255)
CURVE_K = 25  # recall@k is drawn for k = 1..CURVE_K

# grid layout (px): tile frame, the two text lines under each tile, column titles, gaps, legend
BORDER, LINE_H, HEADER_H, GAP, SPACE, LEGEND_H = 5, 17, 26, 12, 3, 30  # SPACE: between tiles


def _fit(text: str, width: int, scale: float) -> str:
    """`text` cut (with "..") to fit `width` px at `scale`."""
    if cv2.getTextSize(text, FONT, scale, 1)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "..", FONT, scale, 1)[0][0] > width:
        text = text[:-1]
    return text + ".."


def _card(img: np.ndarray | None, colour: tuple[int, int, int], lines: Sequence[tuple[str, tuple[int, int, int]]],
          size: tuple[int, int]) -> np.ndarray:
    """A grid cell: `img` (None: an empty dark cell) in a `colour` frame over two lines of text on a dark band."""
    w, h = size
    body = np.full((h, w, 3), 45, np.uint8) if img is None else img
    framed = cv2.copyMakeBorder(body, BORDER, BORDER, BORDER, BORDER, cv2.BORDER_CONSTANT,
                                value=colour if img is not None else DARK)
    band = np.full((2 * LINE_H + 4, framed.shape[1], 3), DARK, np.uint8)
    for i, (text, text_colour) in enumerate(lines[:2]):
        cv2.putText(band, _fit(text, band.shape[1] - 10, 0.45), (5, 14 + i * LINE_H), FONT, 0.45, text_colour, 1,
                    cv2.LINE_AA)
    return np.vstack([framed, band])


def _strip(width: int, height: int, text: str, scale: float = 0.5, x: int | None = None) -> np.ndarray:
    """White strip with dark `text` centred (or at `x`), cut to fit."""
    strip = np.full((height, width, 3), PAPER, np.uint8)
    text = _fit(text, width - 8, scale)
    tw, th = cv2.getTextSize(text, FONT, scale, 1)[0]
    cv2.putText(strip, text, ((width - tw) // 2 if x is None else x, (height + th) // 2), FONT, scale, DARK, 1,
                cv2.LINE_AA)
    return strip


def _gap(height: int, width: int = GAP) -> np.ndarray:
    return np.full((height, width, 3), PAPER, np.uint8)


def _join(cells: Sequence[np.ndarray | None], height: int) -> np.ndarray:
    """Cells side by side, SPACE px apart; None: a GAP px gap between column groups."""
    parts: list[np.ndarray] = []
    for prev, cell in zip([None, *cells[:-1]], cells):
        if cell is None:
            parts.append(_gap(height))
        else:
            if prev is not None:
                parts.append(_gap(height, SPACE))
            parts.append(cell)
    return np.concatenate(parts, axis=1)


def retrieval_grid(
    query_files: Sequence[Path],
    ranked_files: Sequence[Sequence[Path]],
    relevant: Sequence[Sequence[bool]] | None,
    scores: Sequence[Sequence[float]] | None = None,
    thumb_size: tuple[int, int] = (160, 120),
    *,
    query_labels: Sequence[str | Sequence[str]] | None = None,
    fovs: Sequence[Sequence[float]] | None = None,
    best_files: Sequence[Path | None] | None = None,
    best_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """RGB uint8 grid: column titles, then one row per query: the query, its ranked results, and (with
    `best_files`) the query's best ground-truth positive in a column of its own; a legend below.

    With labels (`relevant`), results are framed green/red and the query grey; without (e.g. a user's own
    photo), results are grey and the query white. Each tile has up to two text lines: the query's
    `query_labels[i]` (lines, or one string with "\\n": e.g. its id and its condition), a result's rank and
    score and its `fovs` (the graded overlap with the query), the best positive's `best_labels[i]` (a None
    best file: "no positive"). The legend explains the colours (only with labels).
    """
    n_cols = max((len(r) for r in ranked_files), default=0)
    w, h = thumb_size
    cell_w = w + 2 * BORDER
    rows = []
    for i, qf in enumerate(query_files):
        q_lines = ["query"] if query_labels is None else (
            query_labels[i].split("\n") if isinstance(query_labels[i], str) else list(query_labels[i]))
        cells = [_card(thumb(qf, thumb_size), GREY if relevant is not None else WHITE,
                       [(t, LIGHT) for t in q_lines], thumb_size), None]
        for j, f in enumerate(ranked_files[i]):
            colour = GREY if relevant is None else GREEN if relevant[i][j] else RED
            text_colour = LIGHT if relevant is None else (140, 230, 150) if relevant[i][j] else (255, 150, 150)
            lines = [(f"score {scores[i][j]:.3f}" if scores is not None else f"#{j + 1}", LIGHT)]
            if fovs is not None:
                lines.append((f"fov {fovs[i][j]:.2f}", text_colour))
            cells.append(_card(thumb(f, thumb_size), colour, lines, thumb_size))
        cells += [np.full_like(cells[0], PAPER)] * (n_cols - len(ranked_files[i]))  # fewer results: blank
        if best_files is not None:
            cells.append(None)
            best = best_files[i]
            label = best_labels[i] if best_labels is not None else ""
            if best is None:
                cells.append(_card(None, DARK, [("no positive", LIGHT)], thumb_size))
            else:
                cells.append(_card(thumb(best, thumb_size), BLUE, [("best positive", LIGHT), (label, (160, 195, 255))],
                                   thumb_size))
        rows.append(_join(cells, cells[0].shape[0]))
        rows.append(np.full((GAP // 2, rows[-1].shape[1], 3), PAPER, np.uint8))
    titles = ["query", None] + [f"#{j + 1}" for j in range(n_cols)]
    titles += [None, "best positive"] if best_files is not None else []
    header = _join([None if t is None else _strip(cell_w, HEADER_H, t) for t in titles], HEADER_H)
    width = header.shape[1]
    parts = [header] + rows
    if relevant is not None:
        items = ["green: relevant (sim = 1)", "red: not relevant"]
        if fovs is not None:
            items.append("fov: view overlap with the query (0-1)")
        if best_files is not None:
            items.append("blue: best ground-truth positive (highest fov)")
        parts.append(_legend(width, items))
    return np.concatenate(parts, axis=0)


def _legend(width: int, items: Sequence[str], scale: float = 0.45) -> np.ndarray:
    """The items on as many LEGEND_H-high lines as the width needs."""
    lines: list[str] = []
    for item in items:
        joined = f"{lines[-1]}     {item}" if lines else item
        if lines and cv2.getTextSize(joined, FONT, scale, 1)[0][0] <= width - 12:
            lines[-1] = joined
        else:
            lines.append(item)
    return np.concatenate([_strip(width, LEGEND_H, line, scale=scale, x=6) for line in lines], axis=0)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path


def recall_curve(ranking: Any, max_k: int = CURVE_K) -> tuple[np.ndarray, np.ndarray]:
    """(k = 1..max_k, recall@k) over the queries that have a positive."""
    ks = np.arange(1, max_k + 1)
    ranks = ranking.first_positive_rank[ranking.first_positive_rank > 0]
    if not len(ranks):
        return ks, np.full(len(ks), np.nan)
    return ks, (ranks[None, :] <= ks[:, None]).mean(axis=1)


def plot_recall_curve(path: Path, ranking: Any, title: str = "", truth: Any = None) -> dict[str, np.ndarray]:
    """recall@k for k = 1..CURVE_K, and with `truth` (the dataset, or any ground truth) the chance line:
    the expected recall@k of a random ranking, 1 - C(n - p, k) / C(n, k) for a query with p of n database
    images relevant, averaged over the queries with a positive (as recall@k is). Returns what is plotted:
    {"k", "recall", "chance" (absent without truth)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, recall = recall_curve(ranking)
    curves = {"k": ks, "recall": recall}
    if truth is not None:
        from siamese_retrieval.data.ground_truth import as_ground_truth

        relevance = as_ground_truth(truth)
        n, p = relevance.n_db, relevance.n_positives(np.asarray(ranking.query_idx)).astype(np.float64)
        p = p[p > 0]
        if len(p):
            # C(n - p, k) / C(n, k) = prod_{i < k} (n - p - i) / (n - i): no relevant image among k random ones
            i = np.arange(len(ks), dtype=np.float64)[:, None]
            ratio = np.clip((n - p[None, :] - i) / np.maximum(n - i, 1.0), 0.0, 1.0)
            curves["chance"] = (1.0 - np.cumprod(ratio, axis=0)).mean(axis=1)

    def at(values: np.ndarray) -> str:  # "R@1 0.83, R@5 0.96, R@10 0.96"
        return ", ".join(f"R@{k} {values[k - 1]:.{2 if values[k - 1] >= 0.1 else 3}f}" for k in (1, 5, 10)
                         if k <= len(values) and np.isfinite(values[k - 1]))

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(ks, recall, marker="o", markersize=3, color="tab:blue", label=f"this ranking ({at(recall)})")
    if "chance" in curves:
        ax.plot(ks, curves["chance"], linestyle="--", color="grey", label=f"random ranking ({at(curves['chance'])})")
    ax.set_xlabel("k (the top k database images)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(1, ks[-1])
    ax.set_xticks([1, *range(5, int(ks[-1]) + 1, 5)])
    ax.grid(alpha=0.3)
    heading = f"recall@k over {int((ranking.first_positive_rank > 0).sum())} queries with a positive"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return curves
