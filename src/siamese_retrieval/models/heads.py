"""Distance between two embeddings and the relevance head on top of it."""

from __future__ import annotations

import torch
from torch import nn


def pair_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "euclidean", eps: float = 1e-7) -> torch.Tensor:
    """Row-wise distance of paired embeddings (B, D) x (B, D) -> (B,)."""
    if kind == "euclidean":
        # Keras' sqrt(max(sum sq, eps)): finite gradient at identical embeddings.
        return torch.sqrt(torch.clamp(((a - b) ** 2).sum(-1), min=eps))
    if kind == "cosine":
        return 1.0 - nn.functional.cosine_similarity(a, b, dim=-1)
    raise ValueError(f"unknown distance {kind!r}; use euclidean or cosine")


def cross_distance(q: torch.Tensor, db: torch.Tensor, kind: str = "euclidean", eps: float = 1e-7) -> torch.Tensor:
    """All-pairs distance (Q, D) x (N, D) -> (Q, N), consistent with `pair_distance`."""
    if kind == "euclidean":
        sq = torch.cdist(q.float(), db.float(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
        return torch.sqrt(torch.clamp(sq, min=eps))
    if kind == "cosine":
        return 1.0 - nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(db, dim=-1).T
    raise ValueError(f"unknown distance {kind!r}; use euclidean or cosine")


class RelevanceHead(nn.Module):
    """The study's Dense(1, sigmoid) on the distance: relevance = sigmoid(w * d + b)."""

    def __init__(self, init_weight: float = -1.0, init_bias: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        nn.init.constant_(self.linear.weight, init_weight)
        nn.init.constant_(self.linear.bias, init_bias)

    def logits(self, distance: torch.Tensor) -> torch.Tensor:
        return self.linear(distance.unsqueeze(-1)).squeeze(-1)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(distance))
