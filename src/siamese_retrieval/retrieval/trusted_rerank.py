"""rerank=fused: geometric verification that knows when to abstain.

Verification fixes a model's order where it is trustworthy (strong viewpoint changes on textured scenes) and
breaks it where it is not (repetitive structure: brick, window grids, checkerboards and text give many RANSAC
inliers between different places). So each query decides for itself:

1. ORB + RANSAC verifies the model's top N, and each candidate gets its EVIDENCE (retrieval/orb_ransac.py):
   inlier ratio, how much of both images the inliers cover, one-to-one matches, a sane homography.
2. The candidate with the most inliers is the challenger. Six numbers describe how far to trust it, all ratios
   or fractions (they mean the same at any image size): its inlier ratio, coverage, one-to-one share and
   sanity, its margin over the runner-up ((best - second) / best inliers) and the crowd (the share of the
   other candidates with at least half its inliers: many candidates verifying at once is the mark of a
   repeated pattern).
3. A logistic rule turns them into P(the challenger is the right place). It is fitted on a training split:
   the evaluated dataset's own where it has one, else the synthetic city's (`reference`), which is what
   `split=all` and retrieve.py use. Fitting takes seconds and is cached as a small JSON of numbers.
4. A query is re-ranked (the challenger moves to rank 1, everything else keeps the model's order) only when
   P >= `trust_threshold` and the challenger is not already the model's first; otherwise the model's order
   stands. evaluate.py writes each query's decision and its reason to per_query.csv.

rerank=learned_matches uses the same rule with a 7th feature, the learned verifier's agreement (SECOND_OPINION).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from siamese_retrieval.io_utils import atomic_path, stable_hash

log = logging.getLogger(__name__)

FEATURES = ("inlier_ratio", "coverage", "one_to_one", "sane", "margin", "crowd")
# rerank=learned_matches adds a second opinion: how far the learned verifier agrees that the challenger is the
# best candidate (its score of the challenger / its best score among the N: 1 when it agrees).
SECOND_OPINION = FEATURES + ("agree",)
# The direction each feature may push the probability (more coverage never makes a match less believable; a
# crowd of candidates verifying at once never makes it more): a weight fitted against it is dropped, so the
# rule cannot learn a quirk of its training city that would reverse on real photographs.
SIGN = {"inlier_ratio": 1, "coverage": 1, "one_to_one": 1, "sane": 1, "margin": 1, "crowd": -1, "agree": 1}
SIGNS = tuple(SIGN[f] for f in FEATURES)
RULE_VERSION = 2
SHORT = {"inlier_ratio": "ratio", "coverage": "cover", "one_to_one": "1:1", "sane": "sane", "margin": "margin",
         "crowd": "crowd", "agree": "agree"}


def query_features(evidence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """evidence (n, N, len(EVIDENCE)) in the model's order -> (challenger (n,), features (n, 6), verified (n,)).

    The challenger is the candidate with the most inliers (the model's order breaks ties); `verified` is False
    where no candidate has a homography (features all zero there). Evidence with one more column (a second
    verifier's score per candidate) adds the SECOND_OPINION feature `agree`."""
    inliers = evidence[..., 0].astype(np.float64)
    n, width = inliers.shape
    best = inliers.argmax(axis=1)
    top = inliers[np.arange(n), best]
    second = np.sort(inliers, axis=1)[:, -2] if width > 1 else np.zeros(n)
    margin = (top - second) / np.maximum(top, 1.0)
    crowd = ((inliers >= 0.5 * top[:, None]).sum(axis=1) - 1) / max(width - 1, 1)
    chosen = evidence[np.arange(n), best].astype(np.float64)
    columns = [chosen[:, 1], chosen[:, 2], chosen[:, 3], chosen[:, 4], margin, crowd]
    if evidence.shape[-1] > 5:
        opinion = np.maximum(evidence[..., 5].astype(np.float64), 0.0)
        columns.append(opinion[np.arange(n), best] / np.maximum(opinion.max(axis=1), 1e-9))
    features = np.column_stack(columns)
    verified = top > 0
    features[~verified] = 0.0
    return best, features, verified


@dataclass(frozen=True)
class TrustRule:
    """P(challenger is right) = sigmoid(weights . features + bias). `source` says what it was fitted on."""

    weights: tuple[float, ...]
    bias: float
    source: str
    n_train: int
    positive_rate: float
    train_accuracy: float
    features: tuple[str, ...] = FEATURES

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = np.asarray(features, np.float64) @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def explain(self, features: np.ndarray) -> str:
        """'p=0.93 (ratio 0.41, cover 0.56, 1:1 0.90, sane 1, margin 0.80, crowd 0.05)'."""
        parts = ", ".join(f"{SHORT[name]} {value:.2f}" for name, value in zip(self.features, features))
        return f"p={float(self.probability(features[None])[0]):.2f} ({parts})"


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-regularised logistic regression by Newton's method (IRLS).

    Hand-rolled: six features and a few thousand rows do not justify scikit-learn as a dependency, and the
    fit must be deterministic to the bit for the cache."""
    xb = np.column_stack([np.asarray(x, np.float64), np.ones(len(x))])
    y = np.asarray(y, np.float64)
    w = np.zeros(xb.shape[1])
    penalty = l2 * np.eye(xb.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -50, 50)))
        grad = xb.T @ (p - y) + penalty @ w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + penalty + 1e-9 * np.eye(xb.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[:-1], float(w[-1])


def fit_signed(x: np.ndarray, y: np.ndarray, signs: Sequence[int] = SIGNS) -> tuple[np.ndarray, float]:
    """fit_logistic with each weight held to its sign: a feature whose weight comes out against it is left out
    and the rest refitted, until every weight agrees."""
    active = list(range(x.shape[1]))
    while True:
        w, b = fit_logistic(x[:, active], y)
        wrong = [f for f, v in zip(active, w) if v * signs[f] < 0]
        if not wrong:
            weights = np.zeros(x.shape[1])
            weights[active] = w
            return weights, b
        active = [f for f in active if f not in wrong]


def fit_rule(features: np.ndarray, labels: np.ndarray, source: str) -> TrustRule:
    names = FEATURES if features.shape[1] == len(FEATURES) else SECOND_OPINION
    weights, bias = fit_signed(features, labels, tuple(SIGN[f] for f in names))
    rule = TrustRule(tuple(float(v) for v in weights), bias, source, int(len(labels)), float(np.mean(labels)), 0.0,
                     names)
    accuracy = float(((rule.probability(features) >= 0.5) == labels.astype(bool)).mean()) if len(labels) else 0.0
    return replace(rule, train_accuracy=accuracy)


def save_rule(rule: TrustRule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps({"version": RULE_VERSION, **asdict(rule)}, indent=1) + "\n")


def load_rule(path: Path) -> TrustRule | None:
    """The cached rule (numbers only: data, not code); None, with a warning, for a file that is not one."""
    try:
        raw = json.loads(path.read_text())
        weights, names = tuple(float(v) for v in raw["weights"]), tuple(raw["features"])
        if raw.get("version") != RULE_VERSION or names not in (FEATURES, SECOND_OPINION) or len(weights) != len(names):
            raise ValueError("another version or feature set")
        values = [float(raw["bias"]), *weights]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("not finite")
        return TrustRule(weights, float(raw["bias"]), str(raw["source"]), int(raw["n_train"]),
                         float(raw["positive_rate"]), float(raw["train_accuracy"]), names)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: not a usable trust rule (%s); fitting it again", path, exc)
        return None


def rule_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"trust-rule-{stable_hash({'v': RULE_VERSION, **key})}.json"


class TrustedReranker:
    """The model's top N; per query, the challenger moves to rank 1 when the rule trusts it (module docstring).

    `evidence(rows, candidates)` gives the EVIDENCE (len(rows), N, F) of those rows' candidates. Scores of the
    top N become 1 + relevance / 2 (+ 1 for a promoted challenger): the top N stays above the rest and its
    order is the new one. `decisions` maps each ranked row to (re-ranked, why)."""

    def __init__(self, top_n: int, evidence: Callable[[np.ndarray, np.ndarray], np.ndarray], rule: TrustRule,
                 threshold: float = 0.5, skip_margin: float | None = None, max_rank: int | None = None) -> None:
        self.top_n, self.evidence, self.rule = int(top_n), evidence, rule
        self.threshold, self.skip_margin = float(threshold), skip_margin
        self.max_rank = None if max_rank is None else int(max_rank)
        self.decisions: dict[int, tuple[bool, str]] = {}
        self.verified_queries = 0

    def __call__(self, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.top_n, ids.shape[1])
        ids, scores = ids.copy(), scores.copy()
        todo = np.arange(len(rows))
        if self.skip_margin is not None and n > 1:
            confident = scores[:, 0] - scores[:, 1] > self.skip_margin
            for i in np.flatnonzero(confident):
                self.decisions[int(rows[i])] = (False, f"model confident (top-1 leads by > {self.skip_margin})")
            todo = np.flatnonzero(~confident)
        self.verified_queries += len(todo)
        if not len(todo):
            return ids, scores
        candidates = ids[todo, :n]
        evidence = self.evidence(rows[todo], candidates)
        evidence[candidates < 0] = 0.0
        best, features, verified = query_features(evidence)
        p = self.rule.probability(features)
        relevance = scores[todo, :n].astype(np.float64)
        for k, i in enumerate(todo):
            why = self.rule.explain(features[k])
            too_far = self.max_rank is not None and best[k] + 1 > self.max_rank
            promote = bool(verified[k] and best[k] > 0 and p[k] >= self.threshold and not too_far)
            if not verified[k]:
                reason = "abstained: no homography among the top candidates"
            elif best[k] == 0:
                reason = f"kept: the model's first is the best verified, {why}"
            elif too_far:
                reason = f"abstained: challenger at model rank {best[k] + 1} is below rank {self.max_rank}, {why}"
            elif promote:
                reason = f"re-ranked: challenger at model rank {best[k] + 1} trusted, {why}"
            else:
                reason = f"abstained: challenger at model rank {best[k] + 1} not trusted, {why}"
            self.decisions[int(rows[i])] = (promote, reason)
            order = np.arange(n)
            new_scores = 1.0 + relevance[k] / 2.0
            if promote:
                order = np.concatenate([[best[k]], np.delete(order, best[k])])
                new_scores[best[k]] += 1.0
            ids[i, :n] = candidates[k, order]
            scores[i, :n] = new_scores[order].astype(np.float32)
        return ids, scores


def fitted_rule(evidence_of: Callable[[np.ndarray, np.ndarray], np.ndarray], train_q: np.ndarray,
                candidates: Sequence[np.ndarray], relevant_of: Callable[[int, np.ndarray], np.ndarray],
                source: str, width: int, seed: int = 0) -> TrustRule | None:
    """Fit the rule on training queries: each query's candidates (shuffled: no order to lean on) verified,
    labelled by whether the challenger is relevant. None when they are too few (< 20 with a homography) or all
    of one label: nothing to learn from."""
    rng = np.random.default_rng(seed)
    cand = np.full((len(candidates), width), -1, np.int64)
    for k, c in enumerate(candidates):
        c = rng.permutation(np.asarray(c, np.int64))[:width]
        cand[k, : len(c)] = c
    evidence = evidence_of(np.asarray(train_q), cand)
    evidence[cand < 0] = 0.0
    relevant = np.stack([relevant_of(int(q), c) for q, c in zip(train_q, cand)]) & (cand >= 0)
    # (features, labels) of the queries with a homography: label = the challenger is relevant
    best, features, verified = query_features(evidence)
    features, labels = features[verified], relevant[np.arange(len(best)), best][verified].astype(np.float64)
    if len(labels) < 20 or labels.min() == labels.max():
        return None
    return fit_rule(features, labels, source)


def never(features: tuple[str, ...] = FEATURES) -> TrustRule:
    """The rule with nothing to learn from: every query abstains."""
    return TrustRule(tuple(0.0 for _ in features), -50.0, "nothing to learn from: every query abstains", 0, 0.0, 0.0,
                     features)


NEVER = never()
