"""PlainCNN aggregation heads (gem | netvlad | convap), PCA-whitening, and the AggregationFitting callback."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from siamese_retrieval.checkpoints import load_checkpoint
from siamese_retrieval.configs import check_config
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.aggregation import NetVLAD, PCAWhitening
from siamese_retrieval.registry import AGGREGATIONS
from siamese_retrieval.models.aggregation_fitting import AggregationFitting
from siamese_retrieval.models.cnn import PlainCNN
from siamese_retrieval.models.keypoint_mlp import KeypointMLP
from tests.conftest import compose_config
from tests.helpers import make_dataset

SMALL = dict(widths=(8, 16, 32), embedding_dim=16)
HEADS = {
    "gem": {"name": "gem"},
    "netvlad": {"name": "netvlad", "clusters": 4},
    "convap": {"name": "convap", "channels": 8, "pool": [2, 2]},
}
# Today's (GeM-only) PlainCNN() keys: checkpoints made before the heads existed must keep loading.
GEM_KEYS = [
    *(k for i in (0, 4, 8, 12) for k in (
        f"features.{i}.weight", f"features.{i + 1}.weight", f"features.{i + 1}.bias",
        f"features.{i + 1}.running_mean", f"features.{i + 1}.running_var", f"features.{i + 1}.num_batches_tracked")),
    "pool.p", "proj.weight", "proj.bias",
]


def images(b: int = 4, h: int = 32, w: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)}


def encoder(head: str, whiten_dim: int | None = None, **agg: object) -> PlainCNN:
    """A small encoder; with whiten_dim, its whitening fitted on 24 random images (and clusters by k-means)."""
    torch.manual_seed(0)
    enc = PlainCNN(**SMALL, aggregation={**HEADS[head], **agg}, whiten_dim=whiten_dim)
    if isinstance(enc.pool, NetVLAD):
        with torch.no_grad():
            feats = enc.eval().local_features(images(24, seed=1))
        enc.pool.initialise_from_features(feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]))
    if enc.whiten is not None:
        with torch.no_grad():
            enc.whiten.fit(enc.eval().embed_unwhitened(images(24, seed=2)))
    return enc.train()


# --------------------------------------------------------------------------- every head, with and without whitening
CASES = [(h, w) for h in HEADS for w in (None, 4)]


@pytest.mark.parametrize(("head", "whiten_dim"), CASES, ids=[f"{h}-whiten{w}" for h, w in CASES])
def test_shape_unit_norm_gradients_and_deterministic_eval(head: str, whiten_dim: int | None) -> None:
    enc = encoder(head, whiten_dim)
    emb = enc(images())
    dim = whiten_dim or 16
    assert emb.shape == (4, dim) and enc.embedding_dim == dim and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    if whiten_dim:
        assert all(b.grad is None and not b.requires_grad for b in enc.whiten.buffers())
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(images()), enc(images()))


@pytest.mark.parametrize(("head", "dim"), [("gem", 32), ("netvlad", 4 * 32), ("convap", 8 * 2 * 2)])
def test_without_projection_the_head_sets_the_size(head: str, dim: int) -> None:
    enc = encoder(head, project=False)
    emb = enc(images())
    assert emb.shape == (4, dim) and enc.embedding_dim == dim
    assert not any(k.startswith("proj.") for k in enc.state_dict())
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_gem_default_keeps_todays_checkpoint_keys() -> None:
    assert list(PlainCNN().state_dict()) == GEM_KEYS
    assert list(PlainCNN(aggregation={"name": "gem"}, whiten_dim=None).state_dict()) == GEM_KEYS


def test_head_by_bare_name_and_bad_names() -> None:
    assert isinstance(PlainCNN(**SMALL, aggregation="netvlad").pool, NetVLAD)
    with pytest.raises(ConfigError) as info:
        PlainCNN(**SMALL, aggregation={"name": "netvlda"})
    assert str(info.value) == ("aggregation.name='netvlda': must be one of netvlad, convap, gem, mixvpr, boq, salad "
                               "(did you mean netvlad?); a component registered by your own module loads with "
                               "imports=[your_module]")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['k'\]"):
        PlainCNN(**SMALL, aggregation={"name": "netvlad", "k": 3})
    with pytest.raises(ValueError, match=r"whiten_dim=32: must be in \[1, 16\]"):
        PlainCNN(**SMALL, whiten_dim=32)
    assert set(AGGREGATIONS.names()) == {"gem", "netvlad", "convap", "mixvpr", "boq", "salad"}  # registered where each head is defined


# --------------------------------------------------------------------------- NetVLAD k-means init
def test_netvlad_kmeans_recovers_centers_and_assigns_them() -> None:
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.eye(4, 8) + 0.1 * torch.rand(4, 8, generator=g), dim=1)  # well separated
    feats = (centers.repeat_interleave(200, 0) + 0.03 * torch.randn(800, 8, generator=g))
    head = NetVLAD(8, clusters=4)
    random_init = head.centroids.detach().clone()
    assert not head.is_initialised
    assert head.initialise_from_features(feats, seed=0)
    dist = torch.cdist(centers, head.centroids.detach())  # (true, found)
    match = dist.argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2, 3], "not a permutation"
    assert dist.min(1).values.max() < 0.05
    soft = head.assign(centers[:, :, None, None]).flatten(1).softmax(1)  # (4 true centers, 4 clusters)
    assert (soft[torch.arange(4), match] > 0.9).all(), soft
    # state_dict round trip: the flag survives, a second initialisation is a no-op
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    loaded = NetVLAD(8, clusters=4)
    loaded.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert loaded.is_initialised and "initialised" in head.state_dict()
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    assert not loaded.initialise_from_features(torch.randn(100, 8))
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())
    assert not torch.allclose(loaded.centroids, random_init)


def test_plain_cnn_netvlad_flag_survives_a_checkpoint() -> None:
    enc = encoder("netvlad")
    assert not enc.needs_cluster_init
    fresh = PlainCNN(**SMALL, aggregation=HEADS["netvlad"])
    assert fresh.needs_cluster_init
    fresh.load_state_dict(enc.state_dict())
    assert not fresh.needs_cluster_init


# --------------------------------------------------------------------------- PCA-whitening
def test_whitening_identity_before_fit_then_whitened_covariance() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(0, -2, 16)[:, None]  # strongly anisotropic
    x = torch.randn(4000, 16, generator=g) @ mix + 3.0
    raw = PCAWhitening(16, 8, normalize=False)
    assert torch.equal(raw(x[:5]), x[:5]) and not raw.is_fitted
    raw.fit(x)
    y = raw(x)
    assert y.shape == (4000, 8) and raw.is_fitted
    cov = torch.cov(y.T)
    assert torch.allclose(cov, torch.eye(8), atol=0.05), cov
    assert y.mean(0).abs().max() < 1e-4
    unit = PCAWhitening(16, 8)
    unit.load_state_dict(raw.state_dict())
    assert unit.is_fitted and torch.allclose(unit(x[:5]).norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(unit(x[:5]), F.normalize(y[:5], dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="needs more than 8 embeddings"):
        PCAWhitening(16, 8).fit(x[:8])


# --------------------------------------------------------------------------- the callback
def test_callback_is_a_no_op_without_fitted_parts() -> None:
    cb = AggregationFitting()
    trainer = SimpleNamespace(datamodule=None, current_epoch=1, world_size=1)  # any sampling would fail
    for enc in (KeypointMLP(n_keypoints=2, hidden=(4,), embedding_dim=3), PlainCNN(**SMALL)):
        module = SimpleNamespace(encoder=enc, device=torch.device("cpu"))
        cb.on_fit_start(trainer, module)
        cb.on_train_epoch_start(trainer, module)


def test_backbone_encoder_gets_its_netvlad_clusters_and_whitening(monkeypatch: pytest.MonkeyPatch) -> None:
    """backbone_snn's encoder has PlainCNN's head (PooledEncoder): the callback fits its NetVLAD and whitening too,
    where it used to leave random centroids and an identity whitening."""
    from siamese_retrieval.models import aggregation_fitting
    from siamese_retrieval.models.backbone import BackboneEncoder

    images = {"image": torch.randint(0, 256, (24, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8)}
    monkeypatch.setattr(aggregation_fitting, "training_images", lambda dm, n, seed: images)
    enc = BackboneEncoder(stages=1, embedding_dim=16, aggregation={"name": "netvlad", "clusters": 4}, whiten_dim=8,
                          channels_last=False)
    assert enc.needs_cluster_init and not enc.whiten.is_fitted
    AggregationFitting().on_fit_start(SimpleNamespace(datamodule=None, current_epoch=0, world_size=1),
                                      SimpleNamespace(encoder=enc, device=torch.device("cpu")))
    assert not enc.needs_cluster_init and enc.whiten.is_fitted and enc.embedding_dim == 8


def test_train_initialises_netvlad_and_fits_whitening(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train.py with the default callbacks: k-means once at fit start, whitening at epochs 0 and 1 (a 64-image
    dataset from tests/helpers.py: seconds, where the tiny synthetic city takes ~20 s to render)."""
    from siamese_retrieval.train import train

    make_dataset(tmp_path / "data", n_streets=4, per_street=8, height=48, width=64)
    enc = "model.module.encoder"
    cfg = compose_config("train", [
        "model=cnn_snn", "data=msls_city", f"data.root={tmp_path / 'data'}", "data.split.fractions=[0.5,0.25,0.25]",
        "trainer=cpu", "trainer.max_epochs=2", "+trainer.limit_train_batches=2",
        "model.inputs.height=32", "model.inputs.width=48", "model.inputs.augment=null", f"{enc}.widths=[8,16,32]",
        f"{enc}.embedding_dim=16", f"{enc}.aggregation.name=netvlad", f"{enc}.aggregation.clusters=4",
        f"{enc}.whiten_dim=8", "logger=none", "test=false", "seed=0",
    ], tmp_path / "run", tmp_path / "cache")
    assert check_config(cfg, "train") == []
    with caplog.at_level(logging.INFO, logger="siamese_retrieval.models.aggregation_fitting"):
        result = train(cfg)
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert bool(state["encoder.pool.initialised"]) and bool(state["encoder.whiten.fitted"])
    torch.manual_seed(0)  # PlainCNN's placeholder centroids are torch.rand: k-means must have replaced them
    assert not torch.allclose(state["encoder.pool.centroids"], torch.rand(4, 32), atol=0.05)
    assert state["encoder.pool.centroids"].shape == (4, 32) and state["encoder.whiten.proj"].shape == (8, 16)
    fits = [r.getMessage() for r in caplog.records if "PCA-whitening" in r.getMessage()]
    assert any("(epoch 0)" in m for m in fits) and any("(epoch 1)" in m for m in fits), fits
    assert sum("NetVLAD: 4 clusters" in r.getMessage() for r in caplog.records) == 1
    assert 0.0 <= result["metrics"]["val/recall@1"] <= 1.0
    loaded = load_checkpoint(result["checkpoint"]).module.encoder  # as evaluate.py / retrieve.py rebuild it
    assert not loaded.needs_cluster_init and loaded.embedding_dim == 8
    assert loaded({"image": torch.zeros(2, 3, 32, 48, dtype=torch.uint8)}).shape == (2, 8)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.module.encoder.aggregation.name=convap", "model.module.encoder.whiten_dim=64"], None),
    (["model.module.encoder.aggregation=netvlad"], None),
    (["model.module.encoder.aggregation.name=vlad"],
     "model.module.encoder.aggregation.name='vlad': must be one of netvlad, convap, gem, mixvpr, boq, salad (did you "
     "mean netvlad?); a component registered by your own module loads with imports=[your_module]"),
    (["model.module.encoder.aggregation=vlad"],
     "model.module.encoder.aggregation='vlad': must be one of netvlad, convap, gem, mixvpr, boq, salad (did you "
     "mean netvlad?); a component registered by your own module loads with imports=[your_module]"),
    (["model.module.encoder.aggregation.clusters=0"],
     "model.module.encoder.aggregation.clusters=0: must be an integer >= 1"),
    (["model.module.encoder.aggregation.pool=[2]"],
     "model.module.encoder.aggregation.pool=[2]: must be a list of 2 integers >= 1"),
    (["model.module.encoder.whiten_dim=256"],
     "model.module.encoder.whiten_dim=256: must be <= model.module.encoder.embedding_dim (128), the size it whitens"),
    (["model.module.encoder.whiten_dim=0"], "model.module.encoder.whiten_dim=0: must be an integer >= 1 or null"),
])
def test_config_checks(overrides: list[str], expected: str | None, tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_config("train", ["model=cnn_snn", *overrides], tmp_path, cache_dir)
    if expected is None:
        check_config(cfg, "train")
    else:
        with pytest.raises(ConfigError) as err:
            check_config(cfg, "train")
        assert str(err.value) == expected
