"""P x K place batches (data/place_batches.py), multi-similarity loss (models/metric_losses.py), model=cnn_snn (on place batches) and cnn_snn_pairs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from siamese_retrieval.data.datamodule import RetrievalDataModule
from siamese_retrieval.data.ground_truth import SparseRelevance
from siamese_retrieval.data.place_batches import PlaceBatches, PlaceConfig, PlaceSampler
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.losses import PairOutput
from siamese_retrieval.models.metric_losses import MultiSimilarity
from tests.conftest import compose_config

P, K = 4, 3


class IdInputs:
    """Inputs that name their image: query i is i, database image j is 100000 + j (no decoding)."""

    kind = "ids"

    def build(self, dataset, cache_dir):
        return {"id": torch.arange(dataset.n_db) + 100000}, {"id": torch.arange(dataset.n_query)}

    def augment(self, batch):
        return batch


@pytest.fixture(scope="module")
def dm(cache_dir: Path) -> RetrievalDataModule:
    module = RetrievalDataModule(IdInputs(), synth={"preset": "tiny"}, split={"fractions": [0.5, 0.25, 0.25]},
                                 pairs={"preset": "light"}, cache_dir=str(cache_dir), seed=0, batches="places",
                                 places={"P": P, "K": K, "min_fov": 0.5})
    module.prepare_data()
    module.setup("fit")
    return module


def _epoch(dm: RetrievalDataModule, epoch: int, world: int = 1, rank: int = 0) -> list[dict]:
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=epoch)
    try:
        return list(PlaceBatches(dm, dm.place_sampler, SimpleNamespace(q_inputs=dm.q_inputs, db_inputs=dm.db_inputs)))
    finally:
        dm.trainer = None


def _anchors(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["idx"][b["is_query"]]]


def test_batches_are_p_places_of_2_to_k_views(dm: RetrievalDataModule) -> None:
    fov = np.asarray(dm.dataset.fov)
    batches = _epoch(dm, 0)
    assert batches and dm.place_sampler.n_skipped == 0 and dm.place_sampler.n_places == len(dm.splits.train_q)
    for b in batches:
        labels, q, idx = b["labels"].numpy(), b["is_query"].numpy(), b["idx"].numpy()
        p = int(q.sum())
        assert 2 <= p <= P and np.array_equal(labels[:p], np.arange(p)) and q[:p].all() and not q[p:].any()
        assert set(np.bincount(labels)) <= set(range(2, K + 1))  # every place: its anchor + 1..K-1 views
        # exactly the sampled images, in order: anchors are queries, views database images
        assert np.array_equal(b["images"]["id"].numpy(), np.where(q, idx, idx + 100000))
        for j in np.flatnonzero(~q):
            assert fov[idx[labels[j]], idx[j]] >= 0.5  # a view of its own anchor
        # the pair view: each anchor with its views (positives) and as many other places' views (fov 0)
        pq, pd = b["pair_q"].numpy(), b["pair_d"].numpy()
        same = labels[pq] == labels[pd]
        assert q[pq].all() and not q[pd].any() and same.sum() == (~same).sum() == len(q) - p
        assert np.array_equal(b["fov"].numpy(), fov[idx[pq], idx[pd]])
        assert (b["fov"].numpy()[~same] == 0).all() and (b["target"].numpy() == same).all()
        cross = b["cross_fov"].numpy()
        known = np.isfinite(cross)
        assert known.sum() == p * (len(q) - p)  # each (anchor, view) once
        assert np.array_equal(cross[known], fov[np.ix_(idx[pq], idx[pd])][known])


def test_no_val_test_image_or_overlapping_places_in_two_epochs(dm: RetrievalDataModule) -> None:
    sim, fov = np.asarray(dm.dataset.sim), np.asarray(dm.dataset.fov)
    s = dm.splits
    eval_q = np.concatenate([s.val_q, s.test_q])
    sampler = dm.place_sampler
    for epoch in range(2):
        batches = _epoch(dm, epoch)
        assert len(set(_anchors(batches))) == len(_anchors(batches)) >= 0.8 * sampler.n_places  # ~once each
        for b in batches:
            q, idx, labels = b["is_query"].numpy(), b["idx"].numpy(), b["labels"].numpy()
            assert set(idx[q]) <= set(s.train_q.tolist()) and not set(idx[q]) & set(eval_q.tolist())
            assert set(idx[~q]) <= set(s.train_db.tolist())
            assert not (fov[np.ix_(eval_q, idx[~q])] > 0).any() and not sim[np.ix_(eval_q, idx[~q])].any()
            places = np.searchsorted(sampler.anchors, idx[q])
            for a in range(len(places)):
                for c in range(len(places)):
                    if a != c:  # no known overlap across places, and the indirect rule holds
                        assert (fov[idx[a], idx[~q & (labels == c)]] == 0).all()
                        assert not sampler.overlap(places[a], places[c])


def test_overlap_rule_keeps_places_that_share_a_database_image_apart() -> None:
    # places 0, 1 share database image 10 (fov 0.2: no view of either), place 2 overlaps nothing
    truth = SparseRelevance.from_pairs(3, 20, [0, 0, 1, 1, 2], [1, 10, 2, 10, 3], fov=[0.9, 0.2, 0.9, 0.2, 0.9],
                                       sim=[True, False, True, False, True])
    sampler = PlaceSampler(truth, np.arange(3), np.arange(20), PlaceConfig(P=3, K=2))
    assert sampler.overlap(0, 1) and not sampler.overlap(0, 2) and not sampler.overlap(1, 2)
    for epoch in range(5):
        for batch in sampler.pack(epoch):
            assert not {0, 1} <= set(batch)
    with pytest.raises(ConfigError, match="1 place"):
        PlaceSampler(truth, [0], np.arange(20))


def test_same_seed_and_epoch_same_batches_other_epoch_other_batches(dm: RetrievalDataModule) -> None:
    def ids(batches):
        return [b["idx"].tolist() for b in batches]

    assert ids(_epoch(dm, 1)) == ids(_epoch(dm, 1))
    assert ids(_epoch(dm, 0)) != ids(_epoch(dm, 1))
    other = PlaceSampler(dm.dataset, dm.splits.train_q, dm.splits.train_db, dm.places_cfg, seed=1)
    assert other.pack(0) != dm.place_sampler.pack(0)


def test_ddp_ranks_get_disjoint_equal_shards(dm: RetrievalDataModule) -> None:
    full = set(_anchors(_epoch(dm, 0)))
    shards = [_epoch(dm, 0, world=2, rank=r) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == dm.place_sampler.n_batches // 2
    a, b = set(_anchors(shards[0])), set(_anchors(shards[1]))
    assert a and b and not a & b and a | b <= set(dm.place_sampler.anchors.tolist())
    assert len(a | b) >= 0.5 * len(full)


def test_multi_similarity_matches_a_hand_computation_and_trains() -> None:
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.4], [0.2, 1.0], [-0.3, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    alpha, beta, base = 2.0, 10.0, 0.5
    s = emb @ emb.T
    expected = []
    for i in range(4):
        pos = [j for j in range(4) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(4) if labels[j] != labels[i]]
        lp = torch.log1p(sum(torch.exp(-alpha * (s[i, j] - base)) for j in pos)) / alpha
        ln = torch.log1p(sum(torch.exp(beta * (s[i, j] - base)) for j in neg)) / beta
        expected.append(lp + ln)
    loss = MultiSimilarity(alpha=alpha, beta=beta, base=base, miner_epsilon=None)
    assert loss(emb, labels).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)

    x = emb.clone().requires_grad_(True)
    mined = MultiSimilarity(alpha=alpha, beta=beta, base=base, miner_epsilon=10.0)  # a wide margin keeps every pair
    value = mined(PairOutput(x, x, *(torch.zeros(4),) * 5, embeddings=x, labels=labels))
    assert value.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # a pair batch (validation): each pair by itself, a positive (fov >= 0.5) or a negative
    pair = PairOutput(emb[:2], emb[[1, 2]], *(torch.zeros(2),) * 4, torch.tensor([0.8, 0.0]))
    cos = torch.stack([s[0, 1], s[1, 2]])
    by_hand = (torch.log1p(torch.exp(-alpha * (cos[0] - base))) / alpha
               + torch.log1p(torch.exp(beta * (cos[1] - base))) / beta) / 2
    assert loss(pair).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_lookalike_batches_hold_places_nearer_in_embedding_than_random() -> None:
    n = 48  # 48 places with 3 own views each, no overlaps: any grouping is allowed
    truth = SparseRelevance.from_pairs(n, 3 * n, np.repeat(np.arange(n), 3), np.arange(3 * n), fov=np.full(3 * n, 0.8))
    sampler = PlaceSampler(truth, np.arange(n), np.arange(3 * n), PlaceConfig(P=4, K=3, lookalike="embedding"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16)) * 5  # 12 groups of 4 look-alike places
    emb = centres[rng.permutation(np.repeat(np.arange(12), 4))] + rng.normal(size=(n, 16)) * 0.3

    def spread(batches):
        return np.mean([np.linalg.norm(emb[a] - emb[b]) for bt in batches for a in bt for b in bt if a < b])

    near, rand = sampler.pack(0, emb), sampler.pack(0)
    assert sorted(p for b in near for p in b) == list(range(n))
    assert spread(near) < 0.5 * spread(rand)


def test_module_hands_anchor_embeddings_to_the_datamodule(dm: RetrievalDataModule) -> None:
    from siamese_retrieval.models.siamese import SiameseModule

    class IdEncoder(torch.nn.Module):
        def forward(self, inputs):
            return torch.stack([inputs["id"].float(), torch.ones(len(inputs["id"]))], 1)

    module = SiameseModule({"_target_": "siamese_retrieval.models.losses.MSEHeadLoss"},
                           {"_target_": "siamese_retrieval.models.losses.MSEHeadLoss"},
                           {"_target_": "torch.optim.SGD", "lr": 0.1})
    module.encoder = IdEncoder()
    dm.places_cfg = PlaceConfig(P=P, K=K, lookalike="embedding")
    dm.place_sampler.cfg = dm.places_cfg
    try:
        module._trainer = SimpleNamespace(datamodule=dm, world_size=1, current_epoch=3)
        module.train()
        module.on_train_epoch_start()
        assert module.training
        epoch, emb = dm._place_batches.embeddings
        assert epoch == 3 and np.array_equal(emb[:, 0], dm.place_sampler.anchors)
    finally:
        dm.places_cfg = dm.place_sampler.cfg = PlaceConfig(P=P, K=K)
        dm._place_batches = None
        module._trainer = None


@pytest.mark.parametrize("override, message", [
    ("model.places.P=1", "model.places.P=1: must be an integer >= 2"),
    ("model.places.lookalike=nearest", "model.places.lookalike='nearest': must be one of embedding or null"),
    ("model.batches=triplets", "model.batches='triplets': must be one of pairs, places"),
    ("data.places.min_fov=0", "data.places.min_fov=0: must be a number in (0, 1]"),
])
def test_bad_place_knobs_are_one_line(override: str, message: str, tmp_path: Path, cache_dir: Path) -> None:
    from siamese_retrieval.configs import check_config

    cfg = compose_config("train", ["model=cnn_snn", override], tmp_path, cache_dir)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "train")
    assert str(err.value) == message


def test_train_py_model_cnn_snn_trains_on_place_batches_and_writes_metrics(tmp_path: Path, cache_dir: Path) -> None:
    from siamese_retrieval.train import train

    cfg = compose_config("train", ["model=cnn_snn", "debug=fast", "trainer.limit_train_batches=3"],
                         tmp_path, cache_dir)
    assert cfg.data.batches == "places" and cfg.data.places.lookalike == "embedding"
    result = train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "ok" and saved["model"] == "cnn_snn" and saved["epochs"] == 1
    assert 0.0 <= saved["metrics"]["test/recall@1"] <= 1.0 and np.isfinite(saved["metrics"]["val/loss"])
    assert "ms" in cfg.model.module.loss.terms, "the multi-similarity term is part of the default"
    assert result["metrics"] == saved["metrics"]


def test_model_cnn_snn_pairs_drops_the_multi_similarity_term(tmp_path: Path, cache_dir: Path) -> None:
    from hydra.utils import instantiate

    cfg = compose_config("train", ["model=cnn_snn_pairs"], tmp_path, cache_dir)
    assert cfg.data.batches == "pairs" and cfg.trainer.max_epochs == 5
    loss = instantiate(cfg.model.module.loss)
    assert list(loss.terms) == ["embedding", "head"] and loss.weights == {"embedding": 1.0, "head": 0.1}
