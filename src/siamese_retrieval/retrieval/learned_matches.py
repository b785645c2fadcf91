"""A learned match verifier: re-rank a model's top-N by a small network's verdict on the putative ORB matches.

    feats = cached_features(files, key, cfg.features, cache_dir)   # retrieval/orb_features.py, once per image
    x, mask, _ = match_features(q, [feats[j] for j in candidates], cfg.matching)   # (N, M, 9), (N, M)
    net = verifier_fit.fit_or_load(train_data, cfg, cache_dir)           # fitted on the TRAINING split, cached
    scores = LearnedVerifier(net, q_feats, db_feats, cfg)(rows, candidates)     # (n, N) pair scores

Matching (one query against all its N candidates at once): one FAISS Hamming distance matrix (n_q, N x F),
the two nearest candidate features of each query feature (Lowe's ratio test), kept when mutual (the query
feature is also the nearest of the candidate feature among the query's). No per-pair kd-tree, heap or
RANSAC: that is what makes it cheaper than orb_ransac's per-pair 2-NN + USAC homography.

Each putative match becomes 9 numbers: (xq, yq, xd, yd) divided by each image's size, Hamming distance / 256,
the ratio d1 / d2, cos and sin of the keypoint angle difference, log of the keypoint size ratio. The network
(Yi et al. 2018, "Learning to Find Good Correspondences") is PointNet-style: a shared per-match MLP whose
residual blocks normalise every channel over the pair's matches (context normalisation: mean and variance
of the valid matches only), so it sees the whole match set yet is invariant to its order and to padding. It
gives an inlier logit per match and a pair score: `pool=inliers` sums the inlier probabilities (a soft inlier
count), `pool=learned` reads the pooled features (mean, max, soft count, match count) with a small head
(the probability that the pair is relevant).

Training (retrieval/verifier_fit.py: a Lightning fit at first use, or `python evaluate.py rerank=learned_matches
fit_only=true`; cached): the training split's queries against the
training database only (splits.train_db; never a val/test query or place). Per query: its positives,
partial overlaps (0 < fov, not relevant) and look-alikes (the nearest fov = 0 database images by the 16x12
thumbnail). Match labels: RANSAC homography inliers (cv2 USAC) of the pair's matches, and with
`labels=ransac_relevant` only in relevant pairs; pair labels: `sim`. The cache holds state_dict tensors only
(torch.load(weights_only=True)); the architecture always comes from the config.

Combining (`combine`): `replace` orders the top N by the pair score (LearnedReranker), as rerank=orb_ransac
does with inlier counts; `fused` (the default) hands the soft inlier counts to rerank=fused's rule
(ranking.FusedReranker): candidates whose count is high and stands out from the query's other candidates move
ahead, the model's order stays otherwise. On the default city (seed 0's cnn_snn, top 20) val recall@1 was
0.800 replacing and 0.853 fused (the model alone 0.853), which picked the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import faiss
import numpy as np
import torch
from torch import nn

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.search import Rerank
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.retrieval.orb_features import Features, OrbFeatureConfig
from siamese_retrieval.retrieval.orb_ransac import single_threaded_kernels
from siamese_retrieval.retrieval.ranking import reorder_top

N_INPUTS = 9  # per-match features (see match_features)
_FAR = 1 << 20  # Hamming distance of a padded (absent) candidate feature


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MatchingConfig:
    ratio: float = 0.9  # Lowe's ratio test on the two nearest (looser than RANSAC's: the network filters)
    mutual: bool = True  # keep a match only if it is also the candidate feature's nearest query feature
    max_matches: int = 128  # per pair, the best by ratio (the network's padded width)


@dataclass(frozen=True)
class NetworkConfig:
    hidden: int = 32  # channels of the per-match MLP
    blocks: int = 3  # residual blocks (2 x linear + context norm + ReLU)
    pool: str = "inliers"  # inliers (sum of inlier probabilities) | learned (pooled head: P(relevant))


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    positives: int = 4  # per training query: relevant database images (sim = 1)
    partial: int = 4  # ... overlapping but not relevant (0 < fov, sim = 0)
    lookalikes: int = 8  # ... nearest fov = 0 database images by thumbnail (hard negatives)
    labels: str = "ransac"  # ransac: every homography inlier | ransac_relevant: only in relevant pairs
    ransac_threshold: float = 5.0  # px (resized frame) for a RANSAC inlier label
    min_matches: int = 8  # fewer matches: no homography, every match an outlier
    epochs: int = 40
    batch_pairs: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    match_loss: float = 1.0  # weight of the per-match inlier BCE
    pair_loss: float = 1.0  # weight of the pair BCE on sim (pool=learned only)
    max_seconds: float = 120.0  # training stops after this many seconds (epochs left undone are logged)


@dataclass(frozen=True)
class LearnedMatchesConfig:
    top_n: int = 20
    combine: str = "trusted"  # trusted: rerank=fused's abstaining rule + the verifier's agreement | replace: order
    #   by the verifier (+ model_weight x relevance) | fused: FusedReranker on soft inlier counts
    trust_threshold: float = 0.5  # combine=trusted: re-rank a query when P(challenger right) >= this
    max_challenger_rank: int | None = 10  # combine=trusted: a challenger the model ranked below this abstains
    model_weight: float = 0.0  # combine=replace: verifier score + model_weight x the model's relevance
    min_inliers: int = 12  # combine=fused: soft inlier count for a candidate to count as verified ...
    outlier_z: float = 5.0  # ... and this many spreads above the median of the query's top N (FusedReranker)
    saturate: int | None = None  # combine=fused: null (= min_inliers): verified candidates keep the model's order
    workers: int = 2
    features: OrbFeatureConfig = field(default_factory=lambda: OrbFeatureConfig(n_features=256))
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_fields(self, Rerank, "rerank")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "LearnedMatchesConfig":
        """From the rerank= node (a plain dict; `name` ignored). Unknown keys are a ConfigError."""
        m = {k: v for k, v in dict(m).items() if k != "name"}
        parts = {"features": OrbFeatureConfig, "matching": MatchingConfig, "network": NetworkConfig, "train": TrainConfig}
        try:
            kwargs = {k: (parts[k](**dict(v or {})) if k in parts else v) for k, v in m.items()}
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # an unknown key; a feature setting out of range (OrbFeatureConfig)
            raise ConfigError(f"rerank (learned_matches): {exc}") from None


# ----------------------------------------------------------------------------------------- matching


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) int32 Hamming distances of packed (n, 32) uint8 descriptors: FAISS' popcount kernel,
    one call for all pairs (a 256 x 5120 matrix takes ~1 ms on one core)."""
    a, b = np.ascontiguousarray(a, np.uint8), np.ascontiguousarray(b, np.uint8)
    out = np.empty((len(a), len(b)), np.int32)
    if len(a) and len(b):
        faiss.hammings(faiss.swig_ptr(a), faiss.swig_ptr(b), len(a), len(b), a.shape[1], faiss.swig_ptr(out))
    return out


@dataclass
class Matches:
    """The putative matches of one query with N candidates, padded to M per pair: per-match features x (N, M, 9),
    valid mask (N, M), and the matched keypoint indices qi, di (N, M) (-1 where padded)."""

    x: np.ndarray
    mask: np.ndarray
    qi: np.ndarray
    di: np.ndarray


def match_features(q: Features, cands: Sequence[Features | None], cfg: MatchingConfig = MatchingConfig()) -> Matches:
    """Putative matches of `q` with every candidate (None: no candidate, no matches) and their 9 features:
    xq, yq, xd, yd (divided by the image's width / height), hamming / 256, ratio d1 / d2, cos and sin of
    (angle_d - angle_q), log(size_d / size_q). Up to `max_matches` per pair, best (lowest) ratio first."""
    n, m_max = len(cands), cfg.max_matches
    out = Matches(np.zeros((n, m_max, N_INPUTS), np.float32), np.zeros((n, m_max), bool),
                  np.full((n, m_max), -1, np.int64), np.full((n, m_max), -1, np.int64))
    counts = np.array([len(c) if c is not None else 0 for c in cands], np.int64)
    f = int(counts.max()) if n else 0
    nq = len(q)
    if nq < 1 or f < 2:
        return out
    desc = np.zeros((n, f, 32), np.uint8)
    pts_d = np.zeros((n, f, 2), np.float32)
    ang_d = np.zeros((n, f), np.float32)
    size_d = np.ones((n, f), np.float32)
    wh_d = np.ones((n, 2), np.float32)
    for c, k in enumerate(cands):
        if k is not None and len(k):
            desc[c, : len(k)] = k.desc
            pts_d[c, : len(k)], ang_d[c, : len(k)], size_d[c, : len(k)], wh_d[c] = k.points, k.angle, k.size, k.wh
    dist = hamming_matrix(q.desc, desc.reshape(n * f, 32)).reshape(nq, n, f)
    dist[:, np.arange(f)[None, :] >= counts[:, None]] = _FAR  # padded candidate features are never near
    flat = dist.reshape(nq * n, f)
    rows = np.arange(nq * n)
    j1 = flat.argmin(axis=1)
    d1 = flat[rows, j1].astype(np.float32)
    flat[rows, j1] = _FAR
    d2 = flat.min(axis=1).astype(np.float32)
    flat[rows, j1] = d1.astype(np.int32)  # restored: the mutual check reads the column
    j1, d1, d2 = j1.reshape(nq, n), d1.reshape(nq, n), d2.reshape(nq, n)
    ratio = d1 / np.maximum(d2, 1.0)
    ok = (ratio < cfg.ratio) & (d2 < _FAR) & (counts[None, :] >= 2)
    qi, ci = np.nonzero(ok)  # candidate matches; mutual check only on these columns (cheap)
    if cfg.mutual and len(qi):
        column = dist[:, ci, j1[qi, ci]]  # (nq, k): the query-side distances of each matched candidate feature
        keep = column.argmin(axis=0) == qi
        qi, ci = qi[keep], ci[keep]
    if not len(qi):
        return out
    r = ratio[qi, ci]
    order = np.lexsort((qi, r, ci))  # per candidate, best ratio first (ties: lower query feature)
    qi, ci, r = qi[order], ci[order], r[order]
    start = np.searchsorted(ci, np.arange(n))
    slot = np.arange(len(ci)) - start[ci]
    keep = slot < m_max
    qi, ci, r, slot = qi[keep], ci[keep], r[keep], slot[keep]
    dj = j1[qi, ci]
    out.qi[ci, slot], out.di[ci, slot], out.mask[ci, slot] = qi, dj, True
    dtheta = np.deg2rad(ang_d[ci, dj] - q.angle[qi])
    out.x[ci, slot] = np.stack([
        q.points[qi, 0] / q.wh[0], q.points[qi, 1] / q.wh[1],
        pts_d[ci, dj, 0] / wh_d[ci, 0], pts_d[ci, dj, 1] / wh_d[ci, 1],
        d1[qi, ci] / 256.0, r, np.cos(dtheta), np.sin(dtheta),
        np.log(np.maximum(size_d[ci, dj], 1e-3) / np.maximum(q.size[qi], 1e-3)),
    ], axis=1).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------- network


def _context_norm(h: torch.Tensor, mask: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Each channel normalised over the pair's valid matches (mean 0, variance 1); padded rows stay 0.
    h (B, M, C), mask (B, M, 1) float."""
    count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (h * mask).sum(dim=1, keepdim=True) / count
    var = (((h - mean) * mask) ** 2).sum(dim=1, keepdim=True) / count
    return (h - mean) * torch.rsqrt(var + eps) * mask


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = torch.relu(_context_norm(self.a(h), mask))
        y = torch.relu(_context_norm(self.b(y), mask))
        return (h + y) * mask


class MatchNet(nn.Module):
    """Per-match inlier logits (B, M) and a pair logit (B,) from match features (B, M, 9) and a mask (B, M).

    Every layer acts on each match alone, except the context norms (statistics over the valid matches of the
    pair) and the pooling: permuting the matches permutes the logits and leaves the pair score unchanged;
    padded matches change nothing."""

    def __init__(self, cfg: NetworkConfig = NetworkConfig()) -> None:
        super().__init__()
        c = cfg.hidden
        self.pool = cfg.pool
        self.inp = nn.Linear(N_INPUTS, c)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(cfg.blocks))
        self.out = nn.Linear(c, 1)
        if cfg.pool == "learned":
            self.head = nn.Sequential(nn.Linear(2 * c + 2, c), nn.ReLU(), nn.Linear(c, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(x.dtype).unsqueeze(-1)
        h = self.inp(x) * m
        for block in self.blocks:
            h = block(h, m)
        logits = self.out(h).squeeze(-1)
        logits = logits.masked_fill(~mask, -30.0)  # padded: no inlier
        soft = (torch.sigmoid(logits) * m.squeeze(-1)).sum(dim=1)
        if self.pool == "inliers":
            return logits, soft
        count = m.sum(dim=1)
        mean = h.sum(dim=1) / count.clamp_min(1.0)
        peak = h.masked_fill(m == 0, float("-inf")).amax(dim=1)
        peak = torch.where(count > 0, peak, torch.zeros_like(peak))
        pooled = torch.cat([mean, peak, torch.log1p(soft)[:, None], torch.log1p(count)], dim=1)
        return logits, self.head(pooled).squeeze(-1)

    def pair_scores(self, pair: torch.Tensor) -> torch.Tensor:
        """The ranking score (>= 0) from the pair output: the soft inlier count, or P(relevant) (float64)."""
        return pair.double() if self.pool == "inliers" else torch.sigmoid(pair.double())


# ----------------------------------------------------------------------------------------- verification


class LearnedVerifier:
    """verify(rows, candidates) -> (len(rows), N) float64 pair scores (>= 0; -1 candidates score 0).
    `q_feats[r]` are the keypoints of row r's query; one padded forward pass per query over its N candidates."""

    def __init__(self, net: MatchNet, q_feats: Sequence[Features], db_feats: Sequence[Features],
                 cfg: MatchingConfig = MatchingConfig()) -> None:
        self.net, self.q_feats, self.db_feats, self.cfg = net.eval(), q_feats, db_feats, cfg

    @torch.inference_mode()
    def score(self, q: Features, candidates: np.ndarray) -> np.ndarray:
        cands = [self.db_feats[int(j)] if j >= 0 else None for j in candidates]
        mt = match_features(q, cands, self.cfg)
        width = max(1, int(mt.mask.sum(axis=1).max()))  # matches are packed at the front: drop the empty columns
        _, pair = self.net(torch.from_numpy(mt.x[:, :width]), torch.from_numpy(mt.mask[:, :width]))
        s = self.net.pair_scores(pair).numpy()
        return np.where(np.asarray(candidates) >= 0, s, 0.0)

    def __call__(self, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        with single_threaded_kernels():
            return np.stack([self.score(self.q_feats[int(r)], c) for r, c in zip(rows, candidates)]) \
                if len(rows) else np.zeros(candidates.shape)


class LearnedReranker:
    """The top N of a ranking re-ordered by key = verifier score + model_weight x relevance (ties: the model's
    order); new score of a top-N item = 1 + key, so the top N stays above the rest (relevance in [0, 1])."""

    def __init__(self, top_n: int, verify: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 model_weight: float = 0.0) -> None:
        check_fields({"top_n": top_n}, Rerank, "rerank")
        self.top_n, self.verify, self.model_weight = int(top_n), verify, float(model_weight)

    def __call__(self, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.top_n, ids.shape[1])
        candidates, relevance = ids[:, :n], scores[:, :n].astype(np.float64)
        verified = np.where(candidates >= 0, np.asarray(self.verify(rows, candidates), np.float64), 0.0)
        key = np.maximum(verified + self.model_weight * relevance, 0.0)
        return reorder_top(ids, scores, key, (1.0 + key).astype(np.float32))
