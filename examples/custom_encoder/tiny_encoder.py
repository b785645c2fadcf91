"""A researcher's own image encoder, outside the package: two conv blocks, global average pooling, a linear
projection, L2-normalised. Any `nn.Module` that maps the input builder's batch to (B, D) embeddings works."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TinyEncoder(nn.Module):
    """`batch["image"]`: uint8 (B, 3, H, W) from ImageInputs -> (B, embedding_dim) unit vectors."""

    def __init__(self, channels: int = 16, embedding_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, embedding_dim),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["image"].float() / 255.0
        return F.normalize(self.net(x - 0.5), dim=-1)
