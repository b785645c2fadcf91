"""The aggregation heads recent VPR methods compare against: MixVPR, BoQ and SALAD, from their papers.

Each maps the last feature map (B, C, H, W) to one L2-normalised vector and registers itself in
AGGREGATIONS, so `model.module.encoder.aggregation.name=mixvpr|boq|salad` puts it on any image encoder
(cnn_snn's PlainCNN; the projection to `embedding_dim`, whitening and L2 follow as for every head). Their
knobs live in the one aggregation node (models/aggregation.py AGGREGATION_DEFAULTS); the papers' sizes are
the configs conf/ablation/{mixvpr,boq,salad}.yaml.

  * mixvpr  Ali-bey et al., "MixVPR: Feature Mixing for Visual Place Recognition", WACV 2023. The map's
            spatial positions are flattened, `depth` Feature-Mixer blocks (x + MLP(LayerNorm(x)) across the
            positions, hidden = positions x mlp_ratio) mix them, then a linear map over channels (C ->
            `channels`) and one over positions (-> `rows`): channels x rows dims. The paper's head sees a
            fixed 20 x 20 map; here the map is first average-pooled to `pool` cells so the head does not
            depend on the image size (our maps are 3 x 4 to 8 x 8).
  * boq     Ali-bey et al., "BoQ: A Place is Worth a Bag of Learnable Queries", CVPR 2024. A 1x1 conv to
            `channels`, the positions as tokens (LayerNorm), then `layers` blocks: a transformer encoder layer
            on the tokens, and `queries` learned queries (self-attention among themselves, then cross-attention
            to the tokens); every block's attended queries are concatenated and a linear map over them gives
            `rows` rows: channels x rows dims.
  * salad   Izquierdo & Civera, "Optimal Transport Aggregation for Visual Place Recognition", CVPR 2024. Each
            position gets a `cluster_dim` feature and a score per cluster (two small 1x1-conv MLPs); a learned
            dust-bin score is appended and 3 log-domain Sinkhorn iterations turn the scores into a transport
            plan (positions -> clusters + dust bin, which absorbs the uninformative ones); features are summed
            per cluster with the plan's weights, L2 per cluster, and concatenated with a `token_dim` global
            token (the map's mean through an MLP; the paper's DINOv2 has a class token, a CNN has none):
            token_dim + clusters x cluster_dim dims. With fewer positions than clusters (the paper has n > m)
            the dust bin keeps one position's mass, so the plan stays defined.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from siamese_retrieval.registry import AGGREGATIONS


class FeatureMixer(nn.Module):
    """x + MLP(LayerNorm(x)) over the last dimension (the flattened positions)."""

    def __init__(self, positions: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, int(round(positions * mlp_ratio)))
        self.mix = nn.Sequential(nn.LayerNorm(positions), nn.Linear(positions, hidden), nn.ReLU(),
                                 nn.Linear(hidden, positions))
        for m in self.mix.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPR(nn.Module):
    """(B, C, H, W) -> (B, channels * rows)."""

    def __init__(self, dim: int, channels: int = 512, rows: int = 4, depth: int = 4, mlp_ratio: float = 1.0,
                 pool: tuple[int, int] = (4, 4)) -> None:
        super().__init__()
        self.grid = (int(pool[0]), int(pool[1]))
        positions = self.grid[0] * self.grid[1]
        self.mixers = nn.Sequential(*(FeatureMixer(positions, mlp_ratio) for _ in range(int(depth))))
        self.channel_proj = nn.Linear(dim, int(channels))
        self.row_proj = nn.Linear(positions, int(rows))
        self.out_dim = int(channels) * int(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2)  # (B, C, positions)
        x = self.mixers(x)
        x = self.channel_proj(x.transpose(1, 2))  # (B, positions, channels)
        x = self.row_proj(x.transpose(1, 2))  # (B, channels, rows)
        return F.normalize(x.flatten(1).float(), dim=-1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, out_dim={self.out_dim}"


class BoQBlock(nn.Module):
    """One BoQ block: tokens through a transformer encoder layer; the learned queries attend to themselves,
    then to the tokens. Returns (the tokens for the next block, the attended queries)."""

    def __init__(self, dim: int, queries: int, heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                                  batch_first=True, norm_first=False)
        self.queries = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder(tokens)
        q = self.queries.expand(len(tokens), -1, -1)
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])
        out = self.cross_attn(q, tokens, tokens, need_weights=False)[0]
        return tokens, self.norm_out(out)


class BoQ(nn.Module):
    """(B, C, H, W) -> (B, channels * rows)."""

    def __init__(self, dim: int, channels: int = 512, queries: int = 64, layers: int = 2, rows: int = 32) -> None:
        super().__init__()
        heads = max(1, int(channels) // 64)
        while int(channels) % heads:
            heads -= 1
        self.proj = nn.Conv2d(dim, int(channels), kernel_size=1)
        self.norm_in = nn.LayerNorm(int(channels))
        self.blocks = nn.ModuleList(BoQBlock(int(channels), int(queries), heads) for _ in range(int(layers)))
        self.fc = nn.Linear(int(layers) * int(queries), int(rows))
        self.out_dim = int(channels) * int(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm_in(self.proj(x).flatten(2).transpose(1, 2))  # (B, positions, channels)
        outs = []
        for block in self.blocks:
            tokens, out = block(tokens)
            outs.append(out)
        x = self.fc(torch.cat(outs, dim=1).transpose(1, 2))  # (B, channels, rows)
        return F.normalize(x.flatten(1).float(), dim=-1)


def sinkhorn_log(scores: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, iters: int) -> torch.Tensor:
    """log of the transport plan of `scores` (B, m, n) with row / column log-marginals log_a (m,), log_b (n,):
    `iters` alternating log-domain normalisations (Sinkhorn), entropic regularisation 1."""
    u = torch.zeros_like(scores[:, :, 0])
    v = torch.zeros_like(scores[:, 0, :])
    for _ in range(int(iters)):
        u = log_a - torch.logsumexp(scores + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(scores + u.unsqueeze(2), dim=1)
    return scores + u.unsqueeze(2) + v.unsqueeze(1)


class SALAD(nn.Module):
    """(B, C, H, W) -> (B, token_dim + clusters * cluster_dim)."""

    def __init__(self, dim: int, clusters: int = 64, cluster_dim: int = 128, token_dim: int = 256,
                 hidden: int = 512, iters: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        self.clusters, self.iters = int(clusters), int(iters)
        self.cluster_features = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Dropout(dropout), nn.ReLU(),
                                              nn.Conv2d(hidden, int(cluster_dim), 1))
        self.score = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Dropout(dropout), nn.ReLU(),
                                   nn.Conv2d(hidden, self.clusters, 1))
        self.token = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, int(token_dim)))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.out_dim = int(token_dim) + self.clusters * int(cluster_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m = len(x), self.clusters
        f = self.cluster_features(x).flatten(2)  # (B, cluster_dim, n)
        s = self.score(x).flatten(2)  # (B, m, n)
        n = s.shape[-1]
        t = self.token(x.mean(dim=(2, 3)))
        scores = torch.cat([s, self.dust_bin.expand(b, 1, n)], dim=1)  # (B, m + 1, n)
        norm = -math.log(n + m)
        log_a = torch.full((m + 1,), norm, dtype=s.dtype, device=s.device)
        log_a[-1] = norm + math.log(max(n - m, 1))  # the dust bin takes what the clusters leave
        log_b = torch.full((n,), norm, dtype=s.dtype, device=s.device)
        plan = (sinkhorn_log(scores, log_a, log_b, self.iters) - norm).exp()[:, :m]  # (B, m, n), dust bin dropped
        agg = torch.einsum("bln,bmn->blm", f, plan)  # (B, cluster_dim, m)
        agg = F.normalize(agg, dim=1).flatten(1)
        return F.normalize(torch.cat([F.normalize(t, dim=-1), agg], dim=-1).float(), dim=-1)

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, sinkhorn_iters={self.iters}, out_dim={self.out_dim}"


@AGGREGATIONS.register("mixvpr")
def mixvpr_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    return MixVPR(dim, knobs["channels"], knobs["rows"], knobs["depth"], knobs["mlp_ratio"], knobs["pool"])


@AGGREGATIONS.register("boq")
def boq_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    return BoQ(dim, knobs["channels"], knobs["queries"], knobs["layers"], knobs["rows"])


@AGGREGATIONS.register("salad")
def salad_head(dim: int, knobs: Mapping[str, Any]) -> nn.Module:
    return SALAD(dim, knobs["clusters"], knobs["cluster_dim"], knobs["token_dim"])
