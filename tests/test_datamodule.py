"""RetrievalDataModule batches: tensors sliced per batch, fresh pairs per epoch, disjoint DDP shards."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from siamese_retrieval.data.datamodule import PairBatches, RetrievalDataModule
from siamese_retrieval.data.inputs import KeypointInputs
from tests.helpers import make_dataset


@pytest.fixture()
def dm(tmp_path: Path) -> RetrievalDataModule:
    make_dataset(tmp_path / "city", n_streets=4, per_street=8, queries_per_street=6)
    module = RetrievalDataModule(KeypointInputs(n_keypoints=10), root=str(tmp_path / "city"), batch_size=4,
                                 split={"fractions": [0.5, 0.25, 0.25], "cell_size_m": 1000.0},
                                 pairs={"preset": "study"}, cache_dir=str(tmp_path / "cache"))
    module.setup("fit")
    return module


def _pairs(batches) -> set[tuple[int, int]]:
    return {(int(q), int(d)) for b in batches for q, d in zip(b["q_idx"], b["d_idx"])}


def test_train_batches_hold_the_pair_tensors(dm: RetrievalDataModule) -> None:
    batches = list(dm.train_dataloader())
    q, d, target = dm.sampler.sample(0)
    assert sum(len(b["target"]) for b in batches) == len(q)
    b = batches[0]
    assert b["q"]["desc"].shape == (len(b["target"]), 10, 32) and b["q"]["desc"].dtype == torch.uint8
    assert torch.equal(b["q"]["desc"], dm.q_inputs["desc"][b["q_idx"]])
    assert torch.equal(b["fov"], torch.from_numpy(dm.dataset.fov[b["q_idx"], b["d_idx"]]))
    assert b["cross_fov"].shape == (len(b["target"]),) * 2
    assert set(b["q_idx"].tolist()) <= set(dm.splits.train_q.tolist())
    assert set(b["d_idx"].tolist()) <= set(dm.splits.train_db.tolist())


def test_ddp_ranks_get_disjoint_equal_shards(dm: RetrievalDataModule) -> None:
    full = PairBatches(dm, dm.sampler.sample, 4, shuffle=True, seed=0, shard=True)
    n_full, full_pairs = len(full), _pairs(full)
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0)
        shard = PairBatches(dm, dm.sampler.sample, 4, shuffle=True, seed=0, shard=True)
        shards.append(list(shard))
        assert len(shards[-1]) == len(shard) == n_full // 2
    assert not _pairs(shards[0]) & _pairs(shards[1])
    dm.trainer = None
    assert _pairs(shards[0]) | _pairs(shards[1]) <= full_pairs


def test_pairs_change_between_epochs(dm: RetrievalDataModule) -> None:
    epochs = []
    for epoch in range(2):
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=epoch)
        epochs.append(_pairs(dm.train_dataloader()))
    dm.trainer = None
    assert epochs[0] != epochs[1]
    assert len(epochs[0]) == len(epochs[1])
