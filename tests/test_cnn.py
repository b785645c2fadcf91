"""The plain-CNN encoder, GeM pooling, image inputs + augmentation, and the cnn_snn model config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siamese_retrieval.data.inputs import ImageInputs
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.cnn import GeM, PlainCNN
from siamese_retrieval.models.mining import BatchHardContrastive
from siamese_retrieval.models.siamese import SiameseModule

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(widths=(8, 16, 32), embedding_dim=16)


def images(b: int = 4, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------- encoder


def test_encoder_shape_and_unit_norm() -> None:
    torch.manual_seed(0)
    enc = PlainCNN(**SMALL)
    emb = enc({"image": images()})
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    raw = PlainCNN(**SMALL, normalize=False)({"image": images()})
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4), atol=1e-3)


def test_encoder_uint8_equals_float_input() -> None:
    torch.manual_seed(0)
    enc = PlainCNN(**SMALL).eval()
    x = images()
    with torch.no_grad():
        a, b = enc({"image": x}), enc({"image": x.float()})
    assert torch.allclose(a, b, atol=1e-6)


def test_encoder_normalises_inside() -> None:
    enc = PlainCNN(**SMALL)
    x = enc.prepare(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    # (1 - mean) / std per channel
    assert x[0, :, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], abs=1e-5)
    assert "scale" not in enc.state_dict()  # constants, not checkpoint state


@pytest.mark.parametrize("input_norm", ["fixed", "per_image"])
def test_channels_last_is_a_layout_not_a_model(input_norm: str) -> None:
    """NHWC and NCHW give the same embeddings and gradients from the same weights, and either loads the other's
    state dict (checkpoints of both layouts stay interchangeable)."""
    torch.manual_seed(0)
    nhwc = PlainCNN(**SMALL, input_norm=input_norm, channels_last=True)
    nchw = PlainCNN(**SMALL, input_norm=input_norm, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    conv = next(m for m in nhwc.features if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = images()  # NCHW uint8 in, as the datamodule hands it over
    a, b = nhwc({"image": x}), nchw({"image": x})
    assert torch.allclose(a, b, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(nhwc.pool.p.grad, nchw.pool.p.grad, atol=1e-4)
    PlainCNN(**SMALL, input_norm=input_norm, channels_last=True).load_state_dict(nchw.state_dict())  # strict


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_channels_last_and_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    enc = PlainCNN(**SMALL).to(memory_format=torch.channels_last)
    x = images().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        emb = enc({"image": x})
    emb.sum().backward()
    assert emb.shape == (4, 16) and torch.isfinite(emb).all()
    assert torch.allclose(emb.float().norm(dim=-1), torch.ones(4), atol=1e-2)
    assert enc.pool.p.grad is not None and torch.isfinite(enc.pool.p.grad).all()


def test_gem_p1_is_average_pooling() -> None:
    x = torch.rand(2, 5, 4, 6) + 0.01
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)
    assert GeM(p=40.0)(x).sub(x.amax(dim=(-2, -1))).abs().max() < 0.1  # large p approaches max pooling


def test_gem_p_is_learnable() -> None:
    gem = GeM(p=3.0)
    assert isinstance(gem.p, torch.nn.Parameter)
    gem(torch.rand(2, 5, 4, 6)).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    fixed = GeM(p=3.0, learnable=False)
    assert not any(True for _ in fixed.parameters())
    enc = PlainCNN(**SMALL)
    enc({"image": images()}).pow(2).sum(-1).mean().backward()
    assert any(p is enc.pool.p for p in enc.parameters())


# --------------------------------------------------------------------------- image inputs


def test_augment_keeps_shape_dtype_and_changes_pixels() -> None:
    inputs = ImageInputs(augment={})
    x = images(8, 48, 64)
    torch.manual_seed(0)
    out = inputs.augment({"image": x})["image"]
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out != x).float().mean() > 0.5
    torch.manual_seed(0)
    again = inputs.augment({"image": x})["image"]
    assert torch.equal(out, again)  # deterministic given torch's RNG
    assert not torch.equal(out, inputs.augment({"image": x})["image"])
    assert inputs.augment({"image": x.float()})["image"].dtype == torch.float32


def test_augment_off_and_zero_strength_are_identity() -> None:
    x = images(4, 24, 32)
    assert ImageInputs(augment=None).augment({"image": x})["image"] is x
    assert ImageInputs(augment={"enabled": False}).augment({"image": x})["image"] is x
    zero = {"photometric_p": 0.0, "grayscale_p": 0.0, "noise_p": 0.0, "geometric_p": 0.0}
    assert torch.equal(ImageInputs(augment=zero).augment({"image": x})["image"], x)
    # geometric with p = 1 but zero shift / zoom: identity resampling
    geo = dict(zero, geometric_p=1.0, translate=0.0, scale=0.0)
    assert torch.equal(ImageInputs(augment=geo).augment({"image": x})["image"], x)


def test_augment_geometric_is_not_a_flip() -> None:
    # a left-to-right ramp stays increasing left to right under shift + zoom (no mirror image)
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 1, 64).expand(6, 3, 48, 64).contiguous()
    geo = {"photometric_p": 0.0, "grayscale_p": 0.0, "noise_p": 0.0, "geometric_p": 1.0}
    torch.manual_seed(0)
    out = ImageInputs(augment=geo).augment({"image": ramp})["image"].float()
    assert not torch.equal(out, ramp.float())
    assert (out[..., 40:].mean(-1) > out[..., :24].mean(-1)).all()


def test_augment_config_is_validated() -> None:
    with pytest.raises(ValueError, match="hflip"):
        ImageInputs(augment={"hflip": 0.5})
    with pytest.raises(ConfigError, match=r"^model.inputs.augment.noise_p=2.0: must be a number in \[0, 1\]$"):
        ImageInputs(augment={"noise_p": 2.0})


def test_image_inputs_build(tmp_path: Path) -> None:
    from tests.helpers import make_dataset

    ds = make_dataset(tmp_path / "city", n_streets=2, per_street=3, queries_per_street=2, height=40, width=56)
    inputs = ImageInputs(height=24, width=32, workers=1)
    assert inputs.kind == "images"
    db, q = inputs.build(ds, tmp_path / "cache")
    assert db["image"].shape == (6, 3, 24, 32) and q["image"].shape == (4, 3, 24, 32)
    assert db["image"].dtype == torch.uint8 and q["image"].dtype == torch.uint8


# --------------------------------------------------------------------------- the model config


def model_cfg(**module_overrides):
    cfg = OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "cnn_snn.yaml")})
    for key, value in module_overrides.items():
        OmegaConf.update(cfg, f"model.module.{key}", value, merge=False)
    return cfg.model


def random_pair_batch(inputs: ImageInputs, b: int = 4) -> dict:
    g = torch.Generator().manual_seed(3)
    shape = (b, 3, inputs.height, inputs.width)
    fov = torch.tensor([1.0, 0.7, 0.2, 0.0])[:b]
    return {
        "q": {"image": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)},
        "d": {"image": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)},
        "target": (fov >= 0.5).float(),
        "fov": fov,
        "q_idx": torch.tensor([0, 0, 0, 1])[:b],
        "d_idx": torch.tensor([5, 6, 7, 8])[:b],
    }


def test_cnn_snn_config_trains_one_step() -> None:
    cfg = model_cfg()
    assert cfg.name == "cnn_snn" and cfg.pairs_preset == "light" and cfg.train_views.n_streets == 64
    inputs = instantiate(cfg.inputs)
    assert isinstance(inputs, ImageInputs) and inputs.enabled
    torch.manual_seed(0)
    module = instantiate(cfg.module, _recursive_=False)
    assert isinstance(module, SiameseModule) and isinstance(module.encoder, PlainCNN)
    assert module.hparams.model_name == "cnn_snn"
    batch = random_pair_batch(inputs)
    batch["q"], batch["d"] = inputs.augment(batch["q"]), inputs.augment(batch["d"])
    opt = instantiate(cfg.module.optimizer)(module.parameters())
    before = [p.detach().clone() for p in module.encoder.parameters()]
    out = module.pair_output(batch)
    assert out.emb_q.shape == (4, cfg.module.encoder.embedding_dim)
    assert ((out.distance >= 0) & (out.distance <= 2.0 + 1e-5)).all()  # unit vectors
    loss = module.compute_loss(out)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.encoder.parameters()))
    assert cfg.module.scheduler.T_max is None and cfg.module.scheduler.interval == "epoch"


def test_cnn_snn_with_mining_loss() -> None:
    cfg = model_cfg(loss={
        "_target_": "siamese_retrieval.models.mining.BatchHardContrastive",
        "base_loss": {"_target_": "siamese_retrieval.models.losses.GradedContrastiveLoss", "margin": 0.7},
        "k": 1,
    })
    torch.manual_seed(0)
    module = instantiate(cfg.module, _recursive_=False)
    assert isinstance(module.loss_fn, BatchHardContrastive)
    batch = random_pair_batch(instantiate(cfg.inputs))
    out = module.pair_output(batch)
    from dataclasses import replace

    out = replace(out, q_idx=batch["q_idx"], d_idx=batch["d_idx"])
    loss = module.compute_loss(out)
    loss.backward()
    assert loss.item() >= module.loss_fn.base_loss(out).item()
