"""Retrieval metrics: each query ranked against the full database (or its top k). (The study's range accuracy,
a metric of the model's pair scores, is models/pair_metrics.py.)

Logged as `{prefix}/<name>` (prefix "val" or "test", see `prefixed`), names from `RetrievalScores`:

    precision@k   mean over queries of (number of sim=1 items in the top k) / k   (the study's metric)
    recall@k      fraction of queries with at least one sim=1 item in the top k   (VPR Recall@N)
    mAP           mean over queries of average precision over the whole ranking (binary sim)
    mAP@k         streaming evaluation (only the top k searched, `RankingSettings.search_k`): average
                  precision over the top k, normalised by min(k, n_positives); equals mAP when k = n_database
    ndcg@K        nDCG of the top K graded by fov (linear gain, 1/log2(rank+1) discount); the ideal
                  DCG takes the K largest fov values of the query's whole row; 0 when that is 0
    n_queries                   queries seen (with or without a positive)
    n_queries_without_positive  queries whose sim row has no 1: counted here and left OUT of all the
                                averages above (with none left, the averages are NaN)

Ranking: database items sorted by score, higher first; equal scores are broken by database index
(stable sort), so results are deterministic.

Each family (precision, recall, mAP, ndcg) is registered in registry.METRICS on `RetrievalScores`, with its
direction and the rows the results table shows: the table and the W&B best-value summaries read it from there.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from siamese_retrieval.registry import METRICS

__all__ = [
    "RetrievalScores",
    "retrieval_metric_names",
    "per_query_retrieval_scores",
    "ranked_retrieval_scores",
    "prefixed",
]


def _check_shape(name: str, x: Tensor, sim: Tensor, fov: Tensor | None) -> None:
    """`x` (scores or order), sim and fov (when given) are one 2-D (n_queries, n_database) shape, n_database > 0."""
    if x.ndim != 2 or sim.shape != x.shape or (fov is not None and fov.shape != x.shape):
        raise ValueError(
            f"{name} {tuple(x.shape)}, sim {tuple(sim.shape)} and fov "
            f"{None if fov is None else tuple(fov.shape)} must have the same (n_queries, n_database) shape"
        )
    if x.shape[1] == 0:
        raise ValueError("cannot rank an empty database (n_database == 0)")


def _check_inputs(scores: Tensor, sim: Tensor, fov: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if scores.ndim == 1:
        scores, sim = scores[None], sim[None]
        fov = fov[None] if fov is not None else None
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_queries, n_database), got shape {tuple(scores.shape)}")
    _check_shape("scores", scores, sim, fov)
    if not torch.is_floating_point(scores):
        scores = scores.float()
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: the ranking is undefined")
    return scores, sim.bool(), (fov.float() if fov is not None else None)


def _check_order(order: Tensor, sim: Tensor, fov: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    _check_shape("order", order, sim, fov)
    return order.long(), sim.bool(), (fov.float() if fov is not None else None)


def per_query_retrieval_scores(
    scores: Tensor | None,
    sim: Tensor,
    fov: Tensor | None = None,
    top_ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int | None = 10,
    order: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-query retrieval metrics for a chunk of queries against the full database.

    scores (b, n_db), higher = more relevant; sim (b, n_db) binary relevance; fov (b, n_db) graded
    relevance (needed only for nDCG). Returns (b,) float tensors "precision@k", "recall@k", "AP",
    "ndcg@K" and the bool mask "has_positive"; values of queries without a positive are computed but
    meaningless (the callers mask them out).

    `order` (b, n_db): the ranking itself, database indices best first, when the caller already has it
    (a FAISS search returns it sorted): then `scores` may be None and nothing is sorted here.

    Vectorised on purpose instead of looping torchmetrics.functional.retrieval_* per query:
      * one stable sort of the (b, n_db) block serves every metric: 500 queries x 1000 items take
        ~13 ms here, the per-query loop over the 8 torchmetrics calls ~450 ms (2-core CPU);
      * torchmetrics' retrieval_precision / retrieval_average_precision count an item as relevant only
        when its score is > 0, so scores such as negated distances (all <= 0) would silently give 0;
      * torchmetrics breaks score ties with topk/argsort (unspecified order), here ties go to the lower
        database index.
    On random positive scores without ties the results equal torchmetrics' (tested).
    Memory: a few (b, n_db) temporaries; choose the chunk size b accordingly.
    """
    if order is None:
        scores, sim, fov = _check_inputs(scores, sim, fov)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    else:
        order, sim, fov = _check_order(order, sim, fov)
    n = order.shape[1]
    rel = sim.gather(1, order)  # (b, n) relevance in ranked order
    gain = ideal = None
    if ndcg_k is not None:
        if fov is None:
            raise ValueError("nDCG needs the graded relevance fov")
        kk = min(int(ndcg_k), n)
        gain, ideal = fov.gather(1, order[:, :kk]), fov.topk(kk, dim=1).values
    return ranked_retrieval_scores(rel, sim.sum(1), gain, ideal, top_ks, ndcg_k)


def ranked_retrieval_scores(
    rel: Tensor,
    n_pos: Tensor,
    gain: Tensor | None = None,
    ideal: Tensor | None = None,
    top_ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int | None = 10,
) -> dict[str, Tensor]:
    """Per-query metrics from the top k of each ranking and the ground truth's per-query counts.

    rel (b, k) bool: sim of the ranked database items, best first (k = n_db for a full ranking, or the
    k a search returned); n_pos (b,): sim=1 items of each query in the WHOLE database; gain (b, >= K')
    fov of the ranked items and ideal (b, >= K') each query's largest fov values over the whole database,
    descending, where K' = min(ndcg_k, k). Nothing here is n_db wide unless k is.

    Conventions (identical to the full-ranking metrics whenever every cut-off is <= k):
      precision@c  positives in the top c / c;  recall@c: at least one positive in the top c;
      AP           average precision over the top k:  sum over ranks r <= k of P@r * rel_r, divided by
                   min(k, n_pos). With k = n_db this is the usual AP over the whole ranking (normalised by
                   n_pos), bit for bit; with k < n_db it is "AP@k" as in the VPR / MSLS benchmarks (a query
                   whose positives all lie in the top k, in the best order, scores 1);
      ndcg@K       DCG of the top K' by fov over the ideal DCG of the K' largest fov values (0 when that is 0).
    """
    b, k = rel.shape
    relf = rel.to(torch.float32)
    hits = relf.cumsum(1)  # hits[:, r-1] = positives within the top r (exact in float32 below 2**24)
    out: dict[str, Tensor] = {}
    for c in top_ks:
        c = int(c)
        if c < 1:
            raise ValueError(f"top-k values must be >= 1, got {c}")
        hits_c = hits[:, min(c, k) - 1].double()
        out[f"precision@{c}"] = hits_c / c  # divided by c even when the database is smaller (torchmetrics)
        out[f"recall@{c}"] = (hits_c > 0).double()
    n_pos = n_pos.to(device=rel.device).long()
    ranks = torch.arange(1, k + 1, device=rel.device, dtype=torch.float32)
    norm = torch.clamp(n_pos, max=k).double().clamp(min=1)
    out["AP"] = ((hits / ranks) * relf).sum(1).double() / norm
    if ndcg_k is not None:
        if gain is None or ideal is None:
            raise ValueError("nDCG needs the graded relevance fov")
        kk = min(int(ndcg_k), k)
        discount = 1.0 / torch.log2(torch.arange(kk, device=rel.device, dtype=torch.float64) + 2.0)
        dcg = (gain[:, :kk].double() * discount).sum(1)
        idcg = (ideal[:, :kk].double() * discount).sum(1)
        out[f"ndcg@{int(ndcg_k)}"] = torch.where(idcg > 0, dcg / idcg.clamp(min=1e-300), torch.zeros_like(dcg))
    out["has_positive"] = n_pos > 0
    return out


def retrieval_metric_names(top_ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10,
                           map_k: int | None = None) -> list[str]:
    """The averaged metrics `RetrievalScores(top_ks, ndcg_k, map_k)` computes, in its order, without prefix
    (the counts n_queries / n_queries_without_positive come after them)."""
    return ([f"precision@{int(k)}" for k in top_ks] + [f"recall@{int(k)}" for k in top_ks]
            + ["mAP" if map_k is None else f"mAP@{int(map_k)}", f"ndcg@{int(ndcg_k)}"])


@METRICS.register("precision", higher_is_better=True, at_k=True, row=10,
                  shown=("precision@1", "precision@5", "precision@10"),
                  description="mean over queries of the sim=1 items in the top k, divided by k")
@METRICS.register("recall", higher_is_better=True, at_k=True, row=20, shown=("recall@1", "recall@5", "recall@10"),
                  description="fraction of queries with at least one sim=1 item in the top k (VPR Recall@N)")
@METRICS.register("mAP", higher_is_better=True, at_k=False, row=30, shown=("mAP", "mAP@*"),
                  description="mean average precision of the whole ranking (streaming: mAP@k, of the top k)")
@METRICS.register("ndcg", higher_is_better=True, at_k=True, row=40, shown=("ndcg@10",),
                  description="nDCG of the top k graded by fov (linear gain, log2 discount)")
class RetrievalScores(Metric):
    """precision@k, recall@k, mAP (mAP@map_k), nDCG@K over chunks of queries (full rankings or top-k lists).

    `update(scores, sim, fov)` takes a chunk of b queries (b, n_db) and adds only per-query sums to the
    states (all "sum"-reduced, so the result is exact under DDP whatever the split of queries);
    `compute()` returns a dict of scalar float tensors, names without prefix (see the module docstring).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10, map_k: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.top_ks = tuple(int(k) for k in top_ks)
        if not self.top_ks or min(self.top_ks) < 1:
            raise ValueError(f"top_ks must be positive integers, got {top_ks}")
        self.ndcg_k = int(ndcg_k)
        self.map_k = None if map_k is None else int(map_k)
        self._names = retrieval_metric_names(self.top_ks, self.ndcg_k, self.map_k)
        self.add_state("sums", default=torch.zeros(len(self._names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_queries", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_without_positive", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, scores: Tensor | None = None, sim: Tensor | None = None,  # type: ignore[override]
               fov: Tensor | None = None, order: Tensor | None = None, *,
               per_query: dict[str, Tensor] | None = None) -> None:
        """A chunk of queries: dense `scores`, or the ranking `order` itself (then nothing is sorted), or the
        chunk's `per_query` values already computed (`update_ranked`)."""
        per_q = per_query if per_query is not None else \
            per_query_retrieval_scores(scores, sim, fov, self.top_ks, self.ndcg_k, order=order)
        keep = per_q["has_positive"]
        values = [per_q[f"precision@{k}"] for k in self.top_ks] + [per_q[f"recall@{k}"] for k in self.top_ks]
        values += [per_q["AP"], per_q[f"ndcg@{self.ndcg_k}"]]
        stacked = torch.stack(values, 1)[keep].sum(0)  # (n_metrics,)
        self.sums += stacked.to(self.sums.dtype)
        self.n_queries += keep.numel()
        self.n_without_positive += (~keep).sum()

    def update_ranked(self, rel: Tensor, n_pos: Tensor, gain: Tensor, ideal: Tensor) -> None:
        """A chunk of queries by their top k (see `ranked_retrieval_scores`): O(b x k), never b x n_db."""
        self.update(per_query=ranked_retrieval_scores(rel, n_pos, gain, ideal, self.top_ks, self.ndcg_k))

    def compute(self) -> dict[str, Tensor]:
        n_valid = (self.n_queries - self.n_without_positive).double()
        means = (self.sums / n_valid).float()  # NaN when no query had a positive
        out = {name: means[i] for i, name in enumerate(self._names)}
        out["n_queries"] = self.n_queries.float()
        out["n_queries_without_positive"] = self.n_without_positive.float()
        return out


def prefixed(metrics: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """{"precision@1": v} -> {"val/precision@1": v}."""
    return {f"{prefix}/{name}": value for name, value in metrics.items()}
