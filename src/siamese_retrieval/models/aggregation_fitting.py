"""AggregationFitting: fits the parts of an image encoder's aggregation (PlainCNN, BackboneEncoder: a PooledEncoder)
that come from data, not from gradients.

  * NetVLAD clusters: k-means on local descriptors of training images, ONCE, at fit start, and only while the
    head's `initialised` flag (saved in the checkpoint) is unset: a resumed or loaded model keeps its clusters.
  * PCA-whitening (`whiten_dim`): fitted on embeddings of training images at fit start (after the k-means, so
    every validation and checkpoint, epoch 0's included, has the same whiten_dim-sized output) and refitted at
    the start of every later training epoch, so the whitening follows the network; validation at the end of
    an epoch and the checkpoint saved then use the whitening that epoch trained with.
Only the TRAINING split's images are used (train queries + train database images, and the training-only city
of data.train_views when there is one). Samples are drawn with `seed` (+ the epoch), identically on every rank;
under DDP rank 0's result is broadcast so every replica holds the same state.

A no-op (one isinstance test) for encoders without these heads (KeypointMLP) and for GeM without whitening.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from siamese_retrieval.data.inputs import Tensors, take
from siamese_retrieval.errors import UserError
from siamese_retrieval.models.cnn import PooledEncoder
from siamese_retrieval.models.embedding import embed_all
from siamese_retrieval.registry import CALLBACKS

log = logging.getLogger(__name__)


def training_images(dm: Any, n: int, seed: int) -> Tensors:
    """Up to `n` training-split images (queries and database images alike), drawn uniformly with `seed`."""
    if getattr(dm, "splits", None) is None:
        raise UserError("AggregationFitting needs the RetrievalDataModule of train.py (trainer.datamodule)")
    n_q, n_db = (len(next(iter(t.values()))) for t in (dm.q_inputs, dm.db_inputs))
    q_inputs, db_inputs = dm.q_inputs, dm.db_inputs
    q_idx, db_idx = np.asarray(dm.splits.train_q, np.int64), np.asarray(dm.splits.train_db, np.int64)
    source = getattr(dm, "train_source", None)
    if source is not None:  # data.train_views: the training city's rows follow the dataset's (train_views.join_views)
        q_inputs, db_inputs = source.q_inputs, source.db_inputs
        q_idx = np.concatenate([q_idx, np.arange(n_q, len(next(iter(q_inputs.values()))))])
        db_idx = np.concatenate([db_idx, np.arange(n_db, len(next(iter(db_inputs.values()))))])
    total = len(q_idx) + len(db_idx)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(int(n), total), replace=False))
    from_q = pick < len(q_idx)
    parts = [take(q_inputs, q_idx[pick[from_q]]), take(db_inputs, db_idx[pick[~from_q] - len(q_idx)])]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@CALLBACKS.register("aggregation_fitting")
class AggregationFitting(pl.Callback):
    def __init__(self, kmeans_images: int = 1000, max_descriptors: int = 50_000, whiten_samples: int = 2000,
                 batch_size: int = 256, seed: int = 0) -> None:
        for name, value in (("kmeans_images", kmeans_images), ("max_descriptors", max_descriptors),
                            ("whiten_samples", whiten_samples), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"callbacks.aggregation_fitting.{name}={value!r}: must be an integer >= 1")
        self.kmeans_images, self.max_descriptors = kmeans_images, max_descriptors
        self.whiten_samples, self.batch_size, self.seed = whiten_samples, batch_size, int(seed)
        self._whitened_epoch: int | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._whitened_epoch = None
        encoder = getattr(pl_module, "encoder", None)
        if not isinstance(encoder, PooledEncoder):
            return
        if encoder.needs_cluster_init:
            self._init_clusters(trainer, pl_module, encoder)
        if encoder.whiten is not None:
            self._fit_whitening(trainer, pl_module, encoder)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        encoder = getattr(pl_module, "encoder", None)
        if not isinstance(encoder, PooledEncoder) or encoder.whiten is None:
            return
        if self._whitened_epoch != trainer.current_epoch:  # epoch 0 (or a resumed epoch): fitted at fit start
            self._fit_whitening(trainer, pl_module, encoder)

    # ------------------------------------------------------------------ the fits
    def _embed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, encoder: PooledEncoder,
               fn: Callable[[Tensors], torch.Tensor], n: int, seed: int) -> torch.Tensor:
        """fn over `n` sampled training images, in eval mode (BN running stats, no dropout), on CPU."""
        images = training_images(trainer.datamodule, n, seed)
        was_training = encoder.training
        encoder.eval()
        try:
            # what embed_all needs of a module: a device and an embed()
            return embed_all(SimpleNamespace(device=pl_module.device, embed=fn), images, self.batch_size)
        finally:
            encoder.train(was_training)

    def _init_clusters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, encoder: PooledEncoder) -> None:
        head = encoder.pool
        channels = int(head.dim)

        def descriptors(batch: Tensors) -> torch.Tensor:  # (B, C, H, W) -> (B, H*W*C): one row per image
            return encoder.local_features(batch).flatten(2).transpose(1, 2).flatten(1)

        feats = self._embed(trainer, pl_module, encoder, descriptors, self.kmeans_images, self.seed)
        feats = feats.reshape(-1, channels)
        if len(feats) > self.max_descriptors:
            keep = np.random.default_rng(self.seed).choice(len(feats), self.max_descriptors, replace=False)
            feats = feats[torch.from_numpy(np.sort(keep))]
        head.initialise_from_features(feats, seed=self.seed)
        _broadcast(trainer, head)
        log.info("NetVLAD: %d clusters from k-means on %d local descriptors of training images (alpha %.3g)",
                 head.clusters, len(feats), getattr(head, "alpha", float("nan")))

    def _fit_whitening(self, trainer: pl.Trainer, pl_module: pl.LightningModule, encoder: PooledEncoder) -> None:
        whiten = encoder.whiten
        assert whiten is not None
        epoch = int(trainer.current_epoch)
        emb = self._embed(trainer, pl_module, encoder, encoder.embed_unwhitened, self.whiten_samples,
                          self.seed + 1 + epoch)
        if len(emb) <= whiten.out_dim:
            raise UserError(f"model.module.encoder.whiten_dim={whiten.out_dim}: PCA-whitening needs more than "
                            f"{whiten.out_dim} training images, found {len(emb)} (callbacks.aggregation_fitting."
                            f"whiten_samples={self.whiten_samples})")
        whiten.fit(emb)
        _broadcast(trainer, whiten)
        self._whitened_epoch = epoch
        log.info("PCA-whitening %d -> %d dims fitted on %d training images (epoch %d)", whiten.in_dim,
                 whiten.out_dim, len(emb), epoch)


def _broadcast(trainer: pl.Trainer, module: nn.Module) -> None:
    """DDP: every rank takes rank 0's state of `module` (copied in place: the optimizer keeps its parameters)."""
    if trainer.world_size > 1:
        state = trainer.strategy.broadcast({k: v.detach().cpu() for k, v in module.state_dict().items()}, src=0)
        module.load_state_dict(state)
