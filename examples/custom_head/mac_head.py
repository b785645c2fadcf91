"""A researcher's own aggregation head, outside the package: MAC, the maximum activation of each channel
(Tolias et al., "Particular object retrieval with integral max-pooling of CNN activations", ICLR 2016).

Registering the builder under a name is all it takes: `model.module.encoder.aggregation.name=mac` then puts it
on any image encoder (cnn_snn's PlainCNN, backbone_snn's ResNet), followed by the encoder's usual projection and
L2 normalisation. The builder gets the trunk's channel count and the aggregation node's knobs."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from siamese_retrieval.registry import AGGREGATIONS


class MAC(nn.Module):
    """(B, C, H, W) feature map -> (B, C): each channel's strongest response anywhere in the image."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim  # what the encoder's projection takes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))


@AGGREGATIONS.register("mac")
def mac_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    return MAC(dim)
