"""`model=backbone_snn`: a Siamese encoder on a ResNet backbone, from random init or a local weights file.

    BackboneEncoder(backbone="resnet50", weights="resnet50.pth", stages=3, freeze_stages=2, aggregation="gem")

The ResNets (18, 34, 50, 101: He et al. 2016, the torchvision variant with the stride on the 3x3 convolution)
carry torchvision's parameter names and shapes, so a state dict saved from torchvision on a machine with
internet loads as it is, e.g.

    python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights='DEFAULT').state_dict(), 'resnet50.pth')"

(here the CPU build of torch cannot import torchvision, so the architectures live in this file; the test
checks them against torchvision's published parameter counts). `timm:<name>` (e.g. timm:convnext_tiny) takes
a timm model's feature maps instead, where the optional timm extra is installed. `weights` may be `.pth`, `.pt`, `.bin` (read
with torch.load(weights_only=True): tensors, never code) or `.safetensors`; nested (`state_dict`, `model`)
or prefixed (`module.`, `backbone.`, ...) state dicts are unwrapped. A file that does not fit is one line
naming the counts and the first missing and unexpected keys; the classifier (`fc.*`) is never used.

VPR practice: `stages=3` cuts the ResNet after its 3rd stage (stride 16, 256 / 1024 channels),
`freeze_stages=N` freezes the stem and the first N-1 stages (their BatchNorm statistics too). Inputs are
normalised with ImageNet's statistics, which pretrained weights expect. Any aggregation head of
models/aggregation.py (gem, netvlad, convap, mixvpr, boq, salad) pools the last map, as on cnn_snn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Encoder
from siamese_retrieval.errors import UserError, first_line, load_failure
from siamese_retrieval.models.cnn import RGB_MEAN, RGB_STD, PooledEncoder
from siamese_retrieval.registry import ENCODERS

STAGE_PLANES = (64, 128, 256, 512)
# name -> (block, blocks per stage)
ARCHITECTURES: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
PREFIXES = ("module.", "model.", "backbone.", "encoder.", "body.", "features.", "net.")
NESTED = ("state_dict", "model", "module", "net", "backbone")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(cin, planes, stride, self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride, self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(cin: int, planes: int, stride: int, expansion: int) -> nn.Module | None:
    if stride == 1 and cin == planes * expansion:
        return None
    return nn.Sequential(nn.Conv2d(cin, planes * expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * expansion))


class ResNet(nn.Module):
    """The stem and the first `stages` residual stages of a ResNet (torchvision's names); `classifier` adds the
    average pool and `fc` (only to know every key a full state dict may hold)."""

    def __init__(self, name: str, stages: int = 4, classifier: bool = False) -> None:
        super().__init__()
        kind, counts = ARCHITECTURES[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        self.stages = int(stages)
        for i in range(self.stages):
            layers = []
            for b in range(counts[i]):
                layers.append(block(cin, STAGE_PLANES[i], stride=2 if b == 0 and i > 0 else 1))
                cin = STAGE_PLANES[i] * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = cin
        if classifier:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, 1000)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def parts(self) -> list[nn.Module]:
        """The stem, then each kept stage: what `freeze_stages` counts."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, *(getattr(self, f"layer{i + 1}") for i in range(self.stages))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


# ----------------------------------------------------------------------------------------- weights files


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (weights-only), unwrapped from a `state_dict` / `model` / ... nesting."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or hostile file is one line, never a traceback
        raise UserError(f"model.weights={path}: not a readable weights file ({load_failure(exc)})") from None
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in NESTED if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise UserError(f"model.weights={path}: holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"model.weights={path}: holds no tensors")
    return tensors


def strip_prefix(state: Mapping[str, torch.Tensor], known: set[str]) -> dict[str, torch.Tensor]:
    """`state` with the prefix (`module.`, `backbone.`, ... or a chain of them) that makes most keys `known`."""
    best, best_hits = dict(state), sum(k in known for k in state)
    frontier = [dict(state)]
    for _ in range(3):  # e.g. module.backbone.layer1...
        nxt = []
        for cand in frontier:
            for prefix in PREFIXES:
                if any(k.startswith(prefix) for k in cand):
                    stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in cand.items()}
                    hits = sum(k in known for k in stripped)
                    if hits > best_hits:
                        best, best_hits = stripped, hits
                    nxt.append(stripped)
        frontier = nxt
    return best


def load_backbone_weights(body: ResNet, name: str, path: str | os.PathLike) -> None:
    """Load a weights file into `body` (strict for what it keeps); one UserError line when the file does not fit."""
    full = ResNet(name, stages=4, classifier=True).state_dict()
    state = strip_prefix(read_weights(path), set(full))
    optional = ("num_batches_tracked",)  # older files lack BatchNorm's step counters
    keep = body.state_dict()
    unexpected = sorted(k for k in state if k not in full)
    missing = sorted(k for k in keep if k not in state and not k.endswith(optional))
    wrong = sorted(k for k in keep if k in state and tuple(state[k].shape) != tuple(keep[k].shape))
    if unexpected or missing or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise UserError(f"model.weights={path}: does not fit {name} ({len(keep)} tensors kept): {'; '.join(parts)}")
    body.load_state_dict({k: state[k] for k in keep if k in state}, strict=False)


# ----------------------------------------------------------------------------------------- timm backbones


class TimmTrunk(nn.Module):
    """A timm model as a trunk (`model.backbone=timm:<name>`): its feature maps up to the `stages`-th (timm's
    features_only), the last one returned. timm is an optional extra (`pip install -e ".[timm]"`). A weights
    file goes through timm's own loader (`pretrained_cfg_overlay=dict(file=...)`: timm's key remapping for its
    feature models), never a download: without a file the model is randomly initialised."""

    def __init__(self, name: str, stages: int, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise UserError(f"model.backbone=timm:{name} needs timm, an optional extra: pip install -e \".[timm]\" "
                            f"(timm needs a torchvision that imports beside your torch)") from None
        kwargs: dict[str, Any] = {"features_only": True, "out_indices": (stages - 1,), "pretrained": False}
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise UserError(f"model.weights={path}: no such file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        try:
            self.model = timm.create_model(name, **kwargs)
        except (RuntimeError, KeyError, ValueError) as exc:  # a file that does not fit, an unknown model
            raise UserError(f"model.backbone=timm:{name}" + (f" model.weights={weights}" if weights else "")
                            + f": {first_line(exc)}") from None
        self.name = name
        self.out_channels = int(self.model.feature_info.channels()[-1])

    def parts(self) -> list[nn.Module]:
        return list(self.model.children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[-1] if isinstance(out, (list, tuple)) else out


# ----------------------------------------------------------------------------------------- the encoder


@ENCODERS.register("backbone")
class BackboneEncoder(PooledEncoder):
    """ResNet trunk (cut after `stages`, the first `freeze_stages` parts frozen) -> aggregation head ->
    dropout -> projection -> L2 [-> PCA-whitening]; uint8 RGB images normalised with ImageNet's statistics."""

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str | None = None,
        stages: int = 3,
        freeze_stages: int = 0,
        embedding_dim: int = 256,
        aggregation: str | Mapping[str, Any] | None = None,
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        dropout: float = 0.0,
        normalize: bool = True,
        whiten_dim: int | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        timm_name = backbone[len("timm:"):] if backbone.startswith("timm:") else None
        if timm_name is None and backbone not in ARCHITECTURES:
            raise ValueError(f"backbone={backbone!r}: must be one of {', '.join(ARCHITECTURES)} or timm:<name>")
        check_fields(dict(stages=stages, freeze_stages=freeze_stages), Encoder, "encoder")
        self.backbone, self.freeze_stages = backbone, freeze_stages
        self.features: ResNet | TimmTrunk = (TimmTrunk(timm_name, stages, weights) if timm_name
                                             else ResNet(backbone, stages))
        if weights and not timm_name:
            load_backbone_weights(self.features, backbone, weights)
        self._init_head(self.features.out_channels, aggregation, embedding_dim, gem_p, gem_learnable, dropout,
                        normalize, whiten_dim)
        for part in self.features.parts()[:freeze_stages]:
            part.requires_grad_(False)
        self._init_input(RGB_MEAN, RGB_STD, channels_last)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [0, 255] -> (x/255 - ImageNet mean) / std, what pretrained ResNets expect."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"BackboneEncoder expects RGB images (B, 3, H, W), got {tuple(image.shape)}")
        return torch.addcmul(self.shift, image.float(), self.scale)

    def train(self, mode: bool = True) -> "BackboneEncoder":
        """Frozen parts stay in eval mode: their BatchNorm statistics are part of what is frozen."""
        super().train(mode)
        for part in self.features.parts()[: self.freeze_stages]:
            part.eval()
        return self
