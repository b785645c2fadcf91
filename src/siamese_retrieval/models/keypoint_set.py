"""KeypointSetEncoder: a Siamese branch over a SET of ORB keypoints per image (model=keypoint_set).

The study's KeypointMLP flattens 10 descriptors in detector-response order, so the same corner lands in
another slot in another view and the MLP ranks at chance. This encoder treats an image as an unordered set:

    per keypoint   +-1 descriptor bits (256) | Fourier features of (x, y) | cos, sin, log size, response, octave
                   -> token MLP -> d_model                                     (the same weights for every keypoint)
    context        0-3 masked self-attention blocks (pre-norm), with NO embedding of the list position:
                   the blocks are permutation-equivariant
    pooling        order-invariant, masked: mean | gem | attention (learned queries) | netvlad
    output         dropout -> linear -> embedding_dim -> L2 normalisation

Padded keypoints (`mask` False) are zeroed at the input, are never attended to and are left out of every
pooling, so whatever values they hold the embedding is the same; an image without keypoints gets a constant
embedding. Batches are the dicts of data/inputs.py KeypointSetInputs: desc uint8 (B, N, 32), feat float
(B, N, 7) (data/keypoints.py SET_FEATURES), mask bool (B, N).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from siamese_retrieval.data.keypoints import DESC_BYTES, N_SET_FEATURES
from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Encoder, KeypointPooling
from siamese_retrieval.models.aggregation import named_knobs
from siamese_retrieval.registry import ENCODERS, KEYPOINT_POOLINGS

# Every knob of every pooling, with its default; a pooling ignores the others' knobs (one config node holds all,
# so `pooling.name=gem` on the command line switches poolings without adding keys).
POOLING_DEFAULTS: dict[str, Any] = {"name": "attention", "queries": 4, "clusters": 16, "gem_p": 3.0,
                                    "gem_learnable": True, "dim": None}
_BITS = DESC_BYTES * 8


def pooling_config(pooling: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A pooling name or {name, knobs} -> the full knob dict, checked against the config schema."""
    return named_knobs(pooling, POOLING_DEFAULTS, KEYPOINT_POOLINGS.names(), KeypointPooling, "pooling")


def unpack_bits(desc: torch.Tensor) -> torch.Tensor:
    """(..., 32) uint8 packed BRIEF -> (..., 256) float +-1 (bit 1 -> +1, bit 0 -> -1), MSB first."""
    shifts = torch.arange(7, -1, -1, device=desc.device, dtype=torch.uint8)
    bits = (desc.to(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2).float().mul_(2.0).sub_(1.0)


def fourier_features(xy: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """(..., 2) in [0, 1] -> (..., 4 * n_frequencies): sin and cos of pi * 2^k * (x, y), k < n_frequencies."""
    freqs = math.pi * (2.0 ** torch.arange(n_frequencies, device=xy.device, dtype=xy.dtype))
    angles = (xy.unsqueeze(-1) * freqs).flatten(-2)  # (..., 2 * F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over `dim` where `mask`; exactly 0 elsewhere, and all 0 where nothing is valid (no NaN)."""
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return filled.softmax(dim=dim) * mask.to(logits.dtype)


class BitsLinear(nn.Module):
    """`nn.Linear(256, out)` over the +-1 bits of packed 32-byte descriptors. The bits come from a (256, 8) table
    of every byte's +-1 bits (an embedding lookup: ~2.5x faster on CPU than shifting and masking; the same
    numbers as `unpack_bits`). A table of each byte's contribution to the output (embedding_bag) would do fewer
    operations, but its backward is ~4x slower on CPU."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(_BITS, out_features)
        pm1 = unpack_bits(torch.arange(256, dtype=torch.uint8).unsqueeze(-1))  # (256, 8)
        self.register_buffer("pm1", pm1, persistent=False)

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        bits = F.embedding(desc.long(), self.pm1.to(self.linear.weight.dtype)).flatten(-2)  # (..., 256)
        return self.linear(bits)


class SetAttentionBlock(nn.Module):
    """Pre-norm transformer block over a set: x + MHA(LN(x)), then x + FFN(LN(x)); padded keys are never read."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model ({dim}) must be divisible by n_heads ({heads})")
        self.heads, self.dropout = heads, float(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.ff(self.norm2(x))


# ----------------------------------------------------------------------------------------- poolings
# Each: (tokens (B, N, D), mask (B, N) bool) -> (B, out_dim), invariant to the order of the N keypoints.


class MaskedMean(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class _MaskedGeMFunction(torch.autograd.Function):
    """(mean_n w_n clamp(z_n, eps)^p)^(1/p) with a hand-written backward. Autograd's version of the same formula
    (relu, clamp, pow by a tensor, masked mean, pow) makes ~25 passes over the (B, N, D) activations and was ~70%
    of a keypoint_set training step on CPU; this one makes ~12, over tensors it saves once (tests/test_keypoint_set
    checks values and gradients against the plain formula, and gradcheck in float64).

    z: (B, N, D) pre-activations; weights: (B, N) = mask / number of valid keypoints; p: scalar tensor >= 1."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weights: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        log_r = z.clamp(min=eps).log_()
        f = (log_r * p).exp_()  # clamp(z, eps)^p
        mean = torch.bmm(weights.unsqueeze(1), f).squeeze(1)  # (B, D)
        mean_c = mean.clamp(min=eps)
        out = mean_c.pow(1.0 / p)
        ctx.save_for_backward(weights, p, log_r, f, mean, out)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        weights, p, log_r, f, mean, out = ctx.saved_tensors
        eps = ctx.eps
        mean_c = mean.clamp(min=eps)
        live = (mean >= eps).to(out.dtype)  # clamp's gradient mask
        g_mean = grad_out * out / mean_c * live / p  # d loss / d mean, (B, D)
        grad_z = grad_p = None
        if ctx.needs_input_grad[0]:
            # d mean / d z_n = w_n * p * z_n^(p - 1) where z_n > eps, else 0
            grad_z = (log_r * (p - 1.0)).exp_().mul_(g_mean.unsqueeze(1) * p).mul_(weights.unsqueeze(-1))
            grad_z.masked_fill_(log_r <= math.log(eps), 0.0)
        if ctx.needs_input_grad[2]:
            d_mean_d_p = torch.bmm(weights.unsqueeze(1), f * log_r).squeeze(1)  # sum_n w_n f_n log r_n
            grad_p = (grad_out * out * (-mean_c.log() / p**2) + g_mean * d_mean_d_p).sum().reshape(p.shape)
        return grad_z, None, grad_p, None


class MaskedGeM(nn.Module):
    """A linear + ReLU to `out_dim` non-negative features (soft "visual word" detectors), then the generalised mean
    (mean(f^p))^(1/p) of each over the valid keypoints: a soft, learned bag of words."""

    def __init__(self, dim: int, p: float = 3.0, learnable: bool = True, eps: float = 1e-6,
                 out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = int(out_dim or dim)
        self.proj = nn.Linear(dim, out_dim)
        p_t = torch.tensor(float(p))
        self.p = nn.Parameter(p_t) if learnable else None
        if not learnable:
            self.register_buffer("p_fixed", p_t, persistent=False)
        self.eps, self.out_dim = eps, out_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = (self.p if self.p is not None else self.p_fixed).clamp(min=1.0).float()
        m = mask.float()
        weights = m / m.sum(1, keepdim=True).clamp(min=1.0)
        # clamp(z, eps) = clamp(relu(z), eps): the ReLU features, floored at eps
        return _MaskedGeMFunction.apply(self.proj(x).float(), weights, p, self.eps).to(x.dtype)


class AttentionPooling(nn.Module):
    """M learned queries attend over the valid keypoints (one softmax each); their M outputs are concatenated."""

    def __init__(self, dim: int, queries: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(queries, dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.scale, self.out_dim = 1.0 / math.sqrt(dim), queries * dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        logits = torch.einsum("md,bnd->bmn", self.queries, self.key(h)) * self.scale  # (B, M, N)
        w = masked_softmax(logits, mask[:, None, :], dim=-1)
        return torch.einsum("bmn,bnd->bmd", w, self.value(h)).flatten(1)


class MaskedNetVLAD(nn.Module):
    """NetVLAD over the valid keypoints' L2-normalised tokens: K*D dims. Its clusters are initialised once, from
    the first training batch's tokens (a few k-means iterations; `initialised` is saved, so a resumed or loaded
    model keeps them). Under DDP rank 0's clusters are broadcast."""

    def __init__(self, dim: int, clusters: int = 16, alpha: float = 10.0) -> None:
        super().__init__()
        self.clusters, self.alpha = int(clusters), float(alpha)
        self.assign = nn.Linear(dim, clusters)
        self.centroids = nn.Parameter(F.normalize(torch.randn(clusters, dim), dim=1))
        self.register_buffer("initialised", torch.tensor(False))
        self.out_dim = clusters * dim

    @torch.no_grad()
    def initialise(self, tokens: torch.Tensor, iterations: int = 10) -> None:
        """k-means (cosine) on (n, D) normalised tokens -> centroids and the assignment layer."""
        n = len(tokens)
        if n >= self.clusters:
            g = torch.Generator(device="cpu").manual_seed(0)
            c = tokens[torch.randperm(n, generator=g)[: self.clusters].to(tokens.device)].clone()
            for _ in range(iterations):
                nearest = (tokens @ c.T).argmax(1)
                sums = torch.zeros_like(c).index_add_(0, nearest, tokens)
                counts = torch.bincount(nearest, minlength=self.clusters).unsqueeze(1)
                c = torch.where(counts > 0, F.normalize(sums, dim=1), c)
            self.centroids.copy_(c)
        self.assign.weight.copy_(2.0 * self.alpha * self.centroids)
        self.assign.bias.copy_(-self.alpha * self.centroids.pow(2).sum(1))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.centroids, self.assign.weight, self.assign.bias):
                torch.distributed.broadcast(t.data, src=0)
        self.initialised.fill_(True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1)
            if self.training and not bool(self.initialised):
                self.initialise(x[mask].detach())
            a = self.assign(x).softmax(dim=-1) * mask.unsqueeze(-1).float()  # (B, N, K), 0 on padding
            vlad = torch.einsum("bnk,bnd->bkd", a, x) - a.sum(1).unsqueeze(-1) * self.centroids
            vlad = F.normalize(vlad, dim=2)  # intra-normalisation
            return F.normalize(vlad.flatten(1), dim=1)


def make_pooling(cfg: Mapping[str, Any], dim: int) -> nn.Module:
    """The registered pooling `cfg["name"]` (pooling_config's knobs) over `dim`-wide tokens."""
    return KEYPOINT_POOLINGS.get(str(cfg["name"]), key="pooling.name")(dim, cfg)


@KEYPOINT_POOLINGS.register("mean")
def _mean(dim: int, cfg: Mapping[str, Any]) -> nn.Module:
    return MaskedMean(dim)


@KEYPOINT_POOLINGS.register("gem")
def _gem(dim: int, cfg: Mapping[str, Any]) -> nn.Module:
    return MaskedGeM(dim, p=float(cfg["gem_p"]), learnable=bool(cfg["gem_learnable"]), out_dim=cfg["dim"])


@KEYPOINT_POOLINGS.register("attention")
def _attention(dim: int, cfg: Mapping[str, Any]) -> nn.Module:
    return AttentionPooling(dim, queries=int(cfg["queries"]))


@KEYPOINT_POOLINGS.register("netvlad")
def _netvlad(dim: int, cfg: Mapping[str, Any]) -> nn.Module:
    return MaskedNetVLAD(dim, clusters=int(cfg["clusters"]))


# ----------------------------------------------------------------------------------------- the encoder


@ENCODERS.register("keypoint_set")
class KeypointSetEncoder(nn.Module):
    """(desc, feat, mask) of B images with N keypoints each -> (B, embedding_dim), invariant to keypoint order.

    Args:
        n_keypoints: N (the inputs' n_keypoints); checked against the batch.
        d_model: token width.
        token_hidden: hidden width of the per-keypoint MLP (null: 2 * d_model).
        pos_frequencies: Fourier frequencies of the (x, y) encoding (0: position unused).
        use_geometry: also feed orientation, log size, response and octave.
        n_layers: masked self-attention blocks (0-3).
        n_heads, ff_mult: attention heads and feed-forward width multiple of those blocks.
        dropout: in the blocks and before the projection.
        pooling: name or {name, queries, clusters, gem_p, gem_learnable, dim} (POOLING_DEFAULTS).
        embedding_dim: output size; normalize: L2-normalise it.
        inference_chunk: sets per forward pass without autograd (evaluation, look-alike packing); the same
            embeddings, but the (chunk, N, pooling dim) activations stay small enough for malloc to reuse.
    """

    def __init__(
        self,
        n_keypoints: int = 256,
        d_model: int = 128,
        token_hidden: int | None = None,
        pos_frequencies: int = 6,
        use_geometry: bool = True,
        n_layers: int = 1,
        n_heads: int = 4,
        ff_mult: int = 2,
        dropout: float = 0.0,
        pooling: str | Mapping[str, Any] | None = "attention",
        embedding_dim: int = 128,
        normalize: bool = True,
        inference_chunk: int | None = 128,
    ) -> None:
        super().__init__()
        check_fields(dict(n_keypoints=n_keypoints, d_model=d_model, token_hidden=token_hidden, n_heads=n_heads,
                          pos_frequencies=pos_frequencies, n_layers=n_layers, ff_mult=ff_mult,
                          inference_chunk=inference_chunk), Encoder, "encoder")
        self.inference_chunk = None if inference_chunk is None else int(inference_chunk)
        self.n_keypoints, self.d_model = int(n_keypoints), int(d_model)
        self.pos_frequencies, self.use_geometry = int(pos_frequencies), bool(use_geometry)
        self.normalize, self.embedding_dim = bool(normalize), int(embedding_dim)
        self.pooling_cfg = pooling_config(pooling)
        geo_dim = 4 * self.pos_frequencies + (N_SET_FEATURES - 2 if self.use_geometry else 0)
        hidden = int(token_hidden or 2 * self.d_model)
        # the token MLP: linear(bits) + linear(geometry) -> GELU -> linear; the bits' part without unpacking them
        self.bits = BitsLinear(hidden)
        self.geometry = nn.Linear(geo_dim, hidden, bias=False) if geo_dim else None
        self.token = nn.Sequential(nn.GELU(), nn.Linear(hidden, self.d_model))
        self.blocks = nn.ModuleList(SetAttentionBlock(self.d_model, int(n_heads), int(ff_mult), float(dropout))
                                    for _ in range(int(n_layers)))
        self.norm = nn.LayerNorm(self.d_model)
        self.pool = make_pooling(self.pooling_cfg, self.d_model)
        self.drop = nn.Dropout(float(dropout))
        self.proj = nn.Linear(self.pool.out_dim, self.embedding_dim)

    def geometry_inputs(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, N, 7) SET_FEATURES -> (B, N, geo_dim): Fourier features of (x, y) (+ the other geometry)."""
        parts = [fourier_features(feat[..., :2], self.pos_frequencies)]
        if self.use_geometry:
            g = feat[..., 2:]
            # log size is about -3..-1: centre it near 0 (cos, sin, response, octave are already in [-1, 1])
            parts.append(torch.cat([g[..., :2], g[..., 2:3] + 2.0, g[..., 3:]], dim=-1))
        return torch.cat(parts, dim=-1)

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d_model) contextual keypoint tokens and the (B, N) mask. Padded rows are zeroed first (whatever
        they held, NaN included), so they are the same constant token in every image."""
        desc, feat, mask = batch["desc"], batch["feat"], batch["mask"].bool()
        if desc.shape[1] != self.n_keypoints:
            raise ValueError(f"encoder expects {self.n_keypoints} keypoints per image, got {desc.shape[1]}")
        keep = mask.unsqueeze(-1)
        desc = torch.where(keep, desc, torch.zeros((), dtype=desc.dtype, device=desc.device))
        x = self.bits(desc)
        if self.geometry is not None:
            feat = torch.where(keep, feat.float(), torch.zeros((), device=feat.device))
            x = x + self.geometry(self.geometry_inputs(feat))
        x = self.token(x)
        if len(self.blocks):
            # an image without keypoints attends over its (constant) padding: finite, and pooled away below
            key_mask = mask | ~mask.any(dim=1, keepdim=True)
            for block in self.blocks:
                x = block(x, key_mask)
        return self.norm(x), mask

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = len(batch["desc"])
        chunk = self.inference_chunk
        if chunk is not None and n > chunk and not torch.is_grad_enabled():
            # why: at 1024 sets a (B, 512, 512) float activation is 1 GiB; glibc hands blocks that big back to
            # the kernel when freed, so every one is faulted in again: ~4.5x the time of 128-set chunks
            # (experiments/benchmarks/inference_chunk.py); slices are views, nothing is copied
            return torch.cat([self._embed({k: v[s : s + chunk] for k, v in batch.items()}) for s in range(0, n, chunk)])
        return self._embed(batch)

    def _embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x, mask = self.tokens(batch)
        emb = self.proj(self.drop(self.pool(x, mask)))
        return F.normalize(emb, dim=-1) if self.normalize else emb
