"""SiameseModule: shared encoder -> embeddings -> distance -> relevance head, with a configurable loss.

Constructed from plain config dicts (Hydra `_target_` nodes), which it instantiates itself: the
checkpoint then holds only primitives and loads under torch's `weights_only=True` default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.errors import UserError
from siamese_retrieval.models.heads import RelevanceHead, cross_distance, pair_distance
from siamese_retrieval.models.losses import PairOutput
from siamese_retrieval.retrieval.metrics import RangeAccuracy

Batch = dict[str, Any]


def plain(cfg: Any) -> Any:
    """DictConfig -> plain dict (checkpoints must not pickle OmegaConf objects)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


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
            }
        )
        self.encoder = instantiate(self.hparams.encoder)
        self.head = RelevanceHead(**self.hparams.head)
        self.loss_fn = instantiate(self.hparams.loss)
        self.distance_kind = distance
        self.val_range_acc = RangeAccuracy(range_margin)
        self.test_range_acc = RangeAccuracy(range_margin)
        self.range_key = f"range_acc@{range_margin:g}"

    # ------------------------------------------------------------------ the network
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(inputs)

    def score_distances(self, distance: torch.Tensor) -> torch.Tensor:
        """Relevance in [0, 1] from a distance (any shape); what retrieval ranks by."""
        return torch.sigmoid(self.head.logits(distance.reshape(-1)).reshape(distance.shape))

    def cross_scores(self, q_emb: torch.Tensor, db_emb: torch.Tensor) -> torch.Tensor:
        return self.score_distances(cross_distance(q_emb, db_emb, self.distance_kind))

    def forward(self, q: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_output({"q": q, "d": d, "target": None, "fov": None}).score

    def pair_output(self, batch: Batch) -> PairOutput:
        emb_q, emb_d = self.embed(batch["q"]), self.embed(batch["d"])
        distance = pair_distance(emb_q, emb_d, self.distance_kind)
        logits = self.head.logits(distance)
        return PairOutput(emb_q, emb_d, distance, logits, torch.sigmoid(logits), batch["target"], batch["fov"],
                          q_idx=batch.get("q_idx"), d_idx=batch.get("d_idx"), cross_fov=batch.get("cross_fov"),
                          head_logits_detached=self.head.logits(distance.detach()))

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

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer, _partial_=True)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        interval = sched_cfg.pop("interval", "epoch")
        if sched_cfg.get("_target_", "").endswith("CosineAnnealingLR") and sched_cfg.get("T_max") is None:
            sched_cfg["T_max"] = max(1, self.trainer.max_epochs or 1)
        scheduler = instantiate(sched_cfg, _partial_=True)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def load_checkpoint(
    path: str | Path, expected_model: str | None = None, map_location: str | torch.device = "cpu"
) -> SiameseModule:
    """A SiameseModule from a Lightning checkpoint (loaded with weights_only=True), checked before it is built.

    Raises UserError naming the file when it is missing, is not a torch checkpoint, is not a SiameseModule
    checkpoint, or holds another model than `expected_model` (the checkpoint's `model_name`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip/pickle/unpickler errors have no common base class
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is not a loadable torch checkpoint ({first_line[:200]})") from None
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or "state_dict" not in raw or not isinstance(hparams, dict) or "encoder" not in hparams:
        raise UserError(f"checkpoint {path} is not a SiameseModule checkpoint (no hyper_parameters.encoder / state_dict)")
    found = hparams.get("model_name", "?")
    if expected_model is not None and found != expected_model:
        raise UserError(f"checkpoint {path} holds model_name={found!r}, expected {expected_model!r}")
    try:
        return SiameseModule.load_from_checkpoint(path, map_location=map_location)
    except (RuntimeError, KeyError, TypeError) as exc:  # state_dict / hparams that no longer fit the code
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} (model_name={found!r}) does not fit this code: {first_line[:300]}") from None
