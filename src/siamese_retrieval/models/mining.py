"""In-batch hard-negative mining on top of a pair loss.

A batch of B pairs holds B query and B database embeddings, so B x B (query i, database j)
combinations, B of which are the sampled pairs. The others are free extra negatives -- but only
where their relevance is KNOWN: two different queries may well share a database image (adjacent
cameras on one street), so "another pair's database image" is not automatically a negative.

`BatchHardContrastive` therefore uses a cross pair (i, j) only when its fov is known, from either

1. `PairOutput.cross_fov` (B, B), fov[q_idx[i], d_idx[j]] looked up by whoever built the batch
   (NaN where unknown) -- every cross pair then counts; or
2. `PairOutput.q_idx` / `d_idx`: (q_idx[i], d_idx[j]) is known when that exact (query, database)
   pair is one of the batch's pairs, e.g. j is another pair of the same query. Rows sharing a query
   then mine among all of that query's sampled database images; or
3. neither: no cross pair is known, and the loss is exactly the base loss.

A known cross pair is a negative when fov < `max_fov` (0.5: sim = 0). For each query row the k
hardest negatives (the largest push terms, i.e. the smallest distances inside the margin) add
GCL's push 0.5 * (1 - fov) * max(0, margin - d)^2, averaged over the rows that have a negative, and
scaled by `weight`. The extra term is >= 0, so the loss is >= the base loss, with equality when the
batch holds no known negative inside the margin.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from siamese_retrieval.models.distance import Distance
from siamese_retrieval.models.losses import PairOutput
from siamese_retrieval.registry import LOSSES


_EUCLIDEAN = Distance("euclidean")


def known_cross_fov(out: PairOutput) -> torch.Tensor | None:
    """(B, B) fov of (query i, database j), NaN where unknown; None when nothing can be known."""
    if out.cross_fov is not None:
        return out.cross_fov.float()
    if out.q_idx is None or out.d_idx is None or out.fov is None:
        return None
    q, d = out.q_idx.long().reshape(-1), out.d_idx.long().reshape(-1)
    if q.numel() == 0:
        return None
    fov = out.fov.float().reshape(-1)
    keys = (q << 32) | d  # one key per sampled (query, database) pair; no host sync
    sorted_keys, order = torch.sort(keys)
    cross = (q[:, None] << 32) | d[None, :]  # key of (query of pair i, database image of pair j)
    pos = torch.searchsorted(sorted_keys, cross.reshape(-1)).clamp(max=len(keys) - 1).reshape(cross.shape)
    found = sorted_keys[pos] == cross
    nan = torch.full_like(cross, float("nan"), dtype=fov.dtype)
    return torch.where(found, fov[order[pos]], nan)


@LOSSES.register("batch_hard_contrastive")
class BatchHardContrastive(nn.Module):
    """`base_loss` + weight x mean over query rows of the k hardest known in-batch negatives' push.

    Args:
        base_loss: the pair loss it extends (a module, or a `_target_` config dict), e.g.
            GradedContrastiveLoss; its value on the sampled pairs is kept unchanged.
        margin: push margin; None takes `base_loss.margin` (0.5 if it has none).
        k: hardest negatives per query row.
        weight: scale of the mined term.
        max_fov: a known cross pair with fov below this is a negative (0.5: GCL's sim = 0).
    Cross pairs are measured with the module's distance (`PairOutput.distance_fn`; Euclidean without one).
    """

    def __init__(
        self,
        base_loss: nn.Module | Mapping[str, Any],
        margin: float | None = None,
        k: int = 1,
        weight: float = 1.0,
        max_fov: float = 0.5,
    ) -> None:
        super().__init__()
        if isinstance(base_loss, Mapping):
            from hydra.utils import instantiate  # a config the caller composed or checked (trust.py)

            base_loss = instantiate(dict(base_loss))
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.base_loss = base_loss
        self.margin = float(margin if margin is not None else getattr(base_loss, "margin", 0.5))
        self.k, self.weight, self.max_fov = int(k), float(weight), float(max_fov)

    def mined_term(self, out: PairOutput) -> torch.Tensor:
        zero = out.emb_q.new_zeros(()).float()
        fov = known_cross_fov(out)
        if fov is None:
            return zero
        negative = torch.isfinite(fov) & (fov < self.max_fov)
        dist = (out.distance_fn or _EUCLIDEAN).cross(out.emb_q, out.emb_d)  # (B, B), float32
        psi = torch.nan_to_num(fov, nan=1.0)
        push = 0.5 * (1.0 - psi) * torch.clamp(self.margin - dist, min=0.0) ** 2
        k = min(self.k, push.shape[1])
        ranked = torch.where(negative, push, torch.full_like(push, -1.0))
        top, idx = torch.topk(ranked, k, dim=1)
        valid = negative.gather(1, idx).float()
        per_row = (top.clamp(min=0.0) * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        rows = (valid.sum(1) > 0).float()
        return (per_row * rows).sum() / rows.sum().clamp(min=1.0)  # 0 when no row has a negative

    def forward(self, out: PairOutput) -> torch.Tensor:
        return self.base_loss(out) + self.weight * self.mined_term(out)
