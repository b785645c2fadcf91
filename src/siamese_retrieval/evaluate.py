"""Evaluation behind `python evaluate.py`: a checkpoint (or the ORB+RANSAC baseline) on any dataset root.

    python evaluate.py ckpt_path=CKPT data=synth_tiny seed=3          # the training run's test split
    python evaluate.py ckpt_path=CKPT data=msls_city data.root=PATH split=all
    python evaluate.py method=orb_ransac data=synth_tiny              # the classical baseline
    python evaluate.py method=orb_bow data=synth_tiny                 # ORB bag of words (no geometry)
    python evaluate.py ckpt_path=CKPT rerank=orb_ransac rerank.top_n=20

`evaluate(cfg)` reads top-down: checkpoint (model + input builder, checkpoints.py) -> datamodule -> queries
of the split -> ranking (retrieval/ranking.py, the engine training logs its val/test metrics with, so the
same checkpoint, data config and seed give the same numbers) -> outputs. Writes into the run dir:
metrics.json, per_query.csv, recall_at_k.png, retrieval_grid.png.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.benchmarks import benchmark_data, benchmark_entries
from siamese_retrieval.checkpoints import LoadedCheckpoint, load_from_config
from siamese_retrieval.data.datamodule import (
    RetrievalDataModule,
    build_datamodule,
    evaluation_data_config,
)
from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.ground_truth import as_ground_truth
from siamese_retrieval.data.inputs import NoInputs
from siamese_retrieval.data.train_views import reference_training_set
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.io_utils import atomic_path
from siamese_retrieval.malloc_tuning import tune_malloc
from siamese_retrieval.models.pair_metrics import RangeAccuracy
from siamese_retrieval.models.siamese import SiameseModule
from siamese_retrieval.retrieval import orb_bow
from siamese_retrieval.retrieval.orb_ransac import score_matrix
from siamese_retrieval.retrieval.ranking import (
    Ranking,
    RankingSettings,
    rank_queries,
    rank_scores,
    ranking_grid,
)
from siamese_retrieval.retrieval.rerankers import (
    RerankSource,
    build_reranker,
    dataset_orb_features,
    orb_config,
)
from siamese_retrieval.retrieval.visualize import CURVE_K, plot_recall_curve, save_png
from siamese_retrieval.run_outputs import (
    print_results,
    provenance,
    quiet_known_warnings,
    run_dir,
    write_metrics_json,
)
from siamese_retrieval.wandb_runs import check_wandb_login, log_evaluation

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; write metrics.json, per_query.csv, recall_at_k.png, retrieval_grid.png; return metrics.json.
    With `benchmarks=[...]`: every benchmark (benchmarks.csv / .md); with `fit_only`: fit the re-ranker only."""
    started = time.perf_counter()
    tune_malloc()  # malloc_tuning.py: freed activations reused, not faulted in again every step
    quiet_known_warnings()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    check_wandb_login(cfg)
    out_dir = run_dir(cfg)
    if cfg.get("fit_only"):
        return fit_reranker(cfg, out_dir)
    ckpt = load_from_config(cfg) if str(cfg.method) == "model" else None
    if cfg.get("benchmarks"):
        return evaluate_benchmarks(cfg, ckpt, out_dir)
    return evaluate_dataset(cfg, ckpt, out_dir, started)


def evaluate_dataset(cfg: DictConfig, ckpt: LoadedCheckpoint | None, out_dir: Path, started: float,
                     log_run: bool = True) -> dict[str, Any]:
    """One dataset (cfg.data, cfg.split) ranked by the loaded checkpoint (or the baseline `method`); writes the
    run's files into `out_dir`; `log_run`: also log it to the configured loggers."""
    method, split = str(cfg.method), str(cfg.split)  # values checked with the whole config (configs/)
    settings = RankingSettings.from_config(cfg, keep_top=CURVE_K)
    target = ckpt.training_data.get("pairs_target") if ckpt is not None else None
    dm = build_datamodule(evaluation_data_config(cfg.data, target), ckpt.build_inputs() if ckpt else NoInputs())
    query_idx = load_split(dm, split)
    dataset = dm.dataset
    if ckpt is not None:
        warn_if_split_differs(cfg, ckpt, split)

    ranking_started = time.perf_counter()
    extra: dict[str, float] = {}
    reranker = None
    if method == "orb_bow":
        ranking = orb_bow_ranking(cfg, dm, query_idx, settings)
    elif ckpt is None:
        ranking = orb_ransac_ranking(cfg, dm, query_idx, settings)
    else:
        if cfg.get("rerank"):
            source = RerankSource(dataset, query_idx=query_idx, cache_dir=dm.cache_dir, orb=plain(cfg.orb_ransac),
                                  splits=dm.splits if split != "all" else None, split=split, log_dir=out_dir,
                                  reference=partial(reference_training_set, dm.cache_dir))
            reranker = build_reranker(plain(cfg.rerank), source)
        ranking = rank_queries(ckpt.module, dm.db_inputs, dm.q_inputs, query_idx, dataset, settings, reranker)
        if ranking.before_rerank is not None:
            extra = {f"before_rerank/{k}": v for k, v in ranking.before_rerank.items()}
        if hasattr(reranker, "verified_queries"):  # the share of queries verified (the rest: confident, skipped)
            extra["rerank/verified_fraction"] = reranker.verified_queries / max(1, len(query_idx))
        decisions = getattr(reranker, "decisions", None)
        if decisions is not None:  # rerank=fused: the share of queries it re-ranked (the rest abstained)
            extra["rerank/reranked_fraction"] = sum(d[0] for d in decisions.values()) / max(1, len(query_idx))
    rank_s = time.perf_counter() - ranking_started  # database embedding / feature extraction included
    if ckpt is not None:
        extra.update(pair_metrics(ckpt.module, dm, query_idx))

    metrics = {f"{split}/{k}": float(v) for k, v in {**ranking.metrics, **extra}.items()}
    result = {
        "status": "ok",
        "method": method if not cfg.get("rerank") else f"{method}+rerank_{cfg.rerank.name}",
        "model": ckpt.model_name if ckpt is not None else method,
        "data": cfg.data.name,
        "dataset_root": str(dataset.root),
        "split": split,
        "seed": int(cfg.seed),
        "checkpoint": str(ckpt.path) if ckpt is not None else None,
        "n_queries": int(len(query_idx)),
        "n_database": int(dataset.n_db),
        "seconds_per_query": rank_s / max(1, len(query_idx)),
        "ranking_s": round(rank_s, 4),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "metrics": dict(sorted(metrics.items())),
    }
    write_metrics_json(out_dir / "metrics.json", result)
    write_per_query_csv(out_dir / "per_query.csv", dataset, ranking,
                        decisions=getattr(reranker, "decisions", None))
    curves = plot_recall_curve(out_dir / "recall_at_k.png", ranking, truth=dataset,
                               title=f"{result['model']} on {result['data']} ({split})")
    save_png(out_dir / "retrieval_grid.png", ranking_grid(dataset, ranking, n_queries=int(cfg.grid.n_queries),
                                                          top_k=int(cfg.grid.top_k), seed=int(cfg.seed)))
    if not log_run:  # one benchmark of several: the benchmarks table logs and shows it
        return result
    # W&B (logger=none: nothing): job_type eval in the checkpoint's training group, or baseline
    log_evaluation(cfg, result, dataset, ranking, (curves["k"], curves["recall"]), out_dir / "retrieval_grid.png",
                   ckpt)
    print_results(result["metrics"], title=f"{result['method']} on {result['data']}", stages=(split,),
                  extra_rows=[("seconds/query", f"{result['seconds_per_query']:.4f}")],
                  caption=f"split {split}: {result['n_queries']} queries x {result['n_database']} database")
    return result


# ----------------------------------------------------------------------------------------- many benchmarks

BENCHMARK_SCORES = ("recall@1", "recall@5", "recall@10", "mAP")  # shown to 4 places, logged as numbers
BENCHMARK_COLUMNS = ("benchmark", "layout", "root", "queries", "database", "radius_m", *BENCHMARK_SCORES, "seconds",
                     "git_commit", "versions")


def evaluate_benchmarks(cfg: DictConfig, ckpt: LoadedCheckpoint | None, out_dir: Path,
                        write_summary: bool = True) -> dict[str, Any]:
    """Every `benchmarks` entry with the one loaded model, each on all its queries (split=all: data the model
    never saw), its run files in `<run>/benchmarks/<i>_<name>/`; one row each in benchmarks.csv / .md (and,
    with `write_summary`, metrics.json holding the rows)."""
    entries = benchmark_entries(cfg.benchmarks)  # every entry checked before anything runs
    rows, results = [], []
    for i, (label, name, root) in enumerate(entries):
        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        OmegaConf.set_struct(sub, False)
        sub.data, sub.split, sub.benchmarks = benchmark_data(name, root), "all", []
        sub_dir = out_dir / "benchmarks" / f"{i}_{name}"
        sub_dir.mkdir(parents=True, exist_ok=True)
        result = evaluate_dataset(sub, ckpt, sub_dir, time.perf_counter(), log_run=False)
        m = result["metrics"]
        options = OmegaConf.select(sub, "data.layout_options", default=None) or {}
        rows.append({"benchmark": label, "layout": str(sub.data.get("layout", "contract")), "root": root,
                     "queries": result["n_queries"], "database": result["n_database"],
                     "radius_m": options.get("radius_m"), "recall@1": m.get("all/recall@1"),
                     "recall@5": m.get("all/recall@5"), "recall@10": m.get("all/recall@10"),
                     "mAP": m.get("all/mAP", m.get(f"all/mAP@{cfg.search_k}")), "seconds": result["elapsed_s"]})
        results.append(result)
    prov = provenance()  # what produced the numbers, on every row (a row may be copied out of its table)
    versions = ";".join(f"{k}={v}" for k, v in prov["versions"].items())
    commit = (prov["git_commit"] or "") + ("+dirty" if prov["git_dirty"] else "")
    for r in rows:
        r.update(git_commit=commit, versions=versions)
    write_benchmark_tables(out_dir, rows)
    summary = {"status": "ok", "benchmarks": rows, "model": results[0]["model"] if results else None,
               "checkpoint": str(ckpt.path) if ckpt is not None else None}
    if write_summary:
        write_metrics_json(out_dir / "metrics.json", summary)
    log_benchmarks(cfg, rows, ckpt)
    print_benchmarks(rows, title=f"{summary['model']} on {len(rows)} benchmark(s)")
    return summary


def benchmark_trained(train_cfg: DictConfig, checkpoint: str, out_dir: Path) -> list[dict[str, Any]]:
    """`train.py benchmarks=[...]`: the best checkpoint on every benchmark after fitting, as `evaluate.py
    ckpt_path=BEST benchmarks=[...]` would (eval.yaml's ranking settings, the run's seed, logger and trust),
    written into the training run: benchmarks.csv / .md and benchmarks/<i>_<name>/. Returns the rows."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"ckpt_path={checkpoint}", f"seed={int(train_cfg.seed)}"]
    if not GlobalHydra.instance().is_initialized():
        raise ConfigError("benchmarks after training run from the train.py command (a Hydra app)")
    cfg = compose(config_name="eval", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.benchmarks = list(train_cfg.benchmarks)
    cfg.logger, cfg.trust, cfg.imports = train_cfg.get("logger"), train_cfg.get("trust"), train_cfg.get("imports")
    cfg.paths = train_cfg.paths
    ckpt = load_from_config(cfg)
    return evaluate_benchmarks(cfg, ckpt, out_dir, write_summary=False)["benchmarks"]


def benchmark_cell(column: str, v: Any) -> str:
    """Recalls and mAP to 4 places, other numbers as short as they go, None as nothing."""
    return f"{v:.4f}" if column in BENCHMARK_SCORES and isinstance(v, float) else \
        f"{v:g}" if isinstance(v, float) else "" if v is None else str(v)


def write_benchmark_tables(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """benchmarks.csv (numbers as they are) and benchmarks.md (benchmark_cell), written atomically."""
    with atomic_path(out_dir / "benchmarks.csv", suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(BENCHMARK_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    columns = BENCHMARK_COLUMNS[:-2]  # the provenance columns stay in the csv
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(benchmark_cell(c, r[c]) for c in columns) + " |" for r in rows]
    with atomic_path(out_dir / "benchmarks.md", suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def print_benchmarks(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    shown = [c for c in BENCHMARK_COLUMNS[:-2] if c != "root"]
    for c in shown:
        table.add_column(c, justify="left" if c in ("benchmark", "layout") else "right")
    for r in rows:
        table.add_row(*(benchmark_cell(c, r[c]) for c in shown))
    Console(width=max(100, 14 * len(shown))).print(table)


def log_benchmarks(cfg: DictConfig, rows: list[dict[str, Any]], ckpt: LoadedCheckpoint | None) -> None:
    """The benchmarks table in the configured loggers: W&B gets it as a table, every logger its numbers."""
    result = {"method": str(cfg.method), "model": ckpt.model_name if ckpt is not None else str(cfg.method),
              "data": "benchmarks", "split": "all",
              "metrics": {f"{r['benchmark']}/{k}": float(r[k]) for r in rows for k in BENCHMARK_SCORES
                          if isinstance(r[k], float)}}
    log_evaluation(cfg, result, None, None, None, None, ckpt, table=("benchmarks", list(BENCHMARK_COLUMNS),
                                                                     [[r[c] for c in BENCHMARK_COLUMNS] for r in rows]))


def fit_reranker(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """`fit_only=true`: fit the rerank= re-ranker on the dataset's training split and cache it, nothing else
    (no checkpoint needed): the explicit command for what a first evaluation would otherwise do on the way."""
    if not cfg.get("rerank"):
        raise ConfigError("fit_only=true fits the rerank= re-ranker; name one, e.g. rerank=learned_matches")
    split = "test" if str(cfg.split) == "all" else str(cfg.split)
    dm = build_datamodule(evaluation_data_config(cfg.data, None), NoInputs())
    query_idx = load_split(dm, split)
    source = RerankSource(dm.dataset, query_idx=query_idx, cache_dir=dm.cache_dir, orb=plain(cfg.orb_ransac),
                          splits=dm.splits, split=split, log_dir=out_dir)
    build_reranker(plain(cfg.rerank), source)
    log.info("rerank=%s fitted on the training split of %s and cached in %s (training log: %s)", cfg.rerank.name,
             dm.dataset.root, dm.cache_dir, out_dir)
    return {"status": "fitted", "rerank": str(cfg.rerank.name), "data": str(cfg.data.name)}


# ----------------------------------------------------------------------------------------- model and data


def load_split(dm: RetrievalDataModule, split: str) -> np.ndarray:
    """Set the datamodule up and return the split's query indices. `all` needs no place split."""
    dm.prepare_data()
    if split == "all":  # a dataset the model never saw: every query, no place split (may have one place)
        dm.setup_unsplit()
        return np.arange(dm.dataset.n_query, dtype=np.int64)
    dm.setup("test")
    query_idx = dm.splits.queries(split)
    if not len(query_idx):
        raise ConfigError(f"split {split!r} of {dm.dataset.root} has no queries (use split=all)")
    return query_idx


def warn_if_split_differs(cfg: DictConfig, ckpt: LoadedCheckpoint, split: str) -> None:
    trained = ckpt.training_data
    if split == "all" or not trained:
        return
    if trained.get("name") != cfg.data.name or trained.get("seed") != cfg.seed:
        log.warning("split=%s of data=%s seed=%s, but the checkpoint was trained on data=%s seed=%s: "
                    "this is not the training run's %s split", split, cfg.data.name, cfg.seed,
                    trained.get("name"), trained.get("seed"), split)


# ----------------------------------------------------------------------------------------- rankings


def orb_ransac_ranking(cfg: DictConfig, dm: RetrievalDataModule, query_idx: np.ndarray,
                       settings: RankingSettings) -> Ranking:
    """The classical baseline: every query verified against the full database, score = inlier count."""
    orb_cfg, workers = orb_config(plain(cfg.orb_ransac))
    db_feats, q_feats = dataset_orb_features(orb_cfg, workers, dm.dataset, dm.cache_dir)
    scores = score_matrix([q_feats[i] for i in query_idx], db_feats, orb_cfg, workers)
    return rank_scores(scores, query_idx, dm.dataset, settings)


def orb_bow_ranking(cfg: DictConfig, dm: RetrievalDataModule, query_idx: np.ndarray,
                    settings: RankingSettings) -> Ranking:
    """The non-learned keypoint baseline (retrieval/orb_bow.py): the same ORB features as orb_ransac, a bag of
    binary words with idf fitted on the TRAINING images only (train queries + train-place database images;
    split=all: the database), tf-idf histograms searched by cosine over the full database."""
    try:
        bow_cfg = orb_bow.BowConfig(**OmegaConf.to_container(cfg.orb_bow, resolve=True))
    except TypeError as exc:  # an unknown or missing key (a bad value: the schema's ConfigError)
        raise ConfigError(f"orb_bow: {exc}") from None
    orb_cfg, workers = orb_config(plain(cfg.orb_ransac))
    db_feats, q_feats = dataset_orb_features(orb_cfg, workers, dm.dataset, dm.cache_dir)
    dataset = dm.dataset
    train_db, train_q = orb_bow.training_images(dm.splits, dataset.n_db)
    key = {"fingerprint": dataset.fingerprint, "orb": dataclasses.asdict(orb_cfg),
           "images": [dataset.db_paths[i] for i in train_db] + [dataset.q_paths[i] for i in train_q]}
    vocab = orb_bow.cached_vocabulary([db_feats[i] for i in train_db] + [q_feats[i] for i in train_q], key, bow_cfg,
                                      dm.cache_dir)
    log.info("ORB bag of words: %d words fitted on %d training images (%d database, %d queries)", vocab.size,
             vocab.n_images, len(train_db), len(train_q))
    return orb_bow.rank_bow(vocab.encode(db_feats), vocab.encode([q_feats[i] for i in query_idx]), query_idx,
                            dataset, settings)


@torch.inference_mode()
def pair_metrics(module: SiameseModule, dm: RetrievalDataModule, query_idx: np.ndarray) -> dict[str, float]:
    """range_acc and loss over the split's evaluation pairs: the very batches training's test step uses."""
    acc = RangeAccuracy(float(module.hparams.range_margin))
    loss_sum, n_sum = 0.0, 0
    for batch in dm.eval_batches(query_idx):
        batch = {k: ({n: t.to(module.device) for n, t in v.items()} if isinstance(v, dict) else v.to(module.device))
                 for k, v in batch.items()}
        out = module.pair_output(batch)
        acc.update(out.score.cpu(), out.target.cpu())
        loss_sum += float(module.compute_loss(out)) * len(out.score)
        n_sum += len(out.score)
    if not n_sum:
        return {}
    return {module.range_key: float(acc.compute()), "loss": loss_sum / n_sum}


def plain(node: Any) -> Any:
    """A config node as plain python (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


# ----------------------------------------------------------------------------------------- outputs


def write_per_query_csv(path: Path, dataset: RetrievalDataset, ranking: Ranking, k: int = 10,
                        decisions: dict[int, tuple[bool, str]] | None = None) -> None:
    """One row per query: query, first_positive_rank (0 = no positive in the database), precision@10, top_1..top_k;
    with a re-ranker's `decisions` (by row) also whether the query was re-ranked and why."""
    k = min(k, ranking.top_ids.shape[1])
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["query", "first_positive_rank", "precision@10", *(f"top_{j + 1}" for j in range(k)),
                             *(["reranked", "why"] if decisions is not None else [])])
            relevant, _ = as_ground_truth(dataset).lookup(ranking.query_idx, ranking.top_ids[:, :10])  # one lookup
            for i, q in enumerate(ranking.query_idx):
                top = ranking.top_ids[i, :k]
                precision = float(relevant[i].sum()) / 10.0
                decision = None if decisions is None else decisions.get(i, (False, "not verified"))
                decided = [] if decision is None else [int(decision[0]), decision[1]]
                writer.writerow([dataset.q_paths[int(q)], int(ranking.first_positive_rank[i]), f"{precision:.4f}",
                                 *(dataset.db_paths[int(j)] for j in top), *decided])
