"""Pair losses. Each takes the `PairOutput` of a batch and returns a scalar.

Kept small and composable (one class, one formula): the head losses train the relevance score
(the study), the contrastive ones shape the embedding distance directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from siamese_retrieval.registry import LOSSES

if TYPE_CHECKING:
    from siamese_retrieval.models.distance import Distance


@dataclass
class PairOutput:
    """Everything a loss may need for a batch of (query, database) pairs."""

    emb_q: torch.Tensor  # (B, D)
    emb_d: torch.Tensor  # (B, D)
    distance: torch.Tensor  # (B,)
    logits: torch.Tensor  # (B,) relevance head before the sigmoid
    score: torch.Tensor  # (B,) relevance in [0, 1]
    target: torch.Tensor  # (B,) sim (0/1) or fov, per the pair recipe
    fov: torch.Tensor  # (B,) graded relevance
    # Optional, for in-batch mining (models/mining.py); keep them last so positional calls still work.
    q_idx: torch.Tensor | None = None  # (B,) dataset index of each pair's query
    d_idx: torch.Tensor | None = None  # (B,) dataset index of each pair's database image
    cross_fov: torch.Tensor | None = None  # (B, B) fov of (query i, database j); NaN = unknown
    head_logits_detached: torch.Tensor | None = None  # (B,) head on the distance with the encoder cut off
    distance_fn: "Distance | None" = None  # the module's distance (miners re-measure cross pairs with it)
    # Place batches only (data/place_batches.py), for metric-learning losses (models/metric_losses.py):
    embeddings: torch.Tensor | None = None  # (N, D) every image of the batch, each once
    labels: torch.Tensor | None = None  # (N,) place index within the batch


@LOSSES.register("mse")
class MSEHeadLoss(nn.Module):
    """The study's loss: mean squared error between the head's relevance and the target."""

    def forward(self, out: PairOutput) -> torch.Tensor:
        return F.mse_loss(out.score, out.target)


@LOSSES.register("bce")
class BCEHeadLoss(nn.Module):
    """Binary cross-entropy on the head's logits (targets may be graded, e.g. fov).

    `detach_distance=True` fits only the head (calibrating the relevance score, hence range accuracy)
    and leaves the embedding to another loss, e.g. the contrastive one in a `SumOfLosses`.
    """

    def __init__(self, detach_distance: bool = False) -> None:
        super().__init__()
        self.detach_distance = detach_distance

    def forward(self, out: PairOutput) -> torch.Tensor:
        logits = out.head_logits_detached if self.detach_distance else out.logits
        if logits is None:
            raise ValueError("BCEHeadLoss(detach_distance=True) needs PairOutput.head_logits_detached")
        return F.binary_cross_entropy_with_logits(logits, out.target)


@LOSSES.register("sum")
class SumOfLosses(nn.Module):
    """Weighted sum of named loss terms, each logged by the module as train/loss_<name>.

    A term given as None is left out, with its weight: how a derived config drops one of its parent's terms
    (YAML can override a key, not delete it).
    """

    def __init__(self, terms: Mapping[str, nn.Module | None], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"weights for unknown loss terms {sorted(unknown)}; terms: {sorted(terms)}")
        self.terms = nn.ModuleDict({name: term for name, term in terms.items() if term is not None})
        if not self.terms:
            raise ValueError("SumOfLosses needs at least one loss term that is not null")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.terms}
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, out: PairOutput) -> torch.Tensor:
        self.last_terms = {name: term(out) for name, term in self.terms.items()}
        return sum(self.weights[name] * value for name, value in self.last_terms.items())


@LOSSES.register("graded_contrastive")
class GradedContrastiveLoss(nn.Module):
    """Generalized Contrastive Loss (Leyva-Vallina et al.): the binary label replaced by fov in [0, 1].

    Pairs are pulled together in proportion to how much of the scene they share and pushed apart in
    proportion to how much they do not; with binary fov it is exactly `ContrastiveLoss`.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, out: PairOutput) -> torch.Tensor:
        return graded_contrastive(out.distance, out.fov.float(), self.margin)


@LOSSES.register("contrastive")
class ContrastiveLoss(GradedContrastiveLoss):
    """Hadsell et al. 2006: y * d^2 + (1 - y) * max(0, margin - d)^2 on binary sim (target > 0.5).
    The graded loss on the binary label instead of fov, hence its subclass (same margin)."""

    def forward(self, out: PairOutput) -> torch.Tensor:
        y = (out.target > 0.5).float()
        return graded_contrastive(out.distance, y, self.margin)


def graded_contrastive(distance: torch.Tensor, psi: torch.Tensor, margin: float) -> torch.Tensor:
    pull = psi * distance**2
    push = (1.0 - psi) * torch.clamp(margin - distance, min=0.0) ** 2
    return 0.5 * (pull + push).mean()
