"""model=keypoint_set: keypoint-set features + cache, the input builder, the order-invariant encoder, its config,
and train.py -> evaluate.py end to end on the tiny city."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siamese_retrieval.configs import check_config
from siamese_retrieval.data import keypoints as kp
from siamese_retrieval.data.inputs import KeypointSetInputs
from siamese_retrieval.data.keypoints import (
    SET_FEATURES,
    KeypointSetConfig,
    extract_dataset_keypoint_sets,
    extract_dataset_keypoints,
    extract_orb_set,
)
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.keypoint_set import (
    BitsLinear,
    KeypointSetEncoder,
    _MaskedGeMFunction,
    unpack_bits,
)
from siamese_retrieval.models.siamese import SiameseModule
from siamese_retrieval.registry import KEYPOINT_POOLINGS
from siamese_retrieval.trust import check_targets
from tests.conftest import ROOT, compose_config
from tests.helpers import make_dataset, textured_image

N = 48  # keypoints per image in the encoder tests
SMALL = dict(n_keypoints=N, d_model=32, n_heads=4, embedding_dim=16)
POOLINGS = KEYPOINT_POOLINGS.names()
POOLING_CFGS = [{"name": name, "queries": 3, "clusters": 4, "dim": 40} for name in POOLINGS]


def random_batch(b: int = 3, n: int = N, seed: int = 0, valid: tuple[int, ...] = (N, 30, 5)) -> dict[str, torch.Tensor]:
    """Valid keypoints first (as the cache stores them), zero padding after them."""
    g = torch.Generator().manual_seed(seed)
    desc = torch.randint(0, 256, (b, n, 32), generator=g, dtype=torch.uint8)
    feat = torch.rand(b, n, len(SET_FEATURES), generator=g)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(valid[:b]):
        mask[i, :k] = True
    return {"desc": desc * mask[..., None], "feat": feat * mask[..., None], "mask": mask}


def encoder(pooling, n_layers: int = 2, seed: int = 0) -> KeypointSetEncoder:
    torch.manual_seed(seed)
    enc = KeypointSetEncoder(**SMALL, n_layers=n_layers, pooling=pooling)
    if pooling["name"] == "netvlad":  # clusters from a batch, as the first training step does
        enc.train()
        enc(random_batch(seed=9))
    return enc.eval()


# --------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize("pooling", POOLING_CFGS, ids=POOLINGS)
@pytest.mark.parametrize("n_layers", [0, 2])
def test_permuting_keypoints_leaves_the_embedding_unchanged(pooling, n_layers) -> None:
    enc = encoder(pooling, n_layers)
    batch = random_batch()
    perm = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    shuffled = {k: torch.stack([v[i, perm[i]] for i in range(3)]) for k, v in batch.items()}
    assert not torch.equal(shuffled["mask"], batch["mask"])  # padding is interleaved now, not only at the end
    with torch.no_grad():
        a, b = enc(batch), enc(shuffled)
    assert a.shape == (3, 16)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", POOLING_CFGS, ids=POOLINGS)
def test_padding_values_do_not_matter(pooling) -> None:
    enc = encoder(pooling)
    batch = random_batch(valid=(N, 30, 0))  # the last image has no keypoint at all
    g = torch.Generator().manual_seed(5)
    pad = ~batch["mask"]
    noisy = {
        "desc": torch.where(pad[..., None], torch.randint(0, 256, batch["desc"].shape, generator=g, dtype=torch.uint8),
                            batch["desc"]),
        "feat": torch.where(pad[..., None], torch.randn(batch["feat"].shape, generator=g) * 1e3, batch["feat"]),
        "mask": batch["mask"],
    }
    noisy["feat"][2, 0] = float("nan")  # even NaN in a padded row
    with torch.no_grad():
        a, b = enc(batch), enc(noisy)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("pooling", POOLING_CFGS, ids=POOLINGS)
def test_shapes_and_gradients(pooling) -> None:
    torch.manual_seed(0)
    enc = KeypointSetEncoder(**SMALL, n_layers=1, pooling=pooling).train()
    emb = enc(random_batch(valid=(N, 30, 0)))
    assert emb.shape == (3, 16) and torch.isfinite(emb).all()
    (emb[:, 0] - emb[:, 1]).pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.bits.linear.weight.grad.abs().sum() > 0 and enc.proj.weight.grad.abs().sum() > 0


def test_encoder_options_and_errors() -> None:
    batch = random_batch()
    raw = KeypointSetEncoder(**SMALL, n_layers=0, pooling="mean", normalize=False, pos_frequencies=0,
                             use_geometry=False)(batch)
    assert raw.shape == (3, 16) and not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    with pytest.raises(ValueError, match="expects 48 keypoints"):
        KeypointSetEncoder(**SMALL)(random_batch(n=20, valid=(20, 20, 20)))
    with pytest.raises(ConfigError, match="pooling.name"):
        KeypointSetEncoder(**SMALL, pooling="max")
    with pytest.raises(ConfigError, match="unknown key"):
        KeypointSetEncoder(**SMALL, pooling={"name": "gem", "p": 3})
    with pytest.raises(ConfigError, match=r"encoder.n_heads=5: must divide encoder.d_model \(32\)"):
        KeypointSetEncoder(**{**SMALL, "n_heads": 5})


@pytest.mark.parametrize("pooling", POOLING_CFGS, ids=POOLINGS)
@pytest.mark.parametrize("n_layers", [0, 1])
def test_inference_in_chunks_gives_the_same_embeddings(pooling, n_layers) -> None:
    enc = encoder(pooling, n_layers=n_layers)
    batch = random_batch(b=7, valid=(N, 30, 5, 0, 12, N, 1))
    enc.inference_chunk = None
    with torch.no_grad():
        whole = enc(batch)
    enc.inference_chunk = 3  # 7 sets: chunks of 3, 3, 1
    with torch.no_grad():
        chunked = enc(batch)
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_inference_chunks_only_without_autograd(monkeypatch) -> None:
    enc = KeypointSetEncoder(**SMALL, n_layers=0, pooling="gem", inference_chunk=2)
    sizes: list[int] = []
    real = enc._embed
    monkeypatch.setattr(enc, "_embed", lambda batch: sizes.append(len(batch["desc"])) or real(batch))
    batch = random_batch(b=5, valid=(N, 30, 5, 1, 9))
    enc(batch).sum().backward()  # training: one pass, every set in the graph
    with torch.no_grad():
        enc(batch)
    assert sizes == [5, 2, 2, 1]
    with pytest.raises(ConfigError, match="encoder.inference_chunk=0: must be an integer >= 1 or null"):
        KeypointSetEncoder(**SMALL, inference_chunk=0)


def test_netvlad_clusters_are_set_once_and_saved() -> None:
    torch.manual_seed(0)
    enc = KeypointSetEncoder(**SMALL, pooling={"name": "netvlad", "clusters": 4})
    enc.eval()(random_batch())
    assert not bool(enc.pool.initialised)  # never from evaluation batches
    enc.train()(random_batch())
    assert bool(enc.pool.initialised)
    centroids = enc.pool.centroids.detach().clone()
    enc(random_batch(seed=3))
    assert torch.equal(centroids, enc.pool.centroids.detach())
    fresh = KeypointSetEncoder(**SMALL, pooling={"name": "netvlad", "clusters": 4})
    fresh.load_state_dict(enc.state_dict())
    assert bool(fresh.pool.initialised)


def test_unpack_bits_is_msb_first_plus_minus_one() -> None:
    bits = unpack_bits(torch.tensor([[0b10000001] + [0] * 31], dtype=torch.uint8))
    assert bits.shape == (1, 256)
    assert bits[0, 0] == 1 and bits[0, 7] == 1 and (bits[0, 1:7] == -1).all() and (bits[0, 8:] == -1).all()


def test_bits_linear_equals_linear_over_unpacked_bits() -> None:
    torch.manual_seed(0)
    layer = BitsLinear(24)
    desc = torch.randint(0, 256, (3, 7, 32), dtype=torch.uint8)
    torch.testing.assert_close(layer(desc), layer.linear(unpack_bits(desc)), atol=1e-5, rtol=1e-5)


def test_gem_pooling_width() -> None:
    enc = KeypointSetEncoder(**SMALL, n_layers=0, pooling={"name": "gem", "dim": 100})
    assert enc.pool.out_dim == 100 and enc.proj.in_features == 100
    assert enc(random_batch()).shape == (3, 16)
    with pytest.raises(ConfigError, match="pooling.dim=0: must be an integer >= 1 or null"):
        KeypointSetEncoder(**SMALL, pooling={"name": "gem", "dim": 0})


def plain_masked_gem(z: torch.Tensor, mask: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula _MaskedGeMFunction computes, written with autograd's ops (what MaskedGeM ran before)."""
    f = torch.relu(z).clamp(min=eps).pow(p)
    m = mask.unsqueeze(-1).to(z.dtype)
    return ((f * m).sum(1) / m.sum(1).clamp(min=1.0)).clamp(min=eps).pow(1.0 / p)


@pytest.mark.parametrize("p_value", [1.0, 2.7, 6.0])
def test_fused_gem_matches_the_plain_formula_and_its_gradients(p_value: float) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 9, 6, dtype=torch.float64, generator=g)
    z[0, 0, :3] = 0.0  # exactly at and below the floor: clamp's zero gradient
    z.requires_grad_(True)
    mask = torch.rand(4, 9, generator=g) > 0.3
    mask[0, :2] = True
    mask[3] = False  # an image without keypoints: constant output, zero gradient
    p = torch.tensor(p_value, dtype=torch.float64, requires_grad=True)
    m = mask.to(z.dtype)
    weights = m / m.sum(1, keepdim=True).clamp(min=1.0)
    fused = _MaskedGeMFunction.apply(z, weights, p, 1e-6)
    plain = plain_masked_gem(z, mask, p, 1e-6)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-15)
    grad_out = torch.randn(fused.shape, dtype=fused.dtype, generator=g)
    for a, b in zip(torch.autograd.grad(fused, (z, p), grad_out), torch.autograd.grad(plain, (z, p), grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z_, p_: _MaskedGeMFunction.apply(z_, weights, p_, 1e-6), (z, p))


def test_gem_pooling_learns_its_exponent() -> None:
    enc = KeypointSetEncoder(**SMALL, n_layers=0, pooling={"name": "gem", "dim": 40})
    enc(random_batch()).sum().backward()
    assert enc.pool.p.grad is not None and enc.pool.p.grad.abs() > 0
    assert enc.pool.proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- extraction + cache


def test_extract_orb_set_textured_image() -> None:
    img = textured_image(np.random.default_rng(1), 192, 256)
    cfg = KeypointSetConfig(n_keypoints=256, n_features=500)
    desc, feat, mask = extract_orb_set(img, cfg)
    assert desc.shape == (256, 32) and feat.shape == (256, 7) and mask.shape == (256,)
    k = int(mask.sum())
    assert k > 50 and mask[:k].all() and not mask[k:].any()  # valid rows first, then padding
    assert not desc[k:].any() and not feat[k:].any()
    resp = feat[:k, SET_FEATURES.index("response")]
    assert resp[0] == 1.0 and np.all(np.diff(resp) <= 1e-7) and (resp > 0).all()  # strongest first
    assert ((feat[:k, :2] >= 0) & (feat[:k, :2] <= 1)).all()
    np.testing.assert_allclose(feat[:k, 2] ** 2 + feat[:k, 3] ** 2, 1.0, atol=1e-5)
    assert (feat[:k, 4] < 0).all() and ((feat[:k, 6] >= 0) & (feat[:k, 6] <= 1)).all()
    again = extract_orb_set(img, cfg)
    for a, b in zip((desc, feat, mask), again):
        np.testing.assert_array_equal(a, b)
    # image_scale: detection on an upscaled image, coordinates still normalised
    _, f2, m2 = extract_orb_set(img, KeypointSetConfig(n_keypoints=256, n_features=500, image_scale=1.5))
    assert m2.sum() > 0 and ((f2[m2, :2] >= 0) & (f2[m2, :2] <= 1)).all()


@pytest.mark.parametrize("shape", [(192, 256), (192, 256, 3), (10, 10), (0, 0)])
def test_blank_or_tiny_image_is_all_padding(shape) -> None:
    desc, feat, mask = extract_orb_set(np.full(shape, 128, np.uint8), KeypointSetConfig(n_keypoints=64, n_features=100))
    assert desc.shape == (64, 32) and not desc.any() and not feat.any() and not mask.any()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^model.inputs.n_features=100: must be >= model.inputs.n_keypoints \(256\)"):
        KeypointSetConfig(n_keypoints=256, n_features=100)
    with pytest.raises(ConfigError, match=r"^model.inputs.image_scale=0: must be a number > 0$"):
        KeypointSetConfig(image_scale=0)


def test_dataset_keypoint_sets_cache_round_trip(tmp_path: Path, monkeypatch, caplog) -> None:
    ds = make_dataset(tmp_path / "ds", n_streets=2, per_street=3, queries_per_street=2)
    blank = ds.root / ds.db_paths[0]
    cv2.imwrite(str(blank), np.full((144, 192, 3), 90, np.uint8))  # one image without keypoints
    cfg = KeypointSetConfig(n_keypoints=64, n_features=200)
    cache = tmp_path / "cache"
    first = extract_dataset_keypoint_sets(ds, cfg, cache, workers=2)
    assert first.n_keypoints == 64 and first.db_desc.shape == (6, 64, 32) and first.q_feat.shape == (4, 64, 7)
    assert not first.db_mask[0].any() and not first.db_desc[0].any()  # the blank image: all padding
    assert first.db_mask[1:].any(axis=1).all() and first.q_mask.any(axis=1).all()
    uncached = extract_dataset_keypoint_sets(ds, cfg, None, workers=1)
    for name, arr in first.arrays().items():
        np.testing.assert_array_equal(arr, getattr(uncached, name), err_msg=name)
    assert [p.name for p in cache.iterdir()] == [kp.keypoints_cache_file(ds, cfg, cache).name]

    monkeypatch.setattr(kp, "extract_orb_set", lambda *a, **k: pytest.fail("cache not used"))
    with caplog.at_level(logging.INFO, logger=kp.__name__):
        again = extract_dataset_keypoint_sets(ds, cfg, cache)
    assert "keypoint set cache hit" in caplog.text
    for name, arr in first.arrays().items():
        np.testing.assert_array_equal(arr, getattr(again, name), err_msg=name)
    monkeypatch.undo()
    extract_dataset_keypoint_sets(ds, KeypointSetConfig(n_keypoints=64, n_features=300), cache)  # another key
    extract_dataset_keypoints(ds, kp.OrbConfig(), cache)  # keypoint_snn's cache lives beside it, untouched
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and sum(n.startswith("keypoint-sets-") for n in names) == 2
    assert not any(n.startswith(".") for n in names)  # no temporaries left


# --------------------------------------------------------------------------- the input builder


def test_inputs_build_and_augment(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", n_streets=1, per_street=3, queries_per_street=2)
    inputs = KeypointSetInputs(n_keypoints=64, n_features=200, keypoint_dropout=0.5, xy_jitter=0.01)
    db, q = inputs.build(ds, tmp_path / "cache")
    assert set(db) == {"desc", "feat", "mask"} and db["desc"].shape == (3, 64, 32) and q["feat"].shape == (2, 64, 7)
    assert db["desc"].dtype == torch.uint8 and db["feat"].dtype == torch.float32 and db["mask"].dtype == torch.bool
    torch.manual_seed(0)
    aug = inputs.augment(db)
    assert (aug["mask"] <= db["mask"]).all() and aug["mask"].sum() < db["mask"].sum()  # only drops keypoints
    assert ((aug["feat"][..., :2] >= 0) & (aug["feat"][..., :2] <= 1)).all()
    assert not torch.equal(aug["feat"], db["feat"]) and torch.equal(aug["feat"][..., 2:], db["feat"][..., 2:])
    plain = KeypointSetInputs(n_keypoints=64, n_features=200)
    assert plain.augment(db) is db
    with pytest.raises(ValueError, match="unknown keypoint set parameter"):
        KeypointSetInputs(n_keypoint=64)
    with pytest.raises(ConfigError, match=r"^model.inputs.keypoint_dropout=1.0: must be a number in \[0, 1\)$"):
        KeypointSetInputs(keypoint_dropout=1.0)


# --------------------------------------------------------------------------- the model config


def model_cfg():
    return OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "keypoint_set.yaml")}).model


def test_config_targets_are_allowed_and_one_step_trains() -> None:
    cfg = model_cfg()
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_targets(plain, "conf/model/keypoint_set.yaml")
    assert cfg.name == "keypoint_set" and cfg.inputs.n_keypoints == 512 and cfg.inputs.n_features == 1000
    inputs = instantiate(cfg.inputs)
    assert isinstance(inputs, KeypointSetInputs) and inputs.cfg.n_keypoints == 512
    torch.manual_seed(0)
    module = instantiate(cfg.module, _recursive_=False)
    assert isinstance(module, SiameseModule) and isinstance(module.encoder, KeypointSetEncoder)
    b = 4
    fov = torch.tensor([1.0, 0.7, 0.2, 0.0])
    batch = {"q": inputs.augment(random_batch(b, 512, 1, (512, 100, 40, 0))),
             "d": inputs.augment(random_batch(b, 512, 2, (512, 256, 10, 3))),
             "target": (fov >= 0.5).float(), "fov": fov,
             "q_idx": torch.tensor([0, 0, 1, 2]), "d_idx": torch.tensor([5, 6, 7, 8]),
             "cross_fov": torch.where(torch.eye(b, dtype=torch.bool), fov.diag(), torch.zeros(b, b))}
    opt = instantiate(cfg.module.optimizer)(module.parameters())
    before = [p.detach().clone() for p in module.encoder.parameters()]
    out = module.pair_output(batch)
    assert out.emb_q.shape == (b, 128) and ((out.distance >= 0) & (out.distance <= 2 + 1e-5)).all()
    loss = module.compute_loss(out)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.encoder.parameters()))


@pytest.mark.parametrize("override, message", [
    ("model.module.encoder.pooling.name=max", "model.module.encoder.pooling.name='max': must be one of"),
    ("model.module.encoder.pooling=max", "model.module.encoder.pooling='max': must be one of"),
    ("model.inputs.n_features=100", "model.inputs.n_features=100: must be >= model.inputs.n_keypoints (512)"),
    ("model.module.encoder.n_heads=3", "model.module.encoder.n_heads=3: must divide"),
    ("model.module.encoder.n_layers=-1", "model.module.encoder.n_layers=-1: must be an integer in [0, 8]"),
    ("model.inputs.keypoint_dropout=1.0", "model.inputs.keypoint_dropout=1.0: must be a number in [0, 1)"),
    ("model.module.encoder.inference_chunk=0", "model.module.encoder.inference_chunk=0: must be an integer >= 1"),
])
def test_schema_rejects_bad_values(override, message, tmp_path: Path) -> None:
    cfg = compose_config("train", ["model=keypoint_set", override], tmp_path, tmp_path)
    with pytest.raises(ConfigError) as info:
        check_config(cfg, "train")
    assert str(info.value).startswith(message)


def test_default_config_passes_the_schema(tmp_path: Path) -> None:
    cfg = compose_config("train", ["model=keypoint_set"], tmp_path, tmp_path)
    assert check_config(cfg, "train") == []
    # cnn_snn's recipe: look-alike P x K place batches with the multi-similarity term next to mined GCL
    assert cfg.data.batches == "places" and cfg.data.places.lookalike == "embedding"
    assert cfg.model.module.loss.terms.ms._target_.endswith("MultiSimilarity")


# --------------------------------------------------------------------------- end to end

FAST = ["model=keypoint_set", "data=synth_tiny", "trainer=cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "model.train_views=null", "model.batch_size=16", "model.inputs.n_keypoints=64", "model.inputs.n_features=200",
        "model.module.encoder.d_model=32", "logger=none", "seed=1"]


def test_train_then_evaluate_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    from siamese_retrieval.evaluate import evaluate
    from siamese_retrieval.train import train

    result = train(compose_config("train", FAST, tmp_path / "train", cache_dir))
    assert result["status"] == "ok" and result["model"] == "keypoint_set"
    for name in ("test/recall@1", "test/mAP", "val/recall@1"):
        assert 0.0 <= result["metrics"][name] <= 1.0
    ckpt = Path(result["checkpoint"])
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["inputs"]["_target_"] == "siamese_retrieval.data.inputs.KeypointSetInputs"
    assert raw["hyper_parameters"]["inputs"]["n_keypoints"] == 64
    evaluated = evaluate(compose_config("eval", ["data=synth_tiny", "seed=1", f"ckpt_path={ckpt}"], tmp_path / "eval",
                                        cache_dir))
    assert evaluated["metrics"]["test/recall@1"] == pytest.approx(result["metrics"]["test/recall@1"], abs=1e-6)
    assert evaluated["metrics"]["test/mAP"] == pytest.approx(result["metrics"]["test/mAP"], abs=1e-6)
