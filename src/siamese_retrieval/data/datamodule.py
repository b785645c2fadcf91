"""RetrievalDataModule: dataset root -> validated dataset -> place splits -> input tensors -> pair batches.

Training batches are pairs sampled afresh each epoch from the train queries and train-place database
images, or, with `batches="places"`, P x K place batches of the same images (data/place_batches.py); val/test
batches are a fixed set of the split's pairs (loss and range accuracy), while the
retrieval callbacks search the split's queries against the FULL database.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from siamese_retrieval.configs.data import Data
from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.data.dataset import DatasetFiles, RetrievalDataset, read_dataset
from siamese_retrieval.data.ground_truth import GroundTruth
from siamese_retrieval.data.inputs import InputBuilder, Tensors, take
from siamese_retrieval.data.layouts import check_layout_options, read_layout
from siamese_retrieval.data.pairs import PairRecipe, PairSampler, eval_pairs
from siamese_retrieval.data.place_batches import (
    PlaceBatches,
    PlaceConfig,
    PlaceSampler,
    anchor_inputs,
    rank_world,
)
from siamese_retrieval.data.splits import Splits, split_by_place
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.io_utils import release_mapped_pages

log = logging.getLogger(__name__)


@dataclass
class PairSource:
    """What pair batches are sliced from: the relevance and the input tensors its indices point into."""

    truth: GroundTruth
    q_inputs: Tensors
    db_inputs: Tensors


class PairBatches(IterableDataset):
    """Yields ready pair batches sliced from the in-memory tensors (no per-item Python work)."""

    def __init__(
        self,
        dm: "RetrievalDataModule",
        pairs_fn: Any,
        batch_size: int,
        shuffle: bool,
        seed: int,
        shard: bool = False,
        source: PairSource | None = None,
    ) -> None:
        self.dm, self.pairs_fn, self.batch_size, self.shuffle, self.seed = dm, pairs_fn, batch_size, shuffle, seed
        self.source = source  # None: the datamodule's dataset and tensors
        self.shard = shard  # under DDP, rank r takes batches r, r + world, ... (equal counts on every rank)
        self._n_pairs = len(pairs_fn(0)[0])

    def __len__(self) -> int:
        n_batches = -(-self._n_pairs // self.batch_size)
        _, world = rank_world(self.dm, self.shard)
        return n_batches if world == 1 else max(1, n_batches // world)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.dm.current_epoch()
        q, d, target = self.pairs_fn(epoch)
        order = np.arange(len(q))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(q))
        source = self.source or PairSource(self.dm.dataset.relevance, self.dm.q_inputs, self.dm.db_inputs)
        truth = source.truth
        rank, world = rank_world(self.dm, self.shard)
        starts = range(0, len(order), self.batch_size)
        if world > 1:
            starts = list(starts)[rank::world][: len(self)]
        for start in starts:
            sel = order[start : start + self.batch_size]
            qi, di = q[sel], d[sel]
            release_mapped_pages()  # a memory-mapped cache's pages read so far leave RSS (once a second at most)
            _, cross_fov = truth.lookup(qi, np.broadcast_to(di, (len(qi), len(di))))  # (b, b): dense or sparse
            yield {
                "q": take(source.q_inputs, qi),
                "d": take(source.db_inputs, di),
                "target": torch.from_numpy(np.asarray(target[sel], dtype=np.float32)),
                "fov": torch.from_numpy(np.ascontiguousarray(np.diagonal(cross_fov))),
                "q_idx": torch.from_numpy(qi),
                "d_idx": torch.from_numpy(di),
                # relevance of every in-batch (query, database) cross pair: known negatives for mining losses
                "cross_fov": torch.from_numpy(np.ascontiguousarray(cross_fov, dtype=np.float32)),
            }


class RetrievalDataModule(pl.LightningDataModule):
    def __init__(
        self,
        inputs: InputBuilder,
        root: str | None = None,
        synth: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
        image_check: str = "decode",
        follow_symlinks_outside_root: bool = False,
        layout: str = "contract",
        layout_options: Mapping[str, Any] | None = None,
        split: Mapping[str, Any] | None = None,
        pairs: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 512,
        cache_dir: str | None = None,
        seed: int = 0,
        name: str = "",
        train_views: Mapping[str, Any] | None = None,
        batches: str = "pairs",
        places: Mapping[str, Any] | None = None,
        max_image_pixels: int = 50_000_000,
    ) -> None:
        super().__init__()
        from siamese_retrieval.image_header import set_max_image_pixels

        # every decoder of this process (the reader's check, the inputs, retrieve's queries) refuses larger images
        self.max_image_pixels = set_max_image_pixels(max_image_pixels)
        if root is None and synth is None:
            raise ConfigError("data: set data.root (a dataset in the MSLS/GCL format) or data.synth")
        self.inputs = inputs
        self.root = root
        self.synth = dict(synth) if synth is not None else None  # {}: the default city
        self.files = DatasetFiles(**dict(files or {}))
        self.image_check = image_check
        self.follow_symlinks_outside_root = bool(follow_symlinks_outside_root)
        self.layout = str(layout)
        check_layout_options(self.layout, {} if layout_options is None else layout_options)
        self.layout_options = dict(layout_options or {})
        self.split_cfg = dict(split or {})
        self.pairs_cfg = dict(pairs or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed = seed
        self.name = name
        from siamese_retrieval.data.train_views import views_mapping

        self.train_views = views_mapping(train_views)  # a training-only city (data/train_views.py); null: none
        check_fields({"batches": batches}, Data, "data")
        self.batches = str(batches)  # pairs | places: what training batches are (validation/test: always pairs)
        self.places_cfg = PlaceConfig.from_config(places) if batches == "places" else None
        self.place_sampler: PlaceSampler | None = None
        self._place_batches: PlaceBatches | None = None
        self.train_source: PairSource | None = None
        self.dataset: RetrievalDataset | None = None
        self.splits: Splits | None = None
        self.db_inputs: Tensors = {}
        self.q_inputs: Tensors = {}

    # ------------------------------------------------------------------ data
    def resolve_root(self) -> Path:
        if self.root is not None:
            return Path(self.root)
        from siamese_retrieval.data.synth import SynthConfig, ensure_city

        synth = dict(self.synth or {})
        preset = synth.pop("preset", "default")
        cache = self.cache_dir or Path("data_cache")
        return ensure_city(cache, SynthConfig.from_preset(preset, **synth))

    def prepare_data(self) -> None:
        self.resolve_root()
        if self.train_views:
            self.resolve_views_root()

    def _eval_city(self):
        from siamese_retrieval.data.train_views import synth_config

        return synth_config(self.synth, "data.synth") if self.root is None and self.synth is not None else None

    def resolve_views_root(self) -> Path:
        """The training city of `train_views`, generated into the cache on first use."""
        from siamese_retrieval.data.synth import ensure_city
        from siamese_retrieval.data.train_views import views_config

        return ensure_city(self.cache_dir or Path("data_cache"), views_config(self.train_views, self._eval_city()))

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the dataset, split it by place, build the pair sampler and the input tensors."""
        if self.dataset is not None:
            return
        dataset = self._read()
        split = dict(self.split_cfg)
        fractions = tuple(split.pop("fractions", (0.7, 0.15, 0.15)))
        split_seed = split.pop("seed", None)  # fixed by default, so every training seed meets the same test places
        self.splits = split_by_place(dataset, fractions=fractions, seed=self.seed if split_seed is None else split_seed,
                                     **split)
        self._build_inputs(dataset)
        truth, train_q, train_db = dataset, self.splits.train_q, self.splits.train_db
        if dataset.train_relevance is not None:  # training positives of their own (layouts: 10 m, not 25 m)
            truth = dataset.train_relevance
            self.train_source = PairSource(truth, self.q_inputs, self.db_inputs)
        if self.train_views:
            joined = self._join_train_views(dataset)
            self.train_source = PairSource(joined.truth, joined.q_inputs, joined.db_inputs)
            truth, train_q, train_db = joined.truth, joined.train_q, joined.train_db
        self.sampler = PairSampler(truth, train_q, train_db, self.recipe, seed=self.seed)
        if self.places_cfg is not None:  # the same train queries and database images as the pairs
            self.place_sampler = PlaceSampler(truth, train_q, train_db, self.places_cfg, seed=self.seed)
            log.info("place batches: %d places of %d train queries (%d skipped: no view with fov >= %g), "
                     "~%d batches of <= %d places x <= %d views per epoch", self.place_sampler.n_places,
                     self.place_sampler.n_queries, self.place_sampler.n_skipped, self.places_cfg.min_fov,
                     self.place_sampler.n_batches, self.places_cfg.P, self.places_cfg.K)
        log.info("dataset %s: %d database, %d queries; splits %s", dataset.name, dataset.n_db, dataset.n_query,
                 self.splits.summary())

    def _join_train_views(self, dataset: RetrievalDataset):
        from siamese_retrieval.data.train_views import join_views

        views = read_dataset(self.resolve_views_root(), check=self.image_check, name=f"{self.name}-train-views")
        views_db, views_q = self.inputs.build(views, self.cache_dir)
        log.info("training views: %d database, %d queries of a training-only city (%s)", views.n_db, views.n_query,
                 views.root.name)
        return join_views(dataset, self.q_inputs, self.db_inputs, self.splits.train_q, self.splits.train_db, views,
                          views_q, views_db)

    def setup_unsplit(self) -> None:
        """Like `setup`, without a place split: every query of a dataset the model never saw (split=all)."""
        if self.dataset is None:
            self._build_inputs(self._read())

    def _read(self) -> RetrievalDataset:
        self.recipe = PairRecipe.from_config(self.pairs_cfg)
        self.eval_recipe = PairRecipe.study(target=self.recipe.target)
        return self.read(check=self.image_check)

    def read(self, check: str) -> RetrievalDataset:
        """The dataset at this config's root, validated to `check` (decode | exists | none)."""
        if self.layout != "contract":  # a folder layout of another benchmark (data/layouts.py)
            return read_layout(self.layout, self.resolve_root(), check=check, name=self.name,
                               follow_symlinks_outside_root=self.follow_symlinks_outside_root, **self.layout_options)
        return read_dataset(self.resolve_root(), self.files, check=check, name=self.name,
                            follow_symlinks_outside_root=self.follow_symlinks_outside_root)

    def _build_inputs(self, dataset: RetrievalDataset) -> None:
        self.db_inputs, self.q_inputs = self.inputs.build(dataset, self.cache_dir)
        self.dataset = dataset

    def current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        if self.place_sampler is not None:
            if self._place_batches is None:  # one object: it keeps the anchor embeddings the module hands it
                source = self.train_source or PairSource(self.dataset.relevance, self.q_inputs, self.db_inputs)
                self._place_batches = PlaceBatches(self, self.place_sampler, source, target=self.recipe.target)
            return DataLoader(self._place_batches, batch_size=None)
        batches = PairBatches(self, self.sampler.sample, self.batch_size, shuffle=True, seed=self.seed, shard=True,
                              source=self.train_source)
        return DataLoader(batches, batch_size=None)

    # ------------------------------------------------------------------ look-alike place batches
    def needs_anchor_embeddings(self) -> bool:
        """Whether the epoch's place batches want the current model's anchor embeddings (lookalike=embedding)."""
        return self.places_cfg is not None and self.places_cfg.lookalike == "embedding"

    def anchor_inputs(self) -> dict[str, Any]:
        """The place anchors' inputs, gathered lazily when sliced (SiameseModule embeds them each epoch)."""
        assert self.place_sampler is not None, "data.batches=places and setup() first"
        source = self.train_source or PairSource(self.dataset.relevance, self.q_inputs, self.db_inputs)
        return anchor_inputs(self.place_sampler, source.q_inputs)

    def set_anchor_embeddings(self, epoch: int, embeddings: torch.Tensor) -> None:
        """(n_places, D) embeddings of `anchor_inputs()` for packing `epoch`'s look-alike batches."""
        if self._place_batches is None:
            self.train_dataloader()
        self._place_batches.set_embeddings(epoch, embeddings)

    def eval_batches(self, query_idx: np.ndarray) -> PairBatches:
        """The fixed evaluation pairs of these queries (the study's recipe, drawn with the data seed) in
        batches: what val/test steps and evaluate.py compute the loss and range accuracy on."""
        assert self.dataset is not None, "call setup() first"
        pairs = eval_pairs(self.dataset, query_idx, self.eval_recipe, seed=self.seed)
        return PairBatches(self, lambda epoch: pairs, self.eval_batch_size, shuffle=False, seed=self.seed)

    def _eval_loader(self, stage: str) -> DataLoader:
        assert self.splits is not None, "call setup() first"
        return DataLoader(self.eval_batches(self.splits.queries(stage)), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and isinstance(batch, dict):
            for key in ("q", "d", "images"):  # pair batches hold q and d, place batches images
                if key in batch:
                    batch[key] = self.inputs.augment(batch[key])
        return batch


def evaluation_data_config(data_cfg: Any, target: str | None = None) -> Any:
    """A `data=` config for evaluating a trained model, without the training keys it takes from `model`:
    pairs are the study's evaluation recipe with the model's training target (`target`, else the config's
    own), and no training batches are drawn (batch_size only sizes them)."""
    from omegaconf import OmegaConf, open_dict

    cfg = data_cfg.copy()
    with open_dict(cfg):
        own = OmegaConf.select(cfg, "pairs.target", default="sim")
        cfg.pairs = {"preset": "study", "target": target or own}
        cfg.batch_size = 1
        cfg.train_views = None  # training-only images: nothing to evaluate
        cfg.batches = "pairs"  # evaluation batches are pairs; no place batches are packed
    return cfg


def build_datamodule(data_cfg: Any, inputs: InputBuilder) -> RetrievalDataModule:
    """The datamodule of a `data=` config (the user's own conf/, not a file from elsewhere) around `inputs`; a
    `data` node that cannot be built is one ConfigError naming it."""
    from siamese_retrieval.errors import instantiate_config

    return instantiate_config("data", data_cfg, inputs=inputs, _recursive_=False)
