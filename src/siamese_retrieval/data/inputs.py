"""Input builders: turn a dataset's images into the tensors an encoder consumes, once, cached.

The datamodule holds the result as tensors and makes batches by slicing; `augment` runs on the
batch after it reaches the device (train only), so augmentation uses the GPU when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np
import torch

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.model import Augment, Inputs
from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.images import load_images
from siamese_retrieval.data.keypoints import (
    KeypointFeatures,
    KeypointSetConfig,
    KeypointSetFeatures,
    OrbConfig,
    extract_dataset_keypoint_sets,
    extract_dataset_keypoints,
)
from siamese_retrieval.registry import INPUTS

Tensors = dict[str, torch.Tensor]


class InputBuilder(Protocol):
    kind: str

    def build(self, dataset: RetrievalDataset, cache_dir: Path | None) -> tuple[Tensors, Tensors]:
        """(database tensors, query tensors), each a dict of equally long tensors."""

    def augment(self, batch: Tensors) -> Tensors:
        """Train-time augmentation of one side of a pair batch (identity where none applies)."""


def _as_tensors(kp: KeypointFeatures | KeypointSetFeatures) -> tuple[Tensors, Tensors]:
    """(database, query) dicts of tensors that share the (memory-mapped, copy-on-write) cache arrays: no copy."""
    db, q = ({name: torch.from_numpy(a) for name, a in kp.side(side).items()} for side in ("db", "q"))
    return db, q


@INPUTS.register("keypoints")
class KeypointInputs:
    """The study's inputs: the N strongest ORB keypoints per image, padded + masked."""

    kind = "keypoints"

    def __init__(self, workers: int = 2, **orb: object) -> None:
        known = {f.name for f in fields(OrbConfig)}
        unknown = set(orb) - known
        if unknown:
            raise ValueError(f"unknown ORB parameter(s) {sorted(unknown)}; available: {sorted(known)}")
        self.cfg = OrbConfig(**orb)  # type: ignore[arg-type]
        self.workers = workers

    def build(self, dataset: RetrievalDataset, cache_dir: Path | None) -> tuple[Tensors, Tensors]:
        return _as_tensors(extract_dataset_keypoints(dataset, self.cfg, cache_dir, workers=self.workers))

    def augment(self, batch: Tensors) -> Tensors:
        return batch


@INPUTS.register("keypoint_sets")
class KeypointSetInputs:
    """A SET of ORB keypoints per image for model=keypoint_set: the `n_keypoints` strongest of `n_features`
    detected (data/keypoints.py KeypointSetConfig), each with its packed descriptor (`desc`, uint8 (N, 32)),
    its geometry (`feat`, float32 (N, 7): keypoints.SET_FEATURES) and `mask` (False on padding).

    `augment` (train only) drops each keypoint with probability `keypoint_dropout` (its mask goes False) and
    jitters the normalised (x, y) by N(0, xy_jitter): the model then cannot lean on any single keypoint.
    """

    kind = "keypoint_set"

    def __init__(self, workers: int = 2, keypoint_dropout: float = 0.0, xy_jitter: float = 0.0,
                 **orb: object) -> None:
        known = {f.name for f in fields(KeypointSetConfig)}
        unknown = set(orb) - known
        if unknown:
            raise ValueError(f"unknown keypoint set parameter(s) {sorted(unknown)}; available: "
                             f"{sorted(known | {'workers', 'keypoint_dropout', 'xy_jitter'})}")
        self.cfg = KeypointSetConfig(**orb)  # type: ignore[arg-type]
        check_fields(dict(keypoint_dropout=keypoint_dropout, xy_jitter=xy_jitter), Inputs, "model.inputs")
        self.workers = int(workers)
        self.keypoint_dropout, self.xy_jitter = float(keypoint_dropout), float(xy_jitter)

    def build(self, dataset: RetrievalDataset, cache_dir: Path | None) -> tuple[Tensors, Tensors]:
        return _as_tensors(extract_dataset_keypoint_sets(dataset, self.cfg, cache_dir, workers=self.workers))

    def augment(self, batch: Tensors) -> Tensors:
        if "mask" not in batch or batch["mask"].numel() == 0 or (self.keypoint_dropout <= 0 and self.xy_jitter <= 0):
            return batch
        out = dict(batch)
        mask = batch["mask"]
        if self.keypoint_dropout > 0:
            keep = torch.rand(mask.shape, device=mask.device) >= self.keypoint_dropout
            out["mask"] = mask & keep
        if self.xy_jitter > 0:
            feat = batch["feat"].clone()
            noise = torch.randn(feat.shape[:-1] + (2,), device=feat.device, dtype=feat.dtype) * self.xy_jitter
            feat[..., :2] = (feat[..., :2] + noise).clamp(0.0, 1.0)
            out["feat"] = feat
        return out


class NoInputs:
    """No tensors at all: for pipelines that read the images themselves (the ORB + RANSAC baseline)."""

    kind = "none"

    def build(self, dataset: RetrievalDataset, cache_dir: Path | None) -> tuple[Tensors, Tensors]:
        return {}, {}

    def augment(self, batch: Tensors) -> Tensors:
        return batch


def take(tensors: Tensors, idx: torch.Tensor | np.ndarray) -> Tensors:
    """Slice every tensor of a dict with the same indices."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[idx_t] for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageAugment:
    """Train-time augmentation strengths; every jitter is drawn per image. 0 (or p = 0) disables one.

    Photometric (on [0, 1] pixels): brightness x*b, contrast around the image mean, saturation around
    the pixel's luminance, colour cast (a gain per channel), gamma x**g with g = exp(U(-gamma, gamma)),
    grayscale, additive gaussian noise. Geometric: a zoom (s in [1 - scale, 1 + scale] of the frame)
    and shift (up to `translate` of the width / height) resampled with reflected borders. Never a
    horizontal flip: a mirrored street is another place.
    """

    brightness: float = 0.3  # multiply by U(1 - b, 1 + b)
    contrast: float = 0.3  # scale deviations from the image mean by U(1 - c, 1 + c)
    saturation: float = 0.3  # scale deviations from the luminance by U(1 - s, 1 + s)
    color_cast: float = 0.05  # per-channel gain U(1 - cc, 1 + cc)
    gamma: float = 0.2  # x ** exp(U(-gamma, gamma))
    photometric_p: float = 0.8  # probability of each of the five jitters above, per image
    grayscale_p: float = 0.05
    noise_std: float = 0.02  # sigma ~ U(0, noise_std), in [0, 1] pixel units
    noise_p: float = 0.3
    translate: float = 0.05  # fraction of width / height
    scale: float = 0.1
    geometric_p: float = 0.5

    def __post_init__(self) -> None:
        check_fields(self, Augment, "model.inputs.augment")


_LUMA = (0.299, 0.587, 0.114)


@INPUTS.register("images")
class ImageInputs:
    """Decoded RGB images resized to (height, width), held as uint8 (n, 3, H, W) tensors.

    The encoder (models/cnn.py) converts and normalises on the device. `augment` takes uint8 and gives
    back uint8 of the same shape, drawing everything from torch's RNG on the batch's device
    (deterministic under `seed_everything`); the datamodule calls it on training batches only.
    `augment=None` or `{enabled: false}` turns augmentation off.
    """

    kind = "images"

    def __init__(
        self,
        height: int = 96,
        width: int = 128,
        workers: int = 2,
        augment: Mapping[str, object] | None = None,
    ) -> None:
        check_fields(dict(height=height, width=width, workers=workers), Inputs, "model.inputs")
        self.height, self.width, self.workers = int(height), int(width), int(workers)
        aug = dict(augment) if augment is not None else {"enabled": False}
        self.enabled = bool(aug.pop("enabled", True))
        known = {f.name for f in fields(ImageAugment)}
        unknown = set(aug) - known
        if unknown:
            raise ValueError(f"unknown augment parameter(s) {sorted(unknown)}; available: enabled, {sorted(known)}")
        self.aug = ImageAugment(**aug)  # type: ignore[arg-type]

    def build(self, dataset: RetrievalDataset, cache_dir: Path | None) -> tuple[Tensors, Tensors]:
        db, q = load_images(dataset, size=(self.height, self.width), cache_dir=cache_dir, workers=self.workers)
        # Cached arrays are writable copy-on-write memmaps, always C-contiguous: from_numpy shares their
        # pages (no copy into RAM, no non-writable warning); batches are gathered from them lazily.
        return {"image": torch.from_numpy(db)}, {"image": torch.from_numpy(q)}

    def augment(self, batch: Tensors) -> Tensors:
        if not self.enabled or "image" not in batch or batch["image"].shape[0] == 0:
            return batch
        img = batch["image"]
        x = img.float() / 255.0  # uint8, or float on the same [0, 255] scale
        x = self._geometric(x)
        x = self._photometric(x)
        out = x.clamp(0.0, 1.0) * 255.0
        out = out.round_().to(torch.uint8) if img.dtype == torch.uint8 else out.to(img.dtype)
        return {**batch, "image": out}

    # -- pieces (x: float (B, C, H, W) in [0, 1]) ------------------------------------------------
    @staticmethod
    def _uniform(x: torch.Tensor, lo: float, hi: float, channels: int = 1) -> torch.Tensor:
        return torch.rand(x.shape[0], channels, 1, 1, device=x.device) * (hi - lo) + lo

    @staticmethod
    def _coin(x: torch.Tensor, p: float) -> torch.Tensor:
        return (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p).float()

    def _jitter(self, x: torch.Tensor, strength: float, channels: int = 1) -> torch.Tensor:
        """Per-image factor: U(1 - s, 1 + s) with probability photometric_p, else exactly 1."""
        on = self._coin(x, self.aug.photometric_p)
        return 1.0 + on * (self._uniform(x, -strength, strength, channels))

    def _geometric(self, x: torch.Tensor) -> torch.Tensor:
        a = self.aug
        if a.geometric_p <= 0 or (a.translate <= 0 and a.scale <= 0):
            return x
        b = x.shape[0]
        on = self._coin(x, a.geometric_p).view(b)
        s = 1.0 + on * self._uniform(x, -a.scale, a.scale).view(b)  # < 1 zooms in, > 1 out
        t = on[:, None] * self._uniform(x, -2 * a.translate, 2 * a.translate, 2).view(b, 2)  # [-1, 1] spans 2
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        theta[:, :, 2] = t
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        warped = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        keep = on.view(b, 1, 1, 1)
        return keep * warped + (1.0 - keep) * x  # untouched images stay bit-exact

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        a = self.aug
        rgb = x.shape[1] == 3

        def gray(v: torch.Tensor) -> torch.Tensor:
            # Python-float weights: a host tensor copied to a GPU every step would wait for the GPU's queue
            return (_LUMA[0] * v[:, 0:1] + _LUMA[1] * v[:, 1:2] + _LUMA[2] * v[:, 2:3]) if rgb else v.mean(1, keepdim=True)

        if a.brightness > 0:
            x = x * self._jitter(x, a.brightness)
        if a.contrast > 0:
            mean = gray(x).mean(dim=(-2, -1), keepdim=True)
            x = (x - mean) * self._jitter(x, a.contrast) + mean
        if a.saturation > 0:
            g = gray(x)
            x = (x - g) * self._jitter(x, a.saturation) + g
        if a.color_cast > 0:
            x = x * self._jitter(x, a.color_cast, channels=x.shape[1])
        if a.gamma > 0:
            on = self._coin(x, a.photometric_p)
            g = torch.exp(on * self._uniform(x, -a.gamma, a.gamma))
            x = x.clamp(0.0, 1.0).pow(g)
        if a.grayscale_p > 0:
            on = self._coin(x, a.grayscale_p)
            x = on * gray(x).expand_as(x) + (1.0 - on) * x
        if a.noise_std > 0 and a.noise_p > 0:
            sigma = self._coin(x, a.noise_p) * self._uniform(x, 0.0, a.noise_std)
            x = x + torch.randn_like(x) * sigma
        return x
