"""Fitting the learned match verifier (retrieval/learned_matches.py) through Lightning, and its weights cache.

    net = fit_or_load(TrainData(...), cfg, cache_dir, log_dir=run_dir)   # the cache, else fit and cache

`fit` is a plain Lightning fit: `VerifierPairs` (a LightningDataModule: the TRAINING split's padded match
sets, batched by similar match counts so a batch pads little), `VerifierModule` (a LightningModule: MatchNet,
the inlier BCE (+ the pair BCE with pool=learned), AdamW with a one-cycle schedule stepped per batch), the
Trainer's progress bar, a CSV logger and a weights-only checkpoint under `log_dir` when one is given, and
`train.max_seconds` as the Trainer's max_time. The result is deterministic given `train.seed`.

The cache (`learned_matches-<digest>.pt`, keyed by the dataset, its training split and every knob that
changes the weights) holds the state_dict's tensors only: it is read with torch.load(weights_only=True) and
the architecture always comes from the config, so a cache file is data, never code. An unusable file is one
warning and a refit.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from siamese_retrieval.data.ground_truth import as_ground_truth
from siamese_retrieval.data.images import thumbnail
from siamese_retrieval.errors import ConfigError, load_failure
from siamese_retrieval.io_utils import atomic_path, check_cache_entry, stable_hash
from siamese_retrieval.progress import progress_enabled
from siamese_retrieval.retrieval.learned_matches import LearnedMatchesConfig, MatchNet, NetworkConfig, TrainConfig, \
    match_features
from siamese_retrieval.retrieval.orb_features import Features
from siamese_retrieval.retrieval.orb_ransac import single_threaded_kernels

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------- training pairs


@dataclass
class TrainData:
    """What fitting needs: every query's and database image's keypoints and image file, the TRAINING split's
    query and database indices (only those are read), the ground truth (sim / fov lookup) and the dataset's
    identity (its fingerprint: part of the cache key)."""

    q_feats: Sequence[Features]
    db_feats: Sequence[Features]
    q_files: Sequence[Path]
    db_files: Sequence[Path]
    train_q: np.ndarray
    train_db: np.ndarray
    truth: Any  # a GroundTruth (data/ground_truth.py)
    key: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ds: Any, splits: Any, db: Sequence[Features], queries: Sequence[Features], **key: Any) -> TrainData:
        """The training split of a RetrievalDataset `ds`: built here once for the trust rule and the verifier."""
        return cls(queries, db, [ds.query_file(i) for i in range(ds.n_query)], [ds.db_file(j) for j in range(ds.n_db)],
                   splits.train_q, splits.train_db, as_ground_truth(ds), key)


def training_candidates(data: TrainData, cfg: TrainConfig) -> list[tuple[int, np.ndarray]]:
    """(query, database ids) per training query: positives, partial overlaps and thumbnail look-alikes, drawn
    (seeded) from the training database only."""
    rng = np.random.default_rng(cfg.seed)
    train_db = np.asarray(data.train_db)
    if cfg.lookalikes:
        q_thumbs = np.stack([thumbnail(data.q_files[int(i)]) for i in data.train_q])
        db_thumbs = np.stack([thumbnail(data.db_files[int(j)]) for j in train_db])
    out = []
    for row, q in enumerate(np.asarray(data.train_q)):
        sim, fov = data.truth.lookup(np.array([q]), train_db[None, :])
        sim, fov = sim[0], fov[0]
        pos, part = train_db[sim], train_db[~sim & (fov > 0)]
        pick = lambda ids, k: rng.choice(ids, size=min(k, len(ids)), replace=False) if len(ids) else ids  # noqa: E731
        chosen = [pick(pos, cfg.positives), pick(part, cfg.partial)]
        if cfg.lookalikes:
            zero = np.flatnonzero(fov <= 0)
            d = ((db_thumbs[zero] - q_thumbs[row]) ** 2).sum(axis=1)
            chosen.append(train_db[zero[np.argsort(d, kind="stable")[: cfg.lookalikes]]])
        cand = np.concatenate(chosen).astype(np.int64)
        if len(cand):
            out.append((int(q), cand))
    return out


def ransac_labels(q: Features, d: Features, qi: np.ndarray, di: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """(len(qi),) bool: the matches that are inliers of a USAC homography (none when fewer than min_matches)."""
    if len(qi) < cfg.min_matches:
        return np.zeros(len(qi), bool)
    h, mask = cv2.findHomography(q.points[qi].reshape(-1, 1, 2), d.points[di].reshape(-1, 1, 2), cv2.USAC_DEFAULT,
                                 cfg.ransac_threshold, maxIters=2000)
    if h is None or mask is None:
        return np.zeros(len(qi), bool)
    return mask.ravel().astype(bool)


def training_set(data: TrainData, cfg: LearnedMatchesConfig) -> dict[str, torch.Tensor]:
    """Padded tensors of every training pair: x (P, M, 9), mask (P, M), match labels (P, M), pair labels (P,)."""
    xs, masks, ys, sims = [], [], [], []
    with single_threaded_kernels():
        for q, cand in training_candidates(data, cfg.train):
            qf = data.q_feats[q]
            mt = match_features(qf, [data.db_feats[j] for j in cand], cfg.matching)
            sim, _ = data.truth.lookup(np.array([q]), cand[None, :])
            y = np.zeros(mt.mask.shape, np.float32)
            for c, j in enumerate(cand):
                valid = mt.mask[c]
                if valid.any() and (sim[0, c] or cfg.train.labels == "ransac"):
                    y[c, valid] = ransac_labels(qf, data.db_feats[j], mt.qi[c, valid], mt.di[c, valid], cfg.train)
            xs.append(mt.x), masks.append(mt.mask), ys.append(y), sims.append(sim[0].astype(np.float32))
    if not xs:
        raise ConfigError("rerank=learned_matches: the training split has no query with a training pair to fit on")
    return {"x": torch.from_numpy(np.concatenate(xs)), "mask": torch.from_numpy(np.concatenate(masks)),
            "y": torch.from_numpy(np.concatenate(ys)), "sim": torch.from_numpy(np.concatenate(sims))}


# ----------------------------------------------------------------------------------------- Lightning parts


class SimilarCountBatches(Sampler[list[int]]):
    """Index batches of `size` pairs for one epoch: shuffled, sorted by match count within windows of 8 batches
    (so each batch pads to a similar width), the batches in random order; seeded once, so every epoch differs
    and the whole fit is deterministic."""

    def __init__(self, counts: torch.Tensor, size: int, seed: int) -> None:
        self.counts, self.size = counts, size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.counts) / self.size)  # every window but the last holds 8 full batches

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.counts), generator=self.gen)
        window = self.size * 8
        chunks = []
        for start in range(0, len(perm), window):
            part = perm[start : start + window]
            chunks.extend(part[torch.argsort(self.counts[part], stable=True)].split(self.size))
        for i in torch.randperm(len(chunks), generator=self.gen).tolist():
            yield chunks[i].tolist()


class VerifierPairs(pl.LightningDataModule):
    """The training pairs' padded tensors, each batch cut to its widest match set (matches sit at the front)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], batch_pairs: int, seed: int) -> None:
        super().__init__()
        self.tensors, self.batch_pairs, self.seed = dict(tensors), batch_pairs, seed
        self.counts = self.tensors["mask"].sum(dim=1)

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.tensor(idx)
        width = max(1, int(self.counts[rows].max()))
        return {k: (v[rows, :width] if v.dim() > 1 else v[rows]) for k, v in self.tensors.items()}

    def train_dataloader(self) -> DataLoader:
        # the items are row numbers; the sampler groups them into batches, _collate cuts each batch's tensors
        batches = SimilarCountBatches(self.counts, self.batch_pairs, self.seed)
        return DataLoader(range(len(self.counts)), batch_sampler=batches, collate_fn=self._collate)


class VerifierModule(pl.LightningModule):
    """MatchNet trained on RANSAC inlier labels per match (and relevance per pair with pool=learned)."""

    def __init__(self, cfg: LearnedMatchesConfig, steps: int) -> None:
        super().__init__()
        self.cfg, self.steps = cfg, steps
        torch.manual_seed(cfg.train.seed)
        self.net = MatchNet(cfg.network)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tc, bce = self.cfg.train, nn.functional.binary_cross_entropy_with_logits
        logits, pair = self.net(batch["x"], batch["mask"])
        m = batch["mask"].float()
        loss = tc.match_loss * (bce(logits, batch["y"], reduction="none") * m).sum() / m.sum().clamp_min(1.0)
        if self.cfg.network.pool == "learned":
            loss = loss + tc.pair_loss * bce(pair, batch["sim"])
        self.log("verifier/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["sim"]))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        tc = self.cfg.train
        opt = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": one_cycle(opt, tc.lr, self.steps), "interval": "step"}}


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int, pct_start: float = 0.1) -> Any:
    """The one-cycle schedule (peak `lr`) over `steps` optimiser steps, defined for every step count.

    torch's OneCycleLR ends its warm-up at step pct_start * steps - 1; where that is exactly step 0 (10 steps)
    it divides 0 by 0 at the first step: the warm-up then ends half a step earlier, so the first step is in the
    annealing phase, as for every shorter cycle. A single step gets the constant `lr` (a one-step cycle would
    take it at the cycle's final lr, ~1e-6 of the peak)."""
    if steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if float(pct_start * steps) - 1 == 0:
        pct_start = 0.5 / steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)


def fit(data: TrainData, cfg: LearnedMatchesConfig, log_dir: Path | None = None) -> tuple[MatchNet, dict[str, float]]:
    """Train a MatchNet on the training pairs with a Lightning Trainer; returns it and a summary. With `log_dir`,
    the fit logs to `<log_dir>/verifier/` (metrics.csv) and keeps a weights-only checkpoint there."""
    tc = cfg.train
    tensors = training_set(data, cfg)
    pairs = VerifierPairs(tensors, tc.batch_pairs, tc.seed)
    steps_per_epoch = len(SimilarCountBatches(pairs.counts, tc.batch_pairs, tc.seed))
    module = VerifierModule(cfg, tc.epochs * steps_per_epoch)
    logger: Any = False
    callbacks: list[pl.Callback] = []
    if log_dir is not None:
        from pytorch_lightning.callbacks import ModelCheckpoint
        from pytorch_lightning.loggers import CSVLogger

        logger = CSVLogger(str(log_dir), name="verifier", version="")
        callbacks.append(ModelCheckpoint(dirpath=Path(log_dir) / "verifier" / "checkpoints", save_weights_only=True,
                                         save_last=True, save_top_k=0))
    if progress_enabled():
        from pytorch_lightning.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=tc.epochs, max_time=datetime.timedelta(seconds=tc.max_seconds),
        logger=logger, callbacks=callbacks, enable_checkpointing=log_dir is not None,
        enable_progress_bar=progress_enabled(), enable_model_summary=False, log_every_n_steps=max(1, steps_per_epoch),
        num_sanity_val_steps=0, use_distributed_sampler=False, deterministic=True,
    )
    with _quiet_lightning(), single_threaded_kernels():
        trainer.fit(module, datamodule=pairs)
    if trainer.current_epoch < tc.epochs:
        log.warning("learned verifier: stopped after %d of %d epochs (train.max_seconds=%g)", trainer.current_epoch,
                    tc.epochs, tc.max_seconds)
    net = module.net.eval()
    loss = trainer.callback_metrics.get("verifier/loss")
    summary = {"pairs": float(len(tensors["sim"])), "relevant_pairs": float(tensors["sim"].sum()),
               "matches": float(tensors["mask"].sum()), "inlier_labels": float(tensors["y"].sum()),
               "epochs": float(trainer.current_epoch), "final_loss": float(loss) if loss is not None else math.nan}
    return net, summary


class _quiet_lightning:
    """Lightning's start-up lines (GPU available, TPU available...) are noise inside evaluate.py's log."""

    names = ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda", "lightning.pytorch")

    def __enter__(self) -> None:
        self.levels = [(lg, lg.level) for lg in map(logging.getLogger, self.names)]
        for lg, _ in self.levels:
            lg.setLevel(logging.WARNING)

    def __exit__(self, *exc: Any) -> None:
        for lg, level in self.levels:
            lg.setLevel(level)


# ----------------------------------------------------------------------------------------- the weights cache


def cache_path(data: TrainData, cfg: LearnedMatchesConfig, cache_dir: str | os.PathLike) -> Path:
    """The weights file of this dataset's training split and this config (matching, network and training)."""
    digest = stable_hash({**data.key, "train_q": stable_hash(np.asarray(data.train_q).tolist()),
                          "train_db": stable_hash(np.asarray(data.train_db).tolist()),
                          "features": asdict(cfg.features), "matching": asdict(cfg.matching),
                          "network": asdict(cfg.network), "train": asdict(cfg.train), "version": CACHE_VERSION})
    return Path(cache_dir) / f"learned_matches-{digest}.pt"


def save_weights(net: MatchNet, path: Path) -> None:
    """The state_dict's tensors only (no code, no pickled objects), written atomically."""
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_weights(path: Path, cfg: NetworkConfig) -> MatchNet | None:
    """A MatchNet built from `cfg` with the tensors of `path` (weights_only); None when they do not fit it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a dict of tensors")
        net = MatchNet(cfg)
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - a cache is disposable: whatever is wrong with the file, refit
        # (weights_only refuses to unpickle anything but tensors: a hostile file is an UnpicklingError here)
        log.warning("learned verifier cache %s is unusable (%s); refitting", path, load_failure(exc))
        return None
    net.eval()
    return net


def fit_or_load(data: TrainData, cfg: LearnedMatchesConfig, cache_dir: str | os.PathLike | None,
                log_dir: Path | None = None) -> MatchNet:
    """The verifier of this training split and config: loaded from the cache, else fitted and cached."""
    path = cache_path(data, cfg, cache_dir) if cache_dir is not None else None
    if path is not None:
        check_cache_entry(path, "learned verifier", "file", log)  # a planted symlink is removed, never read through
        net = load_weights(path, cfg.network) if path.is_file() else None
        if net is not None:
            log.info("learned verifier cache hit: %s", path)
            return net
    log.info("fitting the learned match verifier on the training split (%d queries x %d database images)",
             len(data.train_q), len(data.train_db))
    net, summary = fit(data, cfg, log_dir)
    log.info("learned verifier fitted: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    if path is not None:
        save_weights(net, path)
    return net
