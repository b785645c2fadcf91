"""The study's keypoint encoder, KeypointMLP: one shared branch of the Siamese network.

Every encoder takes the batch dict its `inputs` builder produces (see data/inputs.py) and returns
(B, D) float embeddings. Swapped by config (`model=...`), never by code edits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Encoder
from siamese_retrieval.registry import ENCODERS

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}  # the config's choices


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


@ENCODERS.register("keypoint_mlp")
class KeypointMLP(nn.Module):
    """The study's branch: N ORB descriptors (32 bytes each) flattened -> Dense 100-50-10, sigmoid.

    Keras' Dense(..., kernel_regularizer=l2(1e-3)) adds 1e-3 * sum(W^2) of each kernel to the loss;
    `regularization()` returns exactly that so the module can add it (AdamW's decoupled decay would
    not be the same model). Padded keypoints are zeros, as a missing keypoint carries no bits.
    """

    def __init__(
        self,
        n_keypoints: int = 10,
        hidden: Sequence[int] = (100, 50),
        embedding_dim: int = 10,
        activation_name: str = "sigmoid",
        final_activation: str | None = "sigmoid",
        dropout: float = 0.2,
        l2: float = 1e-3,
        descriptor_encoding: str = "bytes",
        use_geometry: bool = False,
    ) -> None:
        super().__init__()
        check_fields(dict(n_keypoints=n_keypoints, hidden=list(hidden), activation_name=activation_name,
                          final_activation=final_activation, descriptor_encoding=descriptor_encoding),
                     Encoder, "encoder")
        self.n_keypoints = n_keypoints
        self.descriptor_encoding = descriptor_encoding
        self.use_geometry = use_geometry
        self.l2 = l2
        per_kp = (32 if descriptor_encoding == "bytes" else 256) + (4 if use_geometry else 0)
        dims = [n_keypoints * per_kp, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), activation(activation_name)]
        # The study's Dropout(0.2) sits after the last hidden layer, before the embedding layer.
        layers += [nn.Dropout(dropout), nn.Linear(dims[-1], embedding_dim)]
        if final_activation:
            layers.append(activation(final_activation))
        self.net = nn.Sequential(*layers)
        self.embedding_dim = embedding_dim

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        desc = batch["desc"]  # (B, N, 32) uint8
        mask = batch["mask"].unsqueeze(-1)  # (B, N, 1)
        if desc.shape[1] != self.n_keypoints:
            raise ValueError(f"encoder expects {self.n_keypoints} keypoints per image, got {desc.shape[1]}")
        if self.descriptor_encoding == "bytes":
            x = desc.float() / 255.0
        else:
            shifts = torch.arange(7, -1, -1, device=desc.device, dtype=torch.uint8)
            x = ((desc.unsqueeze(-1) >> shifts) & 1).flatten(-2).float()
        x = x * mask
        if self.use_geometry:
            x = torch.cat([x, batch["geom"].float() * mask], dim=-1)
        return x.flatten(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.features(batch))

    def regularization(self) -> torch.Tensor:
        weights = [m.weight for m in self.net if isinstance(m, nn.Linear)]
        return self.l2 * sum((w**2).sum() for w in weights)
