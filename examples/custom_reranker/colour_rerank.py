"""A re-ranker of your own, outside the package: `colour_hist`.

The model's top N candidates of each query are re-ordered by a mix of the model's relevance and how much
colour the two images share: the intersection of their normalised hue-saturation histograms (1: the same
colours, 0: none in common). The rest of the ranking keeps the model's order, below the top N.

    score = 1 + (1 - weight) * relevance + weight * intersection      (the top N only)

Importing this module registers the builder; `imports=[colour_rerank] rerank=colour_hist` chooses it, in
siamese-evaluate and siamese-retrieve alike (both build re-rankers with retrieval/rerankers.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from siamese_retrieval.errors import ConfigError, DatasetError
from siamese_retrieval.registry import RERANKERS
from siamese_retrieval.retrieval.rerankers import RerankSource


def colour_histogram(path: Path, bins: int) -> np.ndarray:
    """The image's bins x bins hue-saturation histogram, summing to 1."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot read the image")
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [bins, bins], [0, 180, 0, 256]).ravel().astype(np.float64)
    return hist / max(hist.sum(), 1.0)


class ColourHistReranker:
    """(rows, ids, scores) -> (ids, scores): rows index `query_files`, ids the database, best first."""

    def __init__(self, top_n: int, weight: float, bins: int, query_files: list[Path], db_files: list[Path]) -> None:
        self.top_n, self.weight = top_n, weight
        self.query_files, self.db_files = query_files, db_files
        self.histogram = lru_cache(maxsize=None)(lambda path: colour_histogram(path, bins))  # each image once

    def __call__(self, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.top_n, ids.shape[1])
        colour = np.array([[np.minimum(self.histogram(self.query_files[r]), self.histogram(self.db_files[j])).sum()
                            for j in ids[i, :n]] for i, r in enumerate(rows)]).reshape(len(rows), n)
        mixed = (1.0 - self.weight) * scores[:, :n].astype(np.float64) + self.weight * colour
        order = np.argsort(-mixed, axis=1, kind="stable")  # ties: the model's order
        ids, scores = ids.copy(), scores.astype(np.float32)
        ids[:, :n] = np.take_along_axis(ids[:, :n], order, axis=1)
        scores[:, :n] = 1.0 + np.take_along_axis(mixed, order, axis=1)  # the top N stays above the rest
        return ids, scores


@RERANKERS.register("colour_hist")
def build_colour_hist(cfg: Mapping[str, Any], source: RerankSource) -> ColourHistReranker:
    top_n, weight, bins = int(cfg.get("top_n", 20)), float(cfg.get("weight", 0.5)), int(cfg.get("bins", 16))
    if top_n < 1 or not 0.0 <= weight <= 1.0 or bins < 2:
        raise ConfigError(f"rerank=colour_hist: needs top_n >= 1, 0 <= weight <= 1, bins >= 2 (got {top_n}, "
                          f"{weight}, {bins})")
    ds = source.dataset
    if source.query_files is not None:  # siamese-retrieve: photos from outside the dataset
        queries = list(source.query_files)
    else:  # siamese-evaluate: the dataset's queries of the split being ranked
        queries = [ds.query_file(int(i)) for i in source.query_idx]
    return ColourHistReranker(top_n, weight, bins, queries, [ds.db_file(j) for j in range(ds.n_db)])
