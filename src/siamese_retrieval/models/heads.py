"""The relevance head: the study's Dense(1, sigmoid) on the embedding distance."""

from __future__ import annotations

import torch
from torch import nn


class RelevanceHead(nn.Module):
    """relevance = sigmoid(w * distance + b); `logits` is the part before the sigmoid (what BCE trains)."""

    def __init__(self, init_weight: float = -1.0, init_bias: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        nn.init.constant_(self.linear.weight, init_weight)
        nn.init.constant_(self.linear.bias, init_bias)

    def logits(self, distance: torch.Tensor) -> torch.Tensor:
        return self.linear(distance.unsqueeze(-1)).squeeze(-1)
