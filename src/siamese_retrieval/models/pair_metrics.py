"""The study's range accuracy: how often the model's relevance score of a pair is within `margin` of its target.

A metric of the model's pair scores (the relevance head's output against the pair's target), logged by
SiameseModule's validation and test steps as `{val,test}/range_acc@<margin>` and by evaluate.py, so it lives
with the model; the ranking metrics of the retrieval engine are retrieval/metrics.py. Registered in
registry.METRICS as the family "range_acc" (higher is better; the results table shows range_acc@0.01).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from siamese_retrieval.registry import METRICS

__all__ = ["RangeAccuracy", "range_accuracy"]


def range_accuracy(pred: Tensor, target: Tensor, margin: float = 0.01) -> Tensor:
    """Fraction of pairs with |pred - target| < margin, strictly (the study's "accuracy within a
    relevance range of 0.01"). NaN for empty input."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    within = (pred.double() - target.double()).abs() < margin
    return within.double().mean().float() if within.numel() else torch.tensor(float("nan"))


@METRICS.register("range_acc", higher_is_better=True, at_k=True, row=50, shown=("range_acc@0.01",),
                  description="fraction of pairs whose relevance score is within the margin (@<margin>) of the target")
class RangeAccuracy(Metric):
    """`range_accuracy` accumulated over batches (sum states; exact under DDP)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, margin: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = float(margin)
        self.add_state("within", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        self.within += ((pred.double() - target.double()).abs() < self.margin).sum()
        self.total += pred.numel()

    def compute(self) -> Tensor:
        return (self.within.double() / self.total.double()).float()
