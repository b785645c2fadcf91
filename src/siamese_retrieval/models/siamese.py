"""SiameseModule: shared encoder -> embeddings -> distance -> relevance head, with a configurable loss.

Constructed from plain config dicts (Hydra `_target_` nodes), which it instantiates itself: the checkpoint then
holds only primitives and loads under torch's `weights_only=True`. The configs it is given are trusted (the
user composed them); a checkpoint's are checked where the file is read (checkpoints.py, and
`load_from_checkpoint` below), before this constructor sees them. It also keeps the input builder's
config (`inputs`), so a checkpoint alone rebuilds the model and the tensors it eats (checkpoints.py).
"""

from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.errors import instantiate_partial
from siamese_retrieval.models.distance import Distance
from siamese_retrieval.models.embedding import embed_all, embed_sharded
from siamese_retrieval.models.heads import RelevanceHead
from siamese_retrieval.models.losses import PairOutput
from siamese_retrieval.models.pair_metrics import RangeAccuracy
from siamese_retrieval.registry import METRICS, MODULES

Batch = dict[str, Any]


def plain(cfg: Any) -> Any:
    """DictConfig -> plain dict (checkpoints must not pickle OmegaConf objects)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


@MODULES.register("siamese")
class SiameseModule(pl.LightningModule):
    def __init__(
        self,
        encoder: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        distance: str = "euclidean",
        head: Mapping[str, Any] | None = None,
        range_margin: float = 0.01,
        model_name: str = "siamese",
        inputs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "encoder": plain(encoder),
                "loss": plain(loss),
                "optimizer": plain(optimizer),
                "scheduler": plain(scheduler),
                "distance": distance,
                "head": plain(head) or {},
                "range_margin": range_margin,
                "model_name": model_name,
                "inputs": plain(inputs),  # the input builder's config: what evaluate/retrieve rebuild
            },
            logger=False,  # train.py logs the whole resolved config once (wandb_runs.logged_config)
        )
        self.encoder = instantiate(self.hparams.encoder)
        self.head = RelevanceHead(**self.hparams.head)
        self.loss_fn = instantiate(self.hparams.loss)
        self.distance = Distance(distance)
        self.val_range_acc = RangeAccuracy(range_margin)
        self.test_range_acc = RangeAccuracy(range_margin)
        self.range_key = f"range_acc@{range_margin:g}"

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, trust_allow: tuple[str, ...] = (),
                             **kwargs: Any) -> "SiameseModule":
        """Lightning's loader with the file's `_target_`s checked first (trust.py): the hyper-parameters of a
        checkpoint are data, and this constructor would instantiate them. `trust_allow`: the user's trust.allow."""
        from siamese_retrieval.trust import check_targets

        raw = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_targets(raw.get("hyper_parameters", {}) if isinstance(raw, dict) else {}, f"checkpoint {checkpoint_path}",
                      trust_allow)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ the network
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(inputs)

    def score_distances(self, distance: torch.Tensor) -> torch.Tensor:
        """Relevance in [0, 1] from a distance (any shape); what retrieval ranks by."""
        return torch.sigmoid(self.head.logits(distance.reshape(-1)).reshape(distance.shape))

    def cross_scores(self, q_emb: torch.Tensor, db_emb: torch.Tensor) -> torch.Tensor:
        return self.score_distances(self.distance.cross(q_emb, db_emb))

    def forward(self, q: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_output({"q": q, "d": d, "target": None, "fov": None}).score

    def pair_output(self, batch: Batch) -> PairOutput:
        """The batch's `PairOutput`: a pair batch (q, d) or a P x K place batch (images, labels, pair_q, pair_d;
        data/place_batches.py). A place batch's N images are embedded in one encoder pass and seen both as the
        labelled set of metric-learning losses (`embeddings`, `labels`) and as the batch's (anchor, view) pairs,
        so every pair loss and the in-batch miner work on it unchanged."""
        if "images" in batch:
            emb = self.embed(batch["images"])
            return self._pairs(emb[batch["pair_q"]], emb[batch["pair_d"]], batch, embeddings=emb,
                               labels=batch["labels"])
        return self._pairs(self.embed(batch["q"]), self.embed(batch["d"]), batch)

    def _pairs(self, emb_q: torch.Tensor, emb_d: torch.Tensor, batch: Batch, **extra: Any) -> PairOutput:
        distance = self.distance.pair(emb_q, emb_d)
        logits = self.head.logits(distance)
        return PairOutput(emb_q, emb_d, distance, logits, torch.sigmoid(logits), batch["target"], batch["fov"],
                          q_idx=batch.get("q_idx"), d_idx=batch.get("d_idx"), cross_fov=batch.get("cross_fov"),
                          head_logits_detached=self.head.logits(distance.detach()), distance_fn=self.distance,
                          **extra)

    @METRICS.register("loss", higher_is_better=False, at_k=False,
                      description="the loss of the pairs (+ the encoder's regularization): {train,val,test}/loss")
    def compute_loss(self, out: PairOutput) -> torch.Tensor:
        loss = self.loss_fn(out)
        if hasattr(self.encoder, "regularization"):
            loss = loss + self.encoder.regularization()
        return loss

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self.pair_output(batch)
        loss = self.compute_loss(out)
        n = len(out.score)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name, value in getattr(self.loss_fn, "last_terms", {}).items():
            self.log(f"train/loss_{name}", value, batch_size=n)
        return loss

    def on_train_epoch_start(self) -> None:
        """Look-alike place batches (data.places.lookalike=embedding): embed the place anchors with the current
        weights (no grad, eval mode, then back) and hand them to the datamodule before the epoch is packed."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not getattr(dm, "needs_anchor_embeddings", lambda: False)():
            return
        was_training = self.training
        self.eval()
        try:
            inputs = dm.anchor_inputs()
            if self.trainer.world_size > 1:  # every rank packs the same batches: the same (all-gathered) embeddings
                emb = embed_sharded(self.trainer, self, inputs, dm.eval_batch_size)
            else:
                emb = embed_all(self, inputs, dm.eval_batch_size)
        finally:
            self.train(was_training)
        dm.set_anchor_embeddings(self.current_epoch, self.distance.for_index(emb))

    def _eval_step(self, batch: Batch, stage: str, range_acc: RangeAccuracy) -> None:
        out = self.pair_output(batch)
        n = len(out.score)
        self.log(f"{stage}/loss", self.compute_loss(out), batch_size=n, sync_dist=True)
        range_acc.update(out.score, out.target)
        self.log(f"{stage}/{self.range_key}", range_acc, batch_size=n)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_range_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_range_acc)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the data the model is trained on, so evaluate.py can tell whether a split is the training run's.

        What callbacks recorded there first is kept (Lightning calls the callbacks' on_save_checkpoint before
        the module's): the W&B run the model is trained in (callbacks.WandbRunInCheckpoint)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "split_cfg"):
            checkpoint["training_data"] = {
                "name": str(dm.name), "seed": int(dm.seed), "pairs_target": str(dm.recipe.target),
                "split": OmegaConf.to_container(OmegaConf.create(dict(dm.split_cfg))),
                "train_views": OmegaConf.to_container(OmegaConf.create(dict(dm.train_views))) if dm.train_views else None,
                **checkpoint.get("training_data", {}),
            }
        # a pretrained weights file (model=backbone_snn) is where the encoder started: the checkpoint's tensors
        # are the trained weights, so loading it never needs that file (which may not exist where it is loaded)
        encoder = checkpoint.get("hyper_parameters", {}).get("encoder")
        if isinstance(encoder, Mapping) and encoder.get("weights"):
            checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"],
                                              "encoder": {**encoder, "weights": None}}

    def configure_optimizers(self) -> Any:
        # the config's optimizer / scheduler nodes (train.py builds this module from model.module): a keyword or
        # value the class refuses is one line naming the node, not a traceback from inside fit
        optimizer = instantiate_partial("model.module.optimizer", self.hparams.optimizer, self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        interval = sched_cfg.pop("interval", "epoch")
        if sched_cfg.get("_target_", "").endswith("CosineAnnealingLR") and sched_cfg.get("T_max") is None:
            sched_cfg["T_max"] = max(1, self.trainer.max_epochs or 1)
        scheduler = instantiate_partial("model.module.scheduler", sched_cfg, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

