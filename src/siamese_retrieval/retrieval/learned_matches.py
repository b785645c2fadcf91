"""A learned match verifier: re-rank a model's top-N by a small network's verdict on the putative ORB matches.

    feats = cached_features(files, key, cfg.features, cache_dir)   # retrieval/orb_features.py, once per image
    x, mask, _ = match_features(q, [feats[j] for j in candidates], cfg.matching)   # (N, M, 9), (N, M)
    net = fit_or_load(train_data, cfg, cache_dir)                        # trained on the TRAINING split, cached
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

Training (`fit`, run at first use by evaluate.py and cached): the training split's queries against the
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

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import faiss
import numpy as np
import torch
from torch import nn

from siamese_retrieval.data.images import thumbnail
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.io_utils import atomic_path, check_cache_entry, stable_hash
from siamese_retrieval.retrieval.orb_features import Features, OrbFeatureConfig
from siamese_retrieval.retrieval.orb_ransac import single_threaded_kernels

log = logging.getLogger(__name__)

CACHE_VERSION = 1
N_INPUTS = 9  # per-match features (see match_features)
POOLS = ("inliers", "learned")
LABELS = ("ransac", "ransac_relevant")
COMBINES = ("replace", "fused")
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
    combine: str = "fused"  # replace: order by the verifier (+ model_weight x relevance) | fused: FusedReranker
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
        checks = [
            (self.top_n >= 1, "top_n must be >= 1"),
            (self.combine in COMBINES, f"combine must be one of {', '.join(COMBINES)}"),
            (self.model_weight >= 0, "model_weight must be >= 0"),
            (self.min_inliers >= 1 and self.outlier_z >= 0, "min_inliers must be >= 1 and outlier_z >= 0"),
            (self.saturate is None or self.saturate >= self.min_inliers, "saturate must be null or >= min_inliers"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.features.n_features >= 2, "features.n_features must be >= 2"),
            (0 < self.matching.ratio <= 1, "matching.ratio must be in (0, 1]"),
            (self.matching.max_matches >= 1, "matching.max_matches must be >= 1"),
            (self.network.hidden >= 1, "network.hidden must be >= 1"),
            (self.network.blocks >= 0, "network.blocks must be >= 0"),
            (self.network.pool in POOLS, f"network.pool must be one of {', '.join(POOLS)}"),
            (self.train.labels in LABELS, f"train.labels must be one of {', '.join(LABELS)}"),
            (min(self.train.positives, self.train.partial, self.train.lookalikes) >= 0,
             "train.positives, train.partial and train.lookalikes must be >= 0"),
            (self.train.min_matches >= 4, "train.min_matches must be >= 4 (a homography needs 4)"),
            (self.train.epochs >= 1 and self.train.batch_pairs >= 1, "train.epochs and train.batch_pairs must be >= 1"),
            (self.train.lr > 0 and self.train.weight_decay >= 0, "train.lr must be > 0, train.weight_decay >= 0"),
            (self.train.ransac_threshold > 0 and self.train.max_seconds > 0,
             "train.ransac_threshold and train.max_seconds must be > 0"),
            (self.combine != "fused" or self.network.pool == "inliers",
             "combine=fused needs network.pool=inliers (soft inlier counts)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"rerank (learned_matches): {message}")

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


# ----------------------------------------------------------------------------------------- features


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
    for c, k in enumerate(cands):
        if k is not None and len(k):
            desc[c, : len(k)] = k.desc
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
    pts_d = np.zeros((n, f, 2), np.float32)
    ang_d = np.zeros((n, f), np.float32)
    size_d = np.ones((n, f), np.float32)
    wh_d = np.ones((n, 2), np.float32)
    for c, k in enumerate(cands):
        if k is not None and len(k):
            pts_d[c, : len(k)], ang_d[c, : len(k)], size_d[c, : len(k)], wh_d[c] = k.points, k.angle, k.size, k.wh
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


# ----------------------------------------------------------------------------------------- training data


@dataclass
class TrainData:
    """What fitting needs: every query's and database image's keypoints and image file, the TRAINING split's
    query and database indices (only those are read), the ground truth (sim / fov lookup) and the dataset's
    identity (its fingerprint: part of the cache key)."""

    q_feats: Sequence[Features]
    db_feats: Sequence[Features]
    q_files: Sequence[Path]
    db_files: Sequence[Path]
    train_q: np.ndarray
    train_db: np.ndarray
    truth: Any  # a GroundTruth (data/ground_truth.py)
    key: Mapping[str, Any] = field(default_factory=dict)


def training_candidates(data: TrainData, cfg: TrainConfig) -> list[tuple[int, np.ndarray]]:
    """(query, database ids) per training query: positives, partial overlaps and thumbnail look-alikes, drawn
    (seeded) from the training database only."""
    rng = np.random.default_rng(cfg.seed)
    train_db = np.asarray(data.train_db)
    if cfg.lookalikes:
        q_thumbs = np.stack([thumbnail(data.q_files[int(i)]) for i in data.train_q])
        db_thumbs = np.stack([thumbnail(data.db_files[int(j)]) for j in train_db])
    out = []
    for row, q in enumerate(np.asarray(data.train_q)):
        sim, fov = data.truth.lookup(np.array([q]), train_db[None, :])
        sim, fov = sim[0], fov[0]
        pos, part = train_db[sim], train_db[~sim & (fov > 0)]
        pick = lambda ids, k: rng.choice(ids, size=min(k, len(ids)), replace=False) if len(ids) else ids  # noqa: E731
        chosen = [pick(pos, cfg.positives), pick(part, cfg.partial)]
        if cfg.lookalikes:
            zero = np.flatnonzero(fov <= 0)
            d = ((db_thumbs[zero] - q_thumbs[row]) ** 2).sum(axis=1)
            chosen.append(train_db[zero[np.argsort(d, kind="stable")[: cfg.lookalikes]]])
        cand = np.concatenate(chosen).astype(np.int64)
        if len(cand):
            out.append((int(q), cand))
    return out


def ransac_labels(q: Features, d: Features, qi: np.ndarray, di: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """(len(qi),) bool: the matches that are inliers of a USAC homography (none when fewer than min_matches)."""
    if len(qi) < cfg.min_matches:
        return np.zeros(len(qi), bool)
    h, mask = cv2.findHomography(q.points[qi].reshape(-1, 1, 2), d.points[di].reshape(-1, 1, 2), cv2.USAC_DEFAULT,
                                 cfg.ransac_threshold, maxIters=2000)
    if h is None or mask is None:
        return np.zeros(len(qi), bool)
    return mask.ravel().astype(bool)


def training_set(data: TrainData, cfg: LearnedMatchesConfig) -> dict[str, torch.Tensor]:
    """Padded tensors of every training pair: x (P, M, 9), mask (P, M), match labels (P, M), pair labels (P,)."""
    xs, masks, ys, sims = [], [], [], []
    with single_threaded_kernels():
        for q, cand in training_candidates(data, cfg.train):
            qf = data.q_feats[q]
            mt = match_features(qf, [data.db_feats[j] for j in cand], cfg.matching)
            sim, _ = data.truth.lookup(np.array([q]), cand[None, :])
            y = np.zeros(mt.mask.shape, np.float32)
            for c, j in enumerate(cand):
                valid = mt.mask[c]
                if valid.any() and (sim[0, c] or cfg.train.labels == "ransac"):
                    y[c, valid] = ransac_labels(qf, data.db_feats[j], mt.qi[c, valid], mt.di[c, valid], cfg.train)
            xs.append(mt.x), masks.append(mt.mask), ys.append(y), sims.append(sim[0].astype(np.float32))
    if not xs:
        raise ConfigError("rerank=learned_matches: the training split has no query with a training pair to fit on")
    return {"x": torch.from_numpy(np.concatenate(xs)), "mask": torch.from_numpy(np.concatenate(masks)),
            "y": torch.from_numpy(np.concatenate(ys)), "sim": torch.from_numpy(np.concatenate(sims))}


# ----------------------------------------------------------------------------------------- fitting and caching


def _batches(counts: torch.Tensor, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches of `size` pairs: shuffled, then sorted by match count within windows of 8 batches (so
    each batch pads to a similar width), the batches themselves in random order. Seeded by `gen`."""
    perm = torch.randperm(len(counts), generator=gen)
    window = size * 8
    chunks = []
    for start in range(0, len(perm), window):
        part = perm[start : start + window]
        part = part[torch.argsort(counts[part], stable=True)]
        chunks.extend(part.split(size))
    return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]


def _one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int, pct_start: float = 0.1) -> Any:
    """The one-cycle schedule (peak `lr`) over `steps` optimiser steps, defined for every step count.

    torch's OneCycleLR ends its warm-up at step pct_start * steps - 1; where that is exactly step 0 (10 steps)
    it divides 0 by 0 at the first step: the warm-up then ends half a step earlier, so the first step is in the
    annealing phase, as for every shorter cycle. A single step gets the constant `lr` (a one-step cycle would
    take it at the cycle's final lr, ~1e-6 of the peak)."""
    if steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if float(pct_start * steps) - 1 == 0:
        pct_start = 0.5 / steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)


def fit(data: TrainData, cfg: LearnedMatchesConfig) -> tuple[MatchNet, dict[str, float]]:
    """Train a MatchNet on the training pairs (deterministic given cfg.train.seed); returns it and a summary."""
    started = time.perf_counter()
    tc = cfg.train
    t = training_set(data, cfg)
    torch.manual_seed(tc.seed)
    net = MatchNet(cfg.network)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    n = len(t["sim"])
    sched = _one_cycle(opt, tc.lr, tc.epochs * math.ceil(n / tc.batch_pairs))
    gen = torch.Generator().manual_seed(tc.seed)
    counts = t["mask"].sum(dim=1)  # matches are packed at the front of each row
    bce = nn.functional.binary_cross_entropy_with_logits
    epochs_done, loss_sum = 0, 0.0
    net.train()
    for epoch in range(tc.epochs):
        if time.perf_counter() - started > tc.max_seconds:
            log.warning("learned verifier: stopped after %d of %d epochs (train.max_seconds=%g)", epoch, tc.epochs,
                        tc.max_seconds)
            break
        loss_sum = 0.0
        for idx in _batches(counts, tc.batch_pairs, gen):
            width = max(1, int(counts[idx].max()))  # pairs of similar match counts batch together: little padding
            x, mask, y, sim = t["x"][idx, :width], t["mask"][idx, :width], t["y"][idx, :width], t["sim"][idx]
            logits, pair = net(x, mask)
            m = mask.float()
            loss = tc.match_loss * (bce(logits, y, reduction="none") * m).sum() / m.sum().clamp_min(1.0)
            if cfg.network.pool == "learned":
                loss = loss + tc.pair_loss * bce(pair, sim)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        epochs_done = epoch + 1
    net.eval()
    summary = {"pairs": float(n), "relevant_pairs": float(t["sim"].sum()), "matches": float(t["mask"].sum()),
               "inlier_labels": float(t["y"].sum()), "epochs": float(epochs_done), "final_loss": loss_sum / max(1, n),
               "seconds": time.perf_counter() - started}
    return net, summary


def cache_path(data: TrainData, cfg: LearnedMatchesConfig, cache_dir: str | os.PathLike) -> Path:
    """The weights file of this dataset's training split and this config (matching, network and training)."""
    digest = stable_hash({**data.key, "train_q": stable_hash(np.asarray(data.train_q).tolist()),
                          "train_db": stable_hash(np.asarray(data.train_db).tolist()),
                          "features": asdict(cfg.features), "matching": asdict(cfg.matching),
                          "network": asdict(cfg.network), "train": asdict(cfg.train), "version": CACHE_VERSION})
    return Path(cache_dir) / f"learned_matches-{digest}.pt"


def save_weights(net: MatchNet, path: Path) -> None:
    """The state_dict's tensors only (no code, no pickled objects), written atomically."""
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_weights(path: Path, cfg: NetworkConfig) -> MatchNet | None:
    """A MatchNet built from `cfg` with the tensors of `path` (weights_only); None when they do not fit it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a dict of tensors")
        net = MatchNet(cfg)
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - a cache is disposable: whatever is wrong with the file, refit
        # (weights_only refuses to unpickle anything but tensors: a hostile file is an UnpicklingError here)
        log.warning("learned verifier cache %s is unusable (%s); refitting", path,
                    (str(exc).splitlines() or [type(exc).__name__])[0])
        return None
    net.eval()
    return net


def fit_or_load(data: TrainData, cfg: LearnedMatchesConfig, cache_dir: str | os.PathLike | None) -> MatchNet:
    """The verifier of this training split and config: loaded from the cache, else fitted and cached."""
    path = cache_path(data, cfg, cache_dir) if cache_dir is not None else None
    if path is not None:
        check_cache_entry(path, "learned verifier", "file", log)  # a planted symlink is removed, never read through
    if path is not None and path.is_file():
        net = load_weights(path, cfg.network)
        if net is not None:
            log.info("learned verifier cache hit: %s", path)
            return net
    log.info("fitting the learned match verifier on the training split (%d queries x %d database images)",
             len(data.train_q), len(data.train_db))
    net, summary = fit(data, cfg)
    log.info("learned verifier fitted: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    if path is not None:
        save_weights(net, path)
    return net


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
        if int(top_n) < 1:
            raise ConfigError(f"rerank.top_n must be >= 1, got {top_n}")
        self.top_n, self.verify, self.model_weight = int(top_n), verify, float(model_weight)

    def __call__(self, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.top_n, ids.shape[1])
        candidates, relevance = ids[:, :n], scores[:, :n].astype(np.float64)
        verified = np.where(candidates >= 0, np.asarray(self.verify(rows, candidates), np.float64), 0.0)
        key = np.maximum(verified + self.model_weight * relevance, 0.0)
        order = np.lexsort((np.broadcast_to(np.arange(n), candidates.shape), -key), axis=-1)
        ids, scores = ids.copy(), scores.copy()
        ids[:, :n] = np.take_along_axis(candidates, order, axis=1)
        scores[:, :n] = np.take_along_axis(1.0 + key, order, axis=1).astype(np.float32)
        return ids, scores
