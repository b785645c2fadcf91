"""The embedding distance, in one place: pairs, all-pairs, the FAISS metric that ranks by it, and back.

Training (pair distances, the head), mining (in-batch all-pairs distances) and retrieval (a FAISS
index, then the head on distances recovered from what FAISS returns) must measure the same thing;
a `Distance` owns all of it so that switching `model.module.distance` switches every one of them.

    euclidean  sqrt(max(|a - b|^2, eps)): Keras' form, finite gradient at identical embeddings.
               FAISS: an L2 index on the raw embeddings; it returns squared distances.
    cosine     1 - cos(a, b). FAISS: an inner-product index on L2-normalised embeddings; it returns
               cosine similarities.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Module


class Distance:
    """A distance between embeddings and its FAISS counterpart (see the module docstring)."""

    def __init__(self, kind: str = "euclidean", eps: float = 1e-7) -> None:
        check_fields({"distance": kind}, Module, "model.module")
        self.kind, self.eps = kind, float(eps)

    def __repr__(self) -> str:
        return f"Distance({self.kind!r})"

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise distance of paired embeddings (B, D) x (B, D) -> (B,)."""
        if self.kind == "euclidean":
            return torch.sqrt(torch.clamp(((a - b) ** 2).sum(-1), min=self.eps))
        return 1.0 - nn.functional.cosine_similarity(a, b, dim=-1)

    def cross(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """All-pairs distance (Q, D) x (N, D) -> (Q, N), consistent with `pair`."""
        if self.kind == "euclidean":
            sq = torch.cdist(q.float(), db.float(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
            return torch.sqrt(torch.clamp(sq, min=self.eps))
        return 1.0 - nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(db, dim=-1).T

    # ------------------------------------------------------------------ FAISS
    @property
    def faiss_metric(self) -> str:
        """The index metric that ranks like this distance: "l2" or "ip" (see retrieval/index.py)."""
        return "l2" if self.kind == "euclidean" else "ip"

    def for_index(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings as the index must hold them (and queries must be searched with): unit rows for cosine."""
        emb = emb.float()
        return nn.functional.normalize(emb, dim=-1) if self.kind == "cosine" else emb

    def from_faiss(self, faiss_distances: np.ndarray | torch.Tensor) -> torch.Tensor:
        """This distance from what FAISS returned for `for_index` embeddings (squared L2 or similarity)."""
        d = torch.as_tensor(faiss_distances)
        if self.kind == "euclidean":
            return torch.sqrt(torch.clamp(d, min=self.eps))
        return 1.0 - d
