"""Search engine behind `python retrieve.py`: rank a dataset's database for one image or a folder of images.

    python retrieve.py ckpt_path=CKPT query=photo.jpg top_k=10 [data=msls_city data.root=PATH] [output=json]

`retrieve(cfg)` reads top-down: checkpoint (model + input builder, checkpoints.py) -> database index
(embedded once, then cached under `index_cache_dir` = ${paths.cache_dir}/index/, see
retrieval/embedding_cache.py) -> query embeddings -> top-k -> stdout (a table, or JSON with output=json;
logs go to stderr) and a grid PNG `<grid.dir>/retrieval_grid-<query name>.png` (grid.dir=null: none).
A call creates no run folder: conf/retrieve.yaml runs it in the fixed folder ${paths.log_dir}/retrieve/
without .hydra/ or a log file. Relevance scores are the model's head on the embedding distance, as in training.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.checkpoints import load_from_config
from siamese_retrieval.data.datamodule import build_datamodule, evaluation_data_config
from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.train_views import reference_training_set
from siamese_retrieval.errors import UserError
from siamese_retrieval.models.embedding import embed_all
from siamese_retrieval.retrieval.embedding_cache import cached_database_index
from siamese_retrieval.retrieval.ranking import (
    RankingSettings,
    canonical_order,
    index_config,
    search_relevance,
)
from siamese_retrieval.retrieval.rerankers import RerankSource, build_reranker
from siamese_retrieval.retrieval.visualize import retrieval_grid, save_png
from siamese_retrieval.run_outputs import check_writable_dir, quiet_known_warnings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def retrieve(cfg: DictConfig) -> dict[str, Any]:
    """Rank the database for each query image; print the results; write the grid. Returns what JSON prints."""
    started = time.perf_counter()
    quiet_known_warnings()
    output, top_k = str(cfg.output), int(cfg.top_k)  # values checked with the whole config (configs/)
    query_files = find_queries(cfg.get("query"))
    grid_dir = None if cfg.grid.get("dir") in (None, "") else Path(str(cfg.grid.dir))
    if grid_dir is not None:
        check_writable_dir(grid_dir)  # before any work: an unwritable place is one line
    ckpt = load_from_config(cfg)
    module = ckpt.module
    settings = RankingSettings.from_config(cfg)

    dm = build_datamodule(evaluation_data_config(cfg.data), ckpt.build_inputs())
    dm.prepare_data()
    dataset = dm.read(check="none")  # the cache key; validated on a miss
    index_cfg = index_config(module.distance.faiss_metric, settings, full_ranking=False)

    def embed_database() -> np.ndarray:
        db_inputs, _ = dm.inputs.build(dm.read(check=dm.image_check), dm.cache_dir)
        return module.distance.for_index(embed_all(module, db_inputs, settings.embed_batch)).numpy()

    # the queries first: a query that cannot be read fails before the database is embedded, and their dimension is
    # the checkpoint's, which a cached index must have (a damaged or foreign one is rebuilt, never searched)
    query_started = time.perf_counter()
    q_emb = embed_all(module, query_inputs(dm.inputs, query_files), settings.embed_batch)
    query_s = time.perf_counter() - query_started
    db = cached_database_index(cfg.index_cache_dir, ckpt.path, dataset, ckpt.inputs_cfg, index_cfg, embed_database,
                               bool(cfg.cache), dim=int(q_emb.shape[1]))
    log.info("database index: %d images, %s in %.3f s", dataset.n_db, "cache hit" if db.hit else "embedded", db.seconds)

    search_started = time.perf_counter() - query_s  # search_s: the queries' embedding and their search
    if top_k > db.index.ntotal:
        log.warning("top_k=%d is larger than the database (%d images): showing all %d", top_k, db.index.ntotal,
                    db.index.ntotal)
        top_k = int(db.index.ntotal)
    rerank = OmegaConf.to_container(cfg.rerank, resolve=True) if cfg.get("rerank") else None
    k = min(max(top_k, int(rerank.get("top_n", top_k))), int(db.index.ntotal)) if rerank else top_k
    ids, distance, scores = search_relevance(module, db.index, q_emb, k=k)
    ids, scores, distance, rerank_scores, decisions = rerank_top(ids, scores, distance, rerank, dataset, query_files,
                                                                 dm.cache_dir, cfg.get("orb_ransac"))
    ids, scores, distance = ids[:, :top_k], scores[:, :top_k], distance[:, :top_k]
    search_s = time.perf_counter() - search_started

    results = [
        {
            "query": str(qf),
            "results": [
                {"rank": r + 1, "path": dataset.db_paths[int(j)], "file": str(dataset.db_file(int(j))),
                 "score": float(scores[i, r]), "distance": float(distance[i, r]),
                 **({"rerank_score": float(rerank_scores[i, r])} if rerank_scores is not None else {})}
                for r, j in enumerate(ids[i]) if j >= 0  # approximate indexes pad with -1
            ],
            **({"reranked": decisions[i][0], "why": decisions[i][1]} if i in decisions else {}),
        }
        for i, qf in enumerate(query_files)
    ]
    grid_path = None
    if grid_dir is not None:
        grid_path = write_grid(grid_dir / grid_name(cfg.query), results, int(cfg.grid.max_queries))
    result = {
        "checkpoint": str(ckpt.path),
        "model": ckpt.model_name,
        "dataset_root": str(dataset.root),
        "n_database": int(dataset.n_db),
        "top_k": top_k,
        "index": index_cfg.kind,
        "rerank": rerank.get("name") if rerank else None,
        "cache_hit": db.hit,
        "cache_dir": str(db.directory) if db.directory else None,
        "database_s": round(db.seconds, 4),
        "search_s": round(search_s, 4),
        "total_s": round(time.perf_counter() - started, 4),
        "grid": str(grid_path) if grid_path is not None else None,
        "queries": results,
    }
    print_results(result, output)
    return result


def rerank_top(ids: np.ndarray, scores: np.ndarray, distance: np.ndarray, rerank: dict[str, Any] | None,
               dataset: RetrievalDataset, query_files: list[Path], cache_dir: Any,
               orb: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict[int, tuple[bool, str]]]:
    """The model's ranking in evaluate.py's canonical order (ties by database index), re-ranked by `rerank=`
    (retrieval/rerankers.py, the same builder as evaluate.py's). Returns ids, the model's relevance and distance
    in the new order, the re-ranker's scores (None without re-ranking), and its decision per query row where it
    records them (rerank=fused: re-ranked or not, and why)."""
    order_ids, order_scores = canonical_order(ids, scores)  # the same arrays when no row needed reordering
    if rerank is None:
        return order_ids, order_scores, distance if order_ids is ids else _follow(ids, distance, order_ids), None, {}
    source = RerankSource(dataset, query_files=query_files, cache_dir=cache_dir,
                          orb=OmegaConf.to_container(orb, resolve=True) if orb is not None else {}, split="all",
                          reference=partial(reference_training_set, cache_dir) if cache_dir is not None else None)
    reranker = build_reranker(rerank, source)
    new_ids, new_scores = reranker(np.arange(len(ids)), order_ids, order_scores)
    decisions = dict(getattr(reranker, "decisions", {}))
    return new_ids, _follow(ids, scores, new_ids), _follow(ids, distance, new_ids), new_scores, decisions


def _follow(ids: np.ndarray, values: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """`values` (aligned with `ids`) re-aligned with `new_ids`, a per-row permutation of `ids`."""
    out = np.empty_like(values)
    for i in range(len(ids)):
        where = {int(j): r for r, j in enumerate(ids[i])}
        out[i] = values[i, [where[int(j)] for j in new_ids[i]]]
    return out


def find_queries(query: Any) -> list[Path]:
    """One image file, or every image in a folder (sorted); UserError for anything else."""
    if query in (None, ""):
        raise UserError("query: no query given (query=IMAGE or query=FOLDER)")
    path = Path(str(query)).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        files = sorted(p.resolve() for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"query: folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    raise UserError(f"query: {path} not found")


def query_inputs(inputs: Any, files: list[Path]) -> dict[str, torch.Tensor]:
    """The input builder's tensors for arbitrary image files (no cache): a query-only dataset view."""
    n = len(files)
    view = RetrievalDataset(
        root=Path("/"), db_paths=[], db_loc=np.zeros((0, 3)), q_paths=[str(f) for f in files],
        q_loc=np.zeros((n, 3)), sim=np.zeros((n, 0), bool), fov=np.zeros((n, 0), np.float32), name="query",
    )
    _, q = inputs.build(view, None)
    return q


def grid_name(query: Any) -> str:
    """`retrieval_grid-<query file or folder name>.png`: the same query overwrites its grid, others keep theirs."""
    path = Path(str(query)).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem if path.is_file() else path.name).strip("._") or "query"
    return f"retrieval_grid-{name}.png"


def write_grid(path: Path, results: list[dict[str, Any]], max_queries: int = 16) -> Path:
    """One row per query (at most `max_queries`): the query, then its top-k with rank and score (grey: no labels);
    re-ranked, the re-ranker's score, the one the row is ordered by."""
    shown = results[:max_queries]
    grid = retrieval_grid([Path(item["query"]) for item in shown],
                          [[Path(r["file"]) for r in item["results"]] for item in shown], None,
                          [[r.get("rerank_score", r["score"]) for r in item["results"]] for item in shown])
    return save_png(path, grid)


def print_results(result: dict[str, Any], output: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # paths stay on one line in logs and pipes
    hit = "cache hit" if result["cache_hit"] else "embedded now (cache miss)"
    console.print(f"database: {result['n_database']} images in {result['dataset_root']}; "
                  f"index {hit}: {result['database_s']:.3f} s; search: {result['search_s']:.3f} s", soft_wrap=True)
    for item in result["queries"]:
        console.print(f"query: {item['query']}", soft_wrap=True)
        table = Table()
        table.add_column("rank", justify="right")
        table.add_column("database image")
        table.add_column("relevance", justify="right")
        reranked = result["rerank"] is not None  # every result has a rerank_score: the order is the re-ranker's
        if reranked:
            table.add_column(f"{result['rerank']} score", justify="right")
        for r in item["results"]:
            table.add_row(str(r["rank"]), r["path"], f"{r['score']:.4f}",
                          *([f"{r['rerank_score']:.4f}"] if reranked else []))
        console.print(table)
    if result["grid"] is not None:
        console.print(f"grid: {result['grid']}", soft_wrap=True)
