"""The proposed plain convolutional Siamese branch: conv blocks -> aggregation (GeM) -> L2-normalised embedding.

The aggregation head is swapped by config (`aggregation`: gem | netvlad | convap, models/aggregation.py), with
optional PCA-whitening of the embedding (`whiten_dim`). The GeM path keeps its parameter names (`pool.p`,
`proj.*`), so checkpoints of the GeM-only encoder load unchanged.

Trained from scratch (no pretrained weights can be downloaded). The encoder takes the uint8 RGB images
the datamodule holds (`batch["image"]`, (B, 3, H, W)) and normalises them itself, so the data stays
uint8 (4x less memory, 4x cheaper slicing and transfer) until it reaches the first convolution.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Encoder
from siamese_retrieval.models.aggregation import NetVLAD, PCAWhitening, aggregation_config
from siamese_retrieval.registry import AGGREGATIONS, ENCODERS

# ImageNet statistics: fixed constants (not learned), a sensible scale for RGB photographs.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
# fixed: (x/255 - mean) / std with the constants above. per_image: each image's channels standardised by
# their own mean and std, so a global exposure or colour-cast change (night, dusk, another camera's white
# balance) is removed before the first convolution (gray-world colour constancy). The choices: configs/model.py.


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


@AGGREGATIONS.register("gem")
def gem_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    """GeM keeps the channels; its exponent is the encoder's gem_p / gem_learnable."""
    return GeM(knobs["gem_p"], learnable=knobs["gem_learnable"])


class PooledEncoder(nn.Module):
    """What every image encoder shares after its trunk: aggregation head -> dropout -> projection -> L2 norm
    [-> PCA-whitening]. A subclass builds `self.features` (the trunk: image -> last feature map), then calls
    `_init_head`, and defines `prepare` (uint8 images -> the trunk's input), then calls `_init_input` last; the
    attribute names (pool, dropout, proj, whiten) are the checkpoints' keys."""

    memory_format = torch.contiguous_format

    def _init_head(self, cin: int, aggregation: str | Mapping[str, Any] | None, embedding_dim: int, gem_p: float,
                   gem_learnable: bool, dropout: float, normalize: bool, whiten_dim: int | None) -> None:
        agg = aggregation_config(aggregation)
        self.aggregation = str(agg["name"])
        self.pool: nn.Module = AGGREGATIONS.get(self.aggregation)(cin, {**agg, "gem_p": gem_p,
                                                                      "gem_learnable": gem_learnable})
        head_dim = getattr(self.pool, "out_dim", cin)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(head_dim, embedding_dim) if agg["project"] else nn.Identity()
        self.normalize = normalize
        self.base_dim = int(embedding_dim) if agg["project"] else int(head_dim)  # before whitening
        self.whiten = PCAWhitening(self.base_dim, int(whiten_dim), normalize) if whiten_dim else None

    def _init_input(self, mean: Sequence[float], std: Sequence[float], channels_last: bool) -> None:
        """The buffers of the fixed input normalisation (x/255 - mean) / std = x * scale + shift, and the
        convolutions' memory layout (`channels_last`: NHWC). Called last: it converts the 4-d weights."""
        std_t = torch.tensor(std)
        # Non-persistent: constants, not state; checkpoints stay independent of them.
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) / std_t).view(1, -1, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # 4-d weights; .to(device) and load_state_dict keep it

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int:
        """The size of what forward() returns now: whiten_dim once the whitening is fitted."""
        return self.whiten.out_dim if self.whiten is not None and self.whiten.is_fitted else self.base_dim

    @property
    def needs_cluster_init(self) -> bool:
        """A NetVLAD head whose clusters k-means has not set yet (models/aggregation_fitting.py)."""
        return isinstance(self.pool, NetVLAD) and not self.pool.is_initialised

    def local_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last feature map (B, C, H', W'): what the aggregation head pools (NetVLAD's k-means input)."""
        return self.features(self.prepare(batch["image"]).contiguous(memory_format=self.memory_format))

    def embed_unwhitened(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedding before PCA-whitening (what the whitening is fitted on)."""
        emb = self.proj(self.dropout(self.pool(self.local_features(batch))))
        if self.normalize:
            emb = F.normalize(emb.float(), dim=-1)
        return emb

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb = self.embed_unwhitened(batch)
        return emb if self.whiten is None else self.whiten(emb)


@ENCODERS.register("plain_cnn")
class PlainCNN(PooledEncoder):
    """Stages of `blocks_per_stage` x (conv3x3-BN-ReLU) + 2x2 max-pool, aggregation, dropout, linear, L2 norm
    [, PCA-whitening].

    With widths (32, 64, 128, 256) a 96 x 128 input ends as a 256 x 6 x 8 map before pooling.
    `aggregation`: a head name or {name: gem | netvlad | convap, project, clusters, channels, pool}
    (models/aggregation.py; gem uses `gem_p` / `gem_learnable`). `project: false` drops the linear layer:
    the embedding is then the head's own output (gem C, netvlad K*C, convap channels*s1*s2 dims).
    `whiten_dim`: PCA-whitening of the (L2-normalised) embedding to this many dims (None: off); identity
    until fitted (models/aggregation_fitting.py fits it on training images).
    `channels_last`: run the convolutions in NHWC memory layout, oneDNN's (and cuDNN's tensor cores') native
    one: the same numbers up to float rounding, ~1.5x faster training steps on CPU
    (experiments/benchmarks/memory_format.py). A layout, not a weight: checkpoints load either way.
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
        aggregation: str | Mapping[str, Any] | None = None,
        whiten_dim: int | None = None,
        input_norm: str = "fixed",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        check_fields(dict(in_channels=in_channels, widths=list(widths), blocks_per_stage=blocks_per_stage,
                          input_norm=input_norm), Encoder, "encoder")
        self.input_norm = input_norm
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            for _ in range(blocks_per_stage):
                layers += conv_bn_relu(cin, int(width))
                cin = int(width)
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self._init_head(cin, aggregation, embedding_dim, gem_p, gem_learnable, dropout, normalize, whiten_dim)
        self.in_channels = in_channels
        for m in self.features.modules():  # the heads keep PyTorch's defaults (NetVLAD's conv: k-means)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._init_input(RGB_MEAN if in_channels == 3 else [0.5] * in_channels,
                         RGB_STD if in_channels == 3 else [0.25] * in_channels, channels_last)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] (or float on the same scale) -> float32 normalised: fixed ((x/255 - mean) / std)
        or per_image (each image's channels by their own mean and std)."""
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"PlainCNN expects images (B, {self.in_channels}, H, W), got {tuple(image.shape)}")
        if self.input_norm == "per_image":
            x = image.float()
            mean = x.mean(dim=(-2, -1), keepdim=True)
            std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1.0)  # a flat channel: 1 grey level, not 0
            return (x - mean) / std
        # One fused multiply-add; keeps the caller's memory format (channels_last stays channels_last).
        return torch.addcmul(self.shift, image.float(), self.scale)
