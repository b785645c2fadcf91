"""Metric-learning losses on labelled embeddings (place batches), through pytorch-metric-learning.

`MultiSimilarity` is Wang et al.'s multi-similarity loss (CVPR 2019) with its online pair miner, the
recipe of GSV-Cities / MixVPR: in a P x K batch (data/place_batches.py) every image is an anchor; its
positives are the other views of its place, its negatives the views of the other places (which overlap
none of it, so "another label" is a true negative). With cosine similarity S, for anchor i

    loss_i = 1/alpha log(1 + sum_p exp(-alpha (S_ip - base))) + 1/beta log(1 + sum_n exp(beta (S_in - base)))

averaged over the batch's images, over the pairs the miner keeps: a negative whose S_in + epsilon exceeds
the anchor's hardest (least similar) positive, a positive whose S_ip - epsilon falls below its hardest
(most similar) negative. `miner_epsilon: null` uses every pair.

On a pair batch (validation/test, or data.batches=pairs) there are no labels: each (query, database) pair
then counts by itself, as a positive (fov >= `pos_fov`) or a negative -- the same two terms with one pair
each, averaged over the pairs -- so val/loss stays defined.

The similarity is cosine (pytorch-metric-learning's default; L2-normalised embeddings, as cnn_snn's, rank
the same by Euclidean distance). pytorch-metric-learning is imported when the loss is built, not with this
module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import MultiSimilarityTerm
from siamese_retrieval.models.losses import PairOutput
from siamese_retrieval.registry import LOSSES


@LOSSES.register("multi_similarity")
class MultiSimilarity(nn.Module):
    """Multi-similarity loss + multi-similarity miner on `PairOutput.embeddings` / `labels` (module docstring).

    Args:
        alpha: scale of the positive pairs (2 in the paper; GSV-Cities uses 1).
        beta: scale of the negative pairs (50).
        base: the similarity threshold lambda (0.5 in the paper; GSV-Cities uses 0).
        miner_epsilon: the miner's margin (0.1); null: no mining, every pair.
        pos_fov: on pair batches, a pair with fov >= this is a positive.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 miner_epsilon: float | None = 0.1, pos_fov: float = 0.5) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        check_fields(dict(alpha=alpha, beta=beta, base=base, miner_epsilon=miner_epsilon), MultiSimilarityTerm,
                     "loss.terms.ms")
        self.alpha, self.beta, self.base, self.pos_fov = float(alpha), float(beta), float(base), float(pos_fov)
        self.loss = losses.MultiSimilarityLoss(alpha=self.alpha, beta=self.beta, base=self.base)
        self.miner = miners.MultiSimilarityMiner(epsilon=float(miner_epsilon)) if miner_epsilon is not None else None

    def labelled(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of N labelled embeddings (N, D), labels (N,)."""
        embeddings = embeddings.float()
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)

    def pairwise(self, out: PairOutput) -> torch.Tensor:
        """Each (query, database) pair of a pair batch by itself (module docstring)."""
        s = F.cosine_similarity(out.emb_q.float(), out.emb_d.float(), dim=-1)
        positive = out.fov.float() >= self.pos_fov
        pos = F.softplus(-self.alpha * (s - self.base)) / self.alpha  # 1/a log(1 + exp(-a (s - base)))
        neg = F.softplus(self.beta * (s - self.base)) / self.beta
        return torch.where(positive, pos, neg).mean()

    def forward(self, out: PairOutput | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            if labels is None:
                raise ValueError("MultiSimilarity(embeddings, labels): labels are required")
            return self.labelled(out, labels)
        if out.embeddings is not None and out.labels is not None:
            return self.labelled(out.embeddings, out.labels)
        return self.pairwise(out)

    def extra_repr(self) -> str:
        eps: Any = self.miner.epsilon if self.miner is not None else None
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, miner_epsilon={eps}"
