"""The classical baseline: ORB features + brute-force Hamming matching + Lowe ratio test + RANSAC homography.

    feats = extract_features(paths, OrbRansacConfig())          # retrieval/orb_features.py: once per image, cached
    scores = score_matrix(q_feats, db_feats, cfg, workers=2)    # (n_q, n_db) inlier counts, higher = more similar
    inliers = rerank_scores(top_ids, q_feats, db_feats, cfg)    # (n_q, N) inliers of a learned model's top-N

The score of a (query, database) pair is the number of RANSAC inliers of a homography fitted to the
ratio-test matches (0 when fewer than `min_matches` survive or no homography is found). The features come from
the verification wing's one extractor (retrieval/orb_features.py), set by this config's n_features,
fast_threshold, min_side and max_side.

Matching is brute force over all descriptor pairs with FAISS' binary (popcount) kernel, then the
ratio test on the two nearest. Threads, not processes: OpenCV and FAISS release the GIL, so a thread
pool over queries uses every core without copying the database features. OpenCV's and FAISS' own
threading is set to 1 meanwhile (parallel over queries, not inside each call) and restored afterwards. cv2's RANSAC
seeds its RNG per call, so scores are deterministic.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import cv2
import faiss
import numpy as np

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.search import OrbRansac
from siamese_retrieval.parallel import chunked_map, opencv_single_threaded
from siamese_retrieval.progress import counted, progress
from siamese_retrieval.retrieval.index import set_faiss_threads
from siamese_retrieval.retrieval.orb_features import Features, OrbFeatureConfig

log = logging.getLogger(__name__)

# cv2.RANSAC spends ~1.5 ms per call whatever the number of matches (measured: 8 to 100 matches);
# USAC_DEFAULT (LO-RANSAC in OpenCV's USAC framework) finds the same consensus in 0.03-0.4 ms.
_METHODS = {"usac": cv2.USAC_DEFAULT, "ransac": cv2.RANSAC, "rho": cv2.RHO}


@dataclass(frozen=True)
class OrbRansacConfig(OrbFeatureConfig):
    """OrbFeatureConfig's feature fields (declared there once) and RANSAC's; by keyword: the inherited come first."""

    ratio: float = 0.8  # Lowe's ratio test: best / second-best Hamming distance below this
    ransac_threshold: float = 5.0  # reprojection error (px, in the resized frame) for an inlier
    ransac_max_iters: int = 2000
    ransac_method: str = "usac"  # usac (cv2.USAC_DEFAULT, LO-RANSAC) | ransac (cv2.RANSAC) | rho (cv2.RHO)
    min_matches: int = 8  # fewer ratio-test matches than this: score 0 (4 is the homography minimum)

    def __post_init__(self) -> None:  # the orb_ransac schema checks the feature fields too (not `features`)
        check_fields(self, OrbRansac, "orb_ransac")


@contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """OpenCV and FAISS (OpenMP) run single-threaded inside our thread pool; restored afterwards."""
    with opencv_single_threaded():
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            set_faiss_threads()


# ----------------------------------------------------------------------------------------- verification


def hamming_knn2(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force Hamming 2-NN of each row of `a` among the rows of `b` (packed (n, 32) uint8).

    FAISS' binary brute force (popcount) instead of cv2.BFMatcher.knnMatch: the same exhaustive
    search, ~5x faster here and no DMatch objects (850 x 850 descriptors: 1.4 ms vs 7 ms on 2 cores).
    """
    return faiss.knn_hamming(np.ascontiguousarray(a), np.ascontiguousarray(b), 2)


def _ransac(a: Features, b: Features, cfg: OrbRansacConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any] | None:
    """(ratio-test query rows, their database rows, RANSAC inlier mask, homography), or None when none fits."""
    if len(a) < 2 or len(b) < 2:
        return None
    dist, idx = hamming_knn2(a.desc, b.desc)
    good = np.flatnonzero(dist[:, 0] < cfg.ratio * dist[:, 1])
    if len(good) < cfg.min_matches:
        return None
    src = a.points[good].reshape(-1, 1, 2)
    dst = b.points[idx[good, 0]].reshape(-1, 1, 2)
    h, mask = cv2.findHomography(src, dst, _METHODS[cfg.ransac_method], cfg.ransac_threshold,
                                  maxIters=cfg.ransac_max_iters)
    if h is None or mask is None:
        return None
    return good, idx[good, 0], mask.ravel().astype(bool), h


def inlier_count(a: Features, b: Features, cfg: OrbRansacConfig = OrbRansacConfig()) -> int:
    """RANSAC homography inliers among the ratio-test matches from `a` to `b` (0 if it cannot be fitted)."""
    fit = _ransac(a, b, cfg)
    return 0 if fit is None else int(fit[2].sum())


# What one verification knows beyond its inlier count: the evidence of a candidate (rerank=fused's trust rule,
# retrieval/trust.py). Ratios and fractions, not counts: they mean the same at any image size.
EVIDENCE = ("inliers", "inlier_ratio", "coverage", "one_to_one", "sane")
COVERAGE_GRID = 4  # inliers' coverage: the fraction of a 4 x 4 grid over each image holding one, the smaller side


def pair_evidence(a: Features, b: Features, cfg: OrbRansacConfig = OrbRansacConfig()) -> np.ndarray:
    """The EVIDENCE of `b` as a match of `a` (float32, len(EVIDENCE)); all zeros when no homography fits.

    inlier_ratio: inliers / ratio-test matches. coverage: how much of both images the inliers span (grid cells).
    one_to_one: distinct database keypoints / inliers (a repeated pattern maps many query points onto a few).
    sane: 1 when the homography keeps orientation and its local scale in [1/4, 4] with little shear
    (singular values within 8x of each other); a degenerate fit on a periodic pattern often fails this."""
    fit = _ransac(a, b, cfg)
    if fit is None:
        return np.zeros(len(EVIDENCE), np.float32)
    rows, cols, mask, h = fit
    n = int(mask.sum())
    if n == 0:
        return np.zeros(len(EVIDENCE), np.float32)
    cover = min(_coverage(a.points[rows[mask]], a.wh), _coverage(b.points[cols[mask]], b.wh))
    return np.array([n, n / len(rows), cover, len(np.unique(cols[mask])) / n, _sane(h)], np.float32)


def _coverage(points: np.ndarray, wh: np.ndarray) -> float:
    cells = np.clip((points / np.maximum(wh, 1.0) * COVERAGE_GRID).astype(int), 0, COVERAGE_GRID - 1)
    return len(np.unique(cells[:, 1] * COVERAGE_GRID + cells[:, 0])) / COVERAGE_GRID**2


def _sane(h: np.ndarray) -> float:
    if abs(h[2, 2]) < 1e-12:
        return 0.0
    a = h[:2, :2] / h[2, 2]
    sv = np.linalg.svd(a, compute_uv=False)
    det = float(np.linalg.det(a))
    return float(det > 0 and 1 / 16 <= det <= 16 and sv[1] > 0 and sv[0] / sv[1] <= 8)


PairMeasure = Callable[[Features, Features, OrbRansacConfig], Any]  # inlier_count or pair_evidence


def _parallel_rows(rows: list[tuple[Features, Sequence[int]]], db: Sequence[Features], cfg: OrbRansacConfig,
                   workers: int, description: str, measure: PairMeasure = inlier_count) -> list[np.ndarray]:
    def score(chunk: Sequence[tuple[Features, Sequence[int]]]) -> list[np.ndarray]:
        return [np.array([measure(q, db[j], cfg) for j in cand], np.float32) for q, cand in chunk]

    with progress(description, total=len(rows)) as advance:  # one tick per query
        parts = chunked_map(counted(score, advance), rows, workers, max_chunk=1, pool_context=single_threaded_kernels)
    return [row for part in parts for row in part]


def score_matrix(queries: Sequence[Features], db: Sequence[Features], cfg: OrbRansacConfig = OrbRansacConfig(),
                 workers: int = 2) -> np.ndarray:
    """(n_q, n_db) float32 inlier counts: every query verified against the full database, queries in parallel."""
    everything = range(len(db))
    rows = _parallel_rows([(q, everything) for q in queries], db, cfg, workers,
                          f"ORB+RANSAC: queries vs {len(db)} database images")
    return np.stack(rows) if rows else np.zeros((0, len(db)), np.float32)


def _candidate_rows(candidates: np.ndarray, queries: Sequence[Features], db: Sequence[Features],
                    cfg: OrbRansacConfig, workers: int, description: str, measure: PairMeasure = inlier_count,
                    width: tuple[int, ...] = ()) -> np.ndarray:
    """`measure` of each query against its candidate database ids, (n_q, N, *width); -1 candidates: zeros."""
    rows = _parallel_rows([(q, [int(j) for j in cand if j >= 0]) for q, cand in zip(queries, candidates)],
                          db, cfg, workers, description, measure)
    out = np.zeros((*candidates.shape, *width), np.float32)
    for i, (r, cand) in enumerate(zip(rows, candidates)):
        kept = np.flatnonzero(cand >= 0)
        out[i, kept] = r.reshape(len(kept), *width)
    return out


def rerank_evidence(candidates: np.ndarray, queries: Sequence[Features], db: Sequence[Features],
                    cfg: OrbRansacConfig = OrbRansacConfig(), workers: int = 2) -> np.ndarray:
    """The EVIDENCE (n_q, N, len(EVIDENCE)) of each query's N candidate database ids (-1: none, all zeros)."""
    return _candidate_rows(candidates, queries, db, cfg, workers,
                           f"ORB+RANSAC evidence: queries vs their top {candidates.shape[1]}", pair_evidence,
                           (len(EVIDENCE),))


def rerank_scores(candidates: np.ndarray, queries: Sequence[Features], db: Sequence[Features],
                  cfg: OrbRansacConfig = OrbRansacConfig(), workers: int = 2) -> np.ndarray:
    """Inlier counts (n_q, N) of each query against its N candidate database ids (a model's top-N)."""
    return _candidate_rows(candidates, queries, db, cfg, workers,
                           f"ORB+RANSAC re-ranking: queries vs their top {candidates.shape[1]}")
