"""The proposed plain convolutional Siamese branch: conv blocks -> GeM pooling -> L2-normalised embedding.

Trained from scratch (no pretrained weights can be downloaded). The encoder takes the uint8 RGB images
the datamodule holds (`batch["image"]`, (B, 3, H, W)) and normalises them itself, so the data stays
uint8 (4x less memory, 4x cheaper slicing and transfer) until it reaches the first convolution.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# ImageNet statistics: fixed constants (not learned), a sensible scale for RGB photographs.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)


class GeM(nn.Module):
    """Generalized-mean pooling (Radenović et al.): (mean_hw clamp(x, eps)^p)^(1/p), p learnable.

    p = 1 is average pooling, p -> inf approaches max pooling. Computed in float32 whatever the
    autocast dtype: x^p of half-precision activations overflows / underflows easily.
    """

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        p_t = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(p_t)
        else:
            self.register_buffer("p", p_t)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p)
        return x.mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.3g}, learnable={isinstance(self.p, nn.Parameter)}, eps={self.eps}"


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PlainCNN(nn.Module):
    """Stages of `blocks_per_stage` x (conv3x3-BN-ReLU) + 2x2 max-pool, GeM, dropout, linear, L2 norm.

    With widths (32, 64, 128, 256) a 96 x 128 input ends as a 256 x 6 x 8 map before pooling.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks_per_stage: int = 1,
        embedding_dim: int = 128,
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        dropout: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("PlainCNN needs at least one stage width")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            for _ in range(blocks_per_stage):
                layers += conv_bn_relu(cin, int(width))
                cin = int(width)
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = GeM(gem_p, learnable=gem_learnable)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(cin, embedding_dim)
        self.normalize = normalize
        self.embedding_dim = embedding_dim
        self.in_channels = in_channels
        mean = torch.tensor(RGB_MEAN if in_channels == 3 else [0.5] * in_channels)
        std = torch.tensor(RGB_STD if in_channels == 3 else [0.25] * in_channels)
        # Non-persistent: constants, not state; checkpoints stay independent of them.
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, -1, 1, 1), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] (or float on the same scale) -> float32 normalised ((x/255 - mean) / std)."""
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"PlainCNN expects images (B, {self.in_channels}, H, W), got {tuple(image.shape)}")
        # One fused multiply-add; keeps the caller's memory format (channels_last stays channels_last).
        return torch.addcmul(self.shift, image.float(), self.scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.features(self.prepare(batch["image"]))
        emb = self.proj(self.dropout(self.pool(x)))
        if self.normalize:
            emb = F.normalize(emb.float(), dim=-1)
        return emb
