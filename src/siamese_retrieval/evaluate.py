"""Evaluation behind `python evaluate.py`: a checkpoint (or the ORB+RANSAC baseline) on any dataset root.

    python evaluate.py ckpt_path=CKPT data=synth_tiny seed=3          # the training run's test split
    python evaluate.py ckpt_path=CKPT data=msls_city data.root=PATH split=all
    python evaluate.py method=orb_ransac data=synth_tiny              # the classical baseline
    python evaluate.py ckpt_path=CKPT rerank=orb_ransac rerank.top_n=20

`evaluate(cfg)` reads top-down: model -> datamodule -> queries of the split -> ranking -> outputs.
The learned ranking is `callbacks.rank_embeddings`, the very function training logs its val/test metrics
with, so the same checkpoint, data config and seed give the same numbers. Writes into the run dir:
metrics.json, per_query.csv, recall_at_k.png, retrieval_grid.png.

Which input builder (keypoints or images, n_keypoints, image size) the checkpoint needs: the
checkpoint holds the encoder config but not the input builder's, so it comes from, in order,
  1. `model=NAME` given on the command line (conf/model/NAME.yaml, overridable as usual);
  2. the training run's saved config, `<run dir>/.hydra/config.yaml` two levels above the checkpoint
     (exactly what training used, overrides included), when its model name matches the checkpoint's;
  3. conf/model/<hparams.model_name>.yaml.
A keypoint encoder's `n_keypoints` always wins over the builder's (they must agree).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from siamese_retrieval.callbacks import Ranking, RankingBuilder, embed_all, rank_embeddings, ranking_grid
from siamese_retrieval.data.dataset import RetrievalDataset, read_dataset
from siamese_retrieval.data.inputs import Tensors, take
from siamese_retrieval.data.datamodule import make_recipe
from siamese_retrieval.data.pairs import PairRecipe, eval_pairs
from siamese_retrieval.errors import ConfigError, UserError
from siamese_retrieval.io_utils import atomic_path
from siamese_retrieval.models.siamese import SiameseModule, load_checkpoint
from siamese_retrieval.retrieval.index import IndexConfig
from siamese_retrieval.retrieval.metrics import RangeAccuracy
from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig, cached_features, rerank_scores, score_matrix
from siamese_retrieval.retrieval.visualize import save_png
from siamese_retrieval.run_utils import quiet_known_warnings, run_dir, write_metrics_json
from siamese_retrieval.train import build_datamodule

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")
METHODS = ("model", "orb_ransac")
CURVE_K = 25


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; write metrics.json, per_query.csv, recall_at_k.png, retrieval_grid.png; return metrics.json."""
    started = time.perf_counter()
    quiet_known_warnings()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    method, split = str(cfg.method), str(cfg.split)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    out_dir = run_dir(cfg)

    module = load_module(cfg.ckpt_path, cfg.get("device", "auto"), model_name(cfg)) if method == "model" else None
    cfg = with_model_config(cfg, module)
    dm = build_datamodule(cfg)
    dataset, db_inputs, q_inputs, query_idx = load_split(dm, split)
    warn_if_split_differs(cfg, split)

    ranking_started = time.perf_counter()
    extra: dict[str, float] = {}
    if method == "orb_ransac":
        ranking = orb_ransac_ranking(cfg, dm, dataset, query_idx)
    else:
        db_emb = embed_all(module, db_inputs, int(cfg.embed_batch))  # the database, embedded once
        q_emb = embed_all(module, take(q_inputs, query_idx), int(cfg.embed_batch))
        ranking = rank_embeddings(module, db_emb, q_emb, query_idx, dataset.sim, dataset.fov,
                                  top_ks=tuple(cfg.top_ks), ndcg_k=int(cfg.ndcg_k), keep_top=CURVE_K,
                                  index_cfg=full_ranking_index(cfg, module))
        if cfg.get("rerank"):
            extra = {f"before_rerank/{k}": v for k, v in ranking.metrics.items()}
            ranking = reranked(cfg, module, dm, dataset, db_emb, q_emb, query_idx)
    rank_s = time.perf_counter() - ranking_started  # database embedding / feature extraction included
    if module is not None:
        extra.update(pair_metrics(module, dm, dataset, db_inputs, q_inputs, query_idx))

    prefix = "all" if split == "all" else split
    metrics = {f"{prefix}/{k}": float(v) for k, v in {**ranking.metrics, **extra}.items()}
    result = {
        "status": "ok",
        "method": method if not cfg.get("rerank") else f"{method}+rerank_{cfg.rerank.name}",
        "model": module.hparams.model_name if module is not None else method,
        "data": cfg.data.name,
        "dataset_root": str(dataset.root),
        "split": split,
        "seed": int(cfg.seed),
        "checkpoint": str(cfg.ckpt_path) if module is not None else None,
        "n_queries": int(len(query_idx)),
        "n_database": int(dataset.n_db),
        "seconds_per_query": rank_s / max(1, len(query_idx)),
        "ranking_s": round(rank_s, 4),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "metrics": dict(sorted(metrics.items())),
    }
    write_metrics_json(out_dir / "metrics.json", result)
    write_per_query_csv(out_dir / "per_query.csv", dataset, ranking)
    plot_recall_curve(out_dir / "recall_at_k.png", ranking, title=f"{result['model']} on {result['data']} ({split})")
    write_grid(out_dir / "retrieval_grid.png", dataset, ranking, n_queries=int(cfg.grid.n_queries),
               top_k=int(cfg.grid.top_k), seed=int(cfg.seed))
    print_eval(result, prefix)
    return result


# ----------------------------------------------------------------------------------------- model


def load_module(ckpt_path: str | None, device: str = "auto", expected_model: str | None = None) -> SiameseModule:
    """The checkpoint's SiameseModule in eval mode; `model=NAME` must match the model it holds."""
    if ckpt_path in (None, ""):
        raise UserError("ckpt_path: no checkpoint given (ckpt_path=PATH/TO.ckpt, or method=orb_ransac)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_checkpoint(Path(str(ckpt_path)).expanduser(), expected_model, map_location=device).eval()


def model_name(cfg: DictConfig) -> str | None:
    """The model the user named (model=NAME), which the checkpoint must hold; None to take the checkpoint's."""
    return str(cfg.model.name) if cfg.get("model") is not None and cfg.model.get("name") else None


def training_config(ckpt_path: str | os.PathLike) -> DictConfig | None:
    """The training run's saved Hydra config (`<run>/.hydra/config.yaml` for `<run>/checkpoints/x.ckpt`)."""
    saved = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    try:
        return OmegaConf.load(saved)
    except Exception as exc:  # noqa: BLE001 - a damaged file only loses the convenience
        log.warning("could not read the training config %s (%s); using conf/model/", saved, exc)
        return None


def with_model_config(cfg: DictConfig, module: SiameseModule | None) -> DictConfig:
    """cfg with a `model` node (see the module docstring for where it comes from)."""
    model_cfg = cfg.get("model")
    if module is None:  # the baseline needs no encoder; the datamodule still wants an input builder
        if model_cfg is None:
            model_cfg = load_model_yaml(cfg, "keypoint_snn")
    else:
        name = str(module.hparams.get("model_name", ""))
        if model_cfg is None:
            trained = training_config(cfg.ckpt_path)
            if trained is not None and trained.get("model") is not None and trained.model.get("name") == name:
                model_cfg = trained.model
                log.info("input builder from the training run's config (%s)", Path(cfg.ckpt_path).parent.parent)
            else:
                model_cfg = load_model_yaml(cfg, name)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model = model_cfg
        encoder = module.hparams.get("encoder", {}) if module is not None else {}
        if "n_keypoints" in encoder and "n_keypoints" in cfg.model.inputs:
            cfg.model.inputs.n_keypoints = int(encoder["n_keypoints"])
    return cfg


def load_model_yaml(cfg: DictConfig, name: str) -> DictConfig:
    path = Path(str(cfg.paths.root_dir)) / "conf" / "model" / f"{name}.yaml"
    if not name or not path.is_file():
        raise UserError(
            f"the checkpoint's model {name!r} has no config at {path}: pass model=NAME (a conf/model/ entry) "
            f"to say which input builder it was trained with"
        )
    return OmegaConf.load(path)


def full_ranking_index(cfg: DictConfig, module: SiameseModule) -> IndexConfig:
    """The configured index, probing every list: full-ranking metrics need every database item scored."""
    idx = dict(OmegaConf.to_container(cfg.index, resolve=True))
    idx["metric"] = "ip" if getattr(module, "distance_kind", "euclidean") == "cosine" else "l2"
    if idx.get("kind", "flat") != "flat":
        log.warning("index.kind=%s: probing all lists (mAP and recall@k rank the whole database); the "
                    "ranking still uses its approximate distances", idx["kind"])
        idx["nprobe"] = 1 << 30
    return IndexConfig(**idx)


# ----------------------------------------------------------------------------------------- data


def load_split(dm: Any, split: str) -> tuple[RetrievalDataset, Tensors, Tensors, np.ndarray]:
    """(dataset, database inputs, query inputs, the split's query indices). `all` needs no split."""
    if split == "all":  # a dataset the model never saw: every query, no place split (may have one place)
        dataset = read_dataset(dm.resolve_root(), dm.files, check=dm.image_check, name=dm.name)
        db_inputs, q_inputs = dm.inputs.build(dataset, dm.cache_dir)
        return dataset, db_inputs, q_inputs, np.arange(dataset.n_query, dtype=np.int64)
    dm.prepare_data()
    dm.setup("test")
    query_idx = dm.split_queries(split)
    if not len(query_idx):
        raise ConfigError(f"split {split!r} of {dm.dataset.root} has no queries (use split=all)")
    return dm.dataset, dm.db_inputs, dm.q_inputs, query_idx


def warn_if_split_differs(cfg: DictConfig, split: str) -> None:
    if split == "all" or not cfg.get("ckpt_path"):
        return
    trained = training_config(cfg.ckpt_path)
    if trained is None or trained.get("data") is None:
        return
    same = trained.data.get("name") == cfg.data.name and trained.get("seed") == cfg.seed
    if not same:
        log.warning("split=%s of data=%s seed=%s, but the checkpoint was trained on data=%s seed=%s: "
                    "this is not the training run's %s split", split, cfg.data.name, cfg.seed,
                    trained.data.get("name"), trained.get("seed"), split)


# ----------------------------------------------------------------------------------------- rankings


def ranking_from_scores(scores: np.ndarray, query_idx: np.ndarray, sim: np.ndarray, fov: np.ndarray,
                        top_ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10, keep_top: int = CURVE_K,
                        chunk: int = 256) -> Ranking:
    """A `Ranking` from a dense (m, n_db) score matrix (higher = more relevant), metrics as in training."""
    builder = RankingBuilder(query_idx, sim, fov, top_ks, ndcg_k, keep_top)
    for start in range(0, len(query_idx), chunk):
        builder.add(query_idx[start : start + chunk],
                    torch.from_numpy(np.ascontiguousarray(scores[start : start + chunk], np.float32)))
    return builder.result()


def orb_config(cfg: DictConfig) -> tuple[OrbRansacConfig, int]:
    params = dict(OmegaConf.to_container(cfg.orb_ransac, resolve=True))
    workers = int(params.pop("workers", 2))
    try:
        return OrbRansacConfig(**params), workers
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"orb_ransac: {exc}") from None


def dataset_orb_features(cfg: DictConfig, dm: Any, dataset: RetrievalDataset):
    orb_cfg, workers = orb_config(cfg)
    files = [dataset.root / p for p in dataset.db_paths + dataset.q_paths]
    feats = cached_features(files, {"fingerprint": dataset.fingerprint}, orb_cfg, dm.cache_dir, workers)
    return feats[: dataset.n_db], feats[dataset.n_db :], orb_cfg, workers


def orb_ransac_ranking(cfg: DictConfig, dm: Any, dataset: RetrievalDataset, query_idx: np.ndarray) -> Ranking:
    """The classical baseline: every query verified against the full database, score = inlier count."""
    db_feats, q_feats, orb_cfg, workers = dataset_orb_features(cfg, dm, dataset)
    scores = score_matrix([q_feats[i] for i in query_idx], db_feats, orb_cfg, workers)
    return ranking_from_scores(scores, query_idx, dataset.sim, dataset.fov, tuple(cfg.top_ks), int(cfg.ndcg_k))


def reranked(cfg: DictConfig, module: SiameseModule, dm: Any, dataset: RetrievalDataset, db_emb: torch.Tensor,
             q_emb: torch.Tensor, query_idx: np.ndarray) -> Ranking:
    """The model's top-N re-ordered by inlier count (ties: model score); the rest keeps the model's order.

    Score = 1 + inliers + model relevance/2 for the top-N (relevance lies in [0, 1]), model relevance
    below: the top-N stays above the rest, inliers decide within it.
    """
    top_n = int(cfg.rerank.top_n)
    if top_n < 1:
        raise ConfigError(f"rerank.top_n must be >= 1, got {top_n}")
    with torch.inference_mode():
        relevance = module.cross_scores(q_emb.to(module.device), db_emb.to(module.device)).float().cpu().numpy()
    top_n = min(top_n, dataset.n_db)
    candidates = np.argsort(-relevance, axis=1, kind="stable")[:, :top_n]
    db_feats, q_feats, orb_cfg, workers = dataset_orb_features(cfg, dm, dataset)
    inliers = rerank_scores(candidates, [q_feats[i] for i in query_idx], db_feats, orb_cfg, workers)
    scores = relevance.copy()
    rows = np.arange(len(query_idx))[:, None]
    scores[rows, candidates] = 1.0 + inliers + relevance[rows, candidates] / 2.0
    return ranking_from_scores(scores, query_idx, dataset.sim, dataset.fov, tuple(cfg.top_ks), int(cfg.ndcg_k))


@torch.inference_mode()
def pair_metrics(module: SiameseModule, dm: Any, dataset: RetrievalDataset, db_inputs: Tensors, q_inputs: Tensors,
                 query_idx: np.ndarray) -> dict[str, float]:
    """range_acc and loss over the split's evaluation pairs: the pairs and batches training's test step uses
    (the study's recipe over the whole database, drawn with the data seed)."""
    recipe = PairRecipe.study(target=make_recipe(dm.pairs_cfg).target)
    sim, fov = dataset.sim, dataset.fov
    q, d, target = eval_pairs(sim, fov, query_idx, recipe, seed=dm.seed)
    if not len(q):
        return {}
    acc = RangeAccuracy(float(module.hparams.range_margin))
    loss_sum, n_sum = 0.0, 0
    batch = int(dm.eval_batch_size)
    for start in range(0, len(q), batch):
        sl = slice(start, start + batch)
        qi, di = q[sl], d[sl]
        to = lambda t: {k: v.to(module.device) for k, v in t.items()}  # noqa: E731
        pair_batch = {
            "q": to(take(q_inputs, qi)), "d": to(take(db_inputs, di)),
            "target": torch.from_numpy(np.asarray(target[sl], np.float32)).to(module.device),
            "fov": torch.from_numpy(fov[qi, di].astype(np.float32)).to(module.device),
            "q_idx": torch.from_numpy(qi), "d_idx": torch.from_numpy(di),
        }
        out = module.pair_output(pair_batch)
        acc.update(out.score.cpu(), out.target.cpu())
        loss_sum += float(module.compute_loss(out)) * len(qi)
        n_sum += len(qi)
    return {module.range_key: float(acc.compute()), "loss": loss_sum / n_sum}


# ----------------------------------------------------------------------------------------- outputs


def write_per_query_csv(path: Path, dataset: RetrievalDataset, ranking: Ranking, k: int = 10) -> None:
    """One row per query: query, first_positive_rank (0 = no positive in the database), precision@10, top_1..top_k."""
    k = min(k, ranking.top_ids.shape[1])
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["query", "first_positive_rank", "precision@10", *(f"top_{j + 1}" for j in range(k))])
            for i, q in enumerate(ranking.query_idx):
                top = ranking.top_ids[i, :k]
                precision = float(dataset.sim[q, ranking.top_ids[i, :10]].sum()) / 10.0
                writer.writerow([dataset.q_paths[int(q)], int(ranking.first_positive_rank[i]), f"{precision:.4f}",
                                 *(dataset.db_paths[int(j)] for j in top)])


def recall_curve(ranking: Ranking, max_k: int = CURVE_K) -> tuple[np.ndarray, np.ndarray]:
    """(k = 1..max_k, recall@k) over the queries that have a positive."""
    ks = np.arange(1, max_k + 1)
    ranks = ranking.first_positive_rank[ranking.first_positive_rank > 0]
    if not len(ranks):
        return ks, np.full(len(ks), np.nan)
    return ks, (ranks[None, :] <= ks[:, None]).mean(axis=1)


def plot_recall_curve(path: Path, ranking: Ranking, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, recall = recall_curve(ranking)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(ks, recall, marker="o", markersize=3)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, ks[-1])
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_grid(path: Path, dataset: RetrievalDataset, ranking: Ranking, n_queries: int = 6, top_k: int = 5,
               seed: int = 0) -> None:
    save_png(path, ranking_grid(dataset, ranking, n_queries, top_k, seed))


def print_eval(result: dict[str, Any], prefix: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from siamese_retrieval.run_utils import SHOWN_METRICS

    table = Table(title=f"{result['method']} on {result['data']}",
                  caption=f"split {result['split']}: {result['n_queries']} queries x {result['n_database']} database")
    table.add_column("metric")
    table.add_column(prefix, justify="right")
    for name in SHOWN_METRICS:
        value = result["metrics"].get(f"{prefix}/{name}")
        if value is not None:
            table.add_row(name, f"{value:.4f}")
    table.add_row("seconds/query", f"{result['seconds_per_query']:.4f}")
    Console().print(table)
