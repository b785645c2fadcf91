"""Aggregation heads of the plain CNN (the last feature map (B, C, H, W) -> one vector) and PCA-whitening.

Chosen by `PlainCNN(aggregation={"name": ..., knobs})` (cnn.py; config: model.module.encoder.aggregation):
  * gem      GeM pooling (cnn.GeM): the default, C dims.
  * netvlad  NetVLAD (Arandjelovic et al. 2016): soft-assignment of each L2-normalised local descriptor to
             K clusters by a 1x1 conv, sum of residuals per cluster, intra-normalisation, L2: K*C dims.
             Useless from random clusters: `initialise_from_features` runs k-means on training descriptors
             (models/aggregation_fitting.py does it once, at fit start).
  * convap   Conv-AP (Ali-bey et al., GSV-Cities 2022): 1x1 conv to `channels`, adaptive average pooling to
             `pool` = (s1, s2) cells, flatten, L2: channels*s1*s2 dims.
  * mixvpr, boq, salad: MixVPR, BoQ and SALAD (models/vpr_heads.py).
Each head's output is then (cnn.py) dropout -> linear projection to `embedding_dim` (`project: false`: no
projection, the head's own size) -> L2, and optionally `PCAWhitening` to `whiten_dim` dims.

NetVLAD and the whitening compute in the parameters' dtype with autocast off: their softmax / residual sums
and the eigen-scaled projection are where half precision loses the most, and they cost little.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Aggregation
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.registry import AGGREGATIONS, unknown_component

# Every knob of every head, with its default; a head ignores the others' knobs (one config node holds all, so
# `aggregation.name=netvlad` on the command line switches heads without adding keys).
AGGREGATION_DEFAULTS: dict[str, Any] = {"name": "gem", "project": True, "clusters": 32, "channels": 64,
                                        "pool": (2, 2), "rows": 4, "depth": 4, "mlp_ratio": 1.0, "queries": 64,
                                        "layers": 2, "cluster_dim": 128, "token_dim": 256}


def named_knobs(value: str | Mapping[str, Any] | None, defaults: Mapping[str, Any], names: Sequence[str],
                schema: type, what: str) -> dict[str, Any]:
    """A name or a {name, knobs} node -> `defaults` updated by it, checked against the config `schema` (the same
    one-line ConfigError as on the command line). Unknown keys and an unknown name are a ConfigError naming `what`
    (the config node: aggregation, pooling). Shared by the CNN's heads and keypoint_set's poolings, whose config
    nodes work the same way."""
    given = {"name": value} if isinstance(value, str) else dict(value or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    cfg = {**defaults, **given}
    if cfg["name"] not in names:
        raise unknown_component(f"{what}.name", cfg["name"], tuple(names))
    check_fields(cfg, schema, what)
    return cfg


def aggregation_config(aggregation: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A head name or {name, knobs} -> the full knob dict, checked against the config schema (the same one-line
    ConfigError as on the command line)."""
    cfg = named_knobs(aggregation, AGGREGATION_DEFAULTS, AGGREGATIONS.names(), Aggregation, "aggregation")
    return {**cfg, "pool": tuple(cfg["pool"]), "project": bool(cfg["project"])}


class NetVLAD(nn.Module):
    """(B, C, H, W) -> (B, K*C). `initialised` (a saved buffer) records that k-means has set the clusters."""

    def __init__(self, dim: int, clusters: int = 32) -> None:
        super().__init__()
        self.dim, self.clusters = int(dim), int(clusters)
        self.assign = nn.Conv2d(dim, clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.rand(clusters, dim))  # the reference code's placeholder
        self.register_buffer("initialised", torch.tensor(False))
        self.out_dim = self.clusters * self.dim

    @property
    def is_initialised(self) -> bool:
        return bool(self.initialised)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.to(self.centroids.dtype), dim=1)  # per-descriptor L2, as in the paper
            a = self.assign(x).flatten(2).softmax(dim=1)  # (B, K, HW): soft assignment
            # sum_n a_kn (x_n - c_k) without the (B, K, C, HW) residual tensor
            vlad = torch.einsum("bkn,bcn->bkc", a, x.flatten(2)) - a.sum(-1, keepdim=True) * self.centroids
            vlad = F.normalize(vlad, dim=2)  # intra-normalisation (per cluster)
            return F.normalize(vlad.flatten(1), dim=1)

    @torch.no_grad()
    def initialise_from_features(self, local_features: torch.Tensor, seed: int = 0, niter: int = 25, nredo: int = 3,
                                 force: bool = False) -> bool:
        """k-means (faiss) on (N, C) local descriptors sets the centroids and the assignment conv.

        With a_k(x) = softmax_k(-alpha |x - c_k|^2) = softmax_k(2 alpha c_k.x - alpha |c_k|^2), the conv gets
        w_k = 2 alpha c_k, b_k = -alpha |c_k|^2; alpha makes the nearest centroid weigh 100x the second
        nearest on average over the descriptors (alpha = ln 100 / mean(d2^2 - d1^2), squared distances to the
        two nearest centroids), the NetVLAD reference code's rule. k-means keeps the best of `nredo` runs (faiss
        seeds with random points: one run can merge two clusters and leave one empty). Returns False, changing
        nothing, when the clusters are already initialised (a resumed or loaded model) and not `force`.
        """
        import faiss

        if self.is_initialised and not force:
            return False
        x = F.normalize(local_features.detach().float().cpu(), dim=1).numpy()  # as forward() sees them
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"NetVLAD: local features must be (N, {self.dim}), got {tuple(x.shape)}")
        if len(x) < max(2, self.clusters):
            raise ValueError(f"NetVLAD: k-means of {self.clusters} clusters needs at least that many local "
                             f"features, got {len(x)}")
        km = faiss.Kmeans(self.dim, self.clusters, niter=niter, nredo=nredo, seed=int(seed), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
        km.train(x)
        centroids = torch.from_numpy(np.asarray(km.centroids, np.float32).copy())
        d2, _ = km.index.search(x, 2)  # squared L2 to the nearest and second nearest centroid
        gap = float(np.mean(d2[:, 1] - d2[:, 0]))
        alpha = math.log(100.0) / max(gap, 1e-12)
        dev, dtype = self.centroids.device, self.centroids.dtype
        self.centroids.copy_(centroids.to(dev, dtype))
        self.assign.weight.copy_((2.0 * alpha * centroids)[:, :, None, None].to(dev, dtype))
        self.assign.bias.copy_((-alpha * centroids.pow(2).sum(1)).to(dev, dtype))
        self.initialised.fill_(True)
        self.alpha = alpha  # for the log line; not state
        return True

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clusters={self.clusters}"


class ConvAP(nn.Module):
    """(B, C, H, W) -> (B, channels*s1*s2): 1x1 conv channel reduction, adaptive average pool, flatten, L2."""

    def __init__(self, dim: int, channels: int = 64, pool: Sequence[int] = (2, 2)) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, channels, kernel_size=1)
        self.pool_size = (int(pool[0]), int(pool[1]))
        self.out_dim = int(channels) * self.pool_size[0] * self.pool_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.reduce(x), self.pool_size)
        return F.normalize(x.flatten(1).float(), dim=1)

    def extra_repr(self) -> str:
        return f"pool={self.pool_size}, out_dim={self.out_dim}"


class PCAWhitening(nn.Module):
    """x -> L2(P (x - mean)), P = diag(lambda^-1/2) V^T of the top `out_dim` principal axes; identity until fitted.

    Its state is buffers (mean, proj, fitted): saved with the model, never trained (no gradient through
    them; gradients do flow through the map to the network). `fit` takes embeddings of training images
    (models/aggregation_fitting.py refits it at fit start and at every later epoch start).
    """

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if not 1 <= int(out_dim) <= int(in_dim):
            raise ValueError(f"whiten_dim={out_dim}: must be in [1, {in_dim}] (the embedding's size before whitening)")
        self.in_dim, self.out_dim, self.normalize, self.eps = int(in_dim), int(out_dim), normalize, eps
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("proj", torch.zeros(out_dim, in_dim))
        self.register_buffer("fitted", torch.tensor(False))
        self._fitted = False  # python mirror of `fitted`: no device sync per forward

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "fitted" in state_dict:
            self._fitted = bool(state_dict[prefix + "fitted"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fitted:
            return x
        with torch.autocast(x.device.type, enabled=False):
            y = (x.to(self.proj.dtype) - self.mean) @ self.proj.T
            return F.normalize(y, dim=-1) if self.normalize else y

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """PCA of (N, in_dim) embeddings, N > out_dim, in float64; eigenvector signs fixed (largest entry > 0)."""
        x = embeddings.detach().double().cpu()
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"PCA-whitening: embeddings must be (N, {self.in_dim}), got {tuple(x.shape)}")
        if len(x) <= self.out_dim:
            raise ValueError(f"PCA-whitening to {self.out_dim} dims needs more than {self.out_dim} embeddings, "
                             f"got {len(x)}")
        mean = x.mean(0)
        xc = x - mean
        evals, evecs = torch.linalg.eigh(xc.T @ xc / (len(x) - 1))  # ascending
        evals, evecs = evals.flip(0)[: self.out_dim].clamp_min(0), evecs.flip(1)[:, : self.out_dim]
        evecs = evecs * torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
        scale = (evals + self.eps * max(float(evals[0]), 1e-12)).rsqrt()
        self.mean.copy_(mean.to(self.mean))
        self.proj.copy_((evecs * scale).T.to(self.proj))
        self.fitted.fill_(True)
        self._fitted = True

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}, fitted={self._fitted}"


# ----------------------------------------------------------------------------------------- the registered heads
# A head builder: (channels of the last feature map, the aggregation knobs) -> a module with `out_dim` (or the
# input channels when it keeps them). GeM registers itself in cnn.py, beside the encoder that owns its knobs.


@AGGREGATIONS.register("netvlad")
def netvlad_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    return NetVLAD(dim, knobs["clusters"])


@AGGREGATIONS.register("convap")
def convap_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    return ConvAP(dim, knobs["channels"], knobs["pool"])
