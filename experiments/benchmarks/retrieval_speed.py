"""Retrieval speed: the study's way (one model call per (query, database) pair, batch 1) vs the database
embedded once + a FAISS flat index, for single queries, on the study's keypoint MLP (keypoint_snn).

    python experiments/benchmarks/retrieval_speed.py [--sizes 1000 10000] [--queries 50] [--pair-budget 2000]

Inputs are random ORB-like keypoint tensors (10 x 32 bytes per image): the timing does not depend on
the pixels. Per-pair way: `module(q, d)` once per database image (both branches + distance + head,
as the study's Keras model.predict on a pair); for databases larger than --pair-budget, the first
--pair-budget pairs of each query are timed and the per-query time extrapolated linearly (printed).
Index way, per query: embed the query (one model call), search the flat index for the top 10, score
those distances with the head. The database is embedded once beforehand (its time is printed, not
charged to queries). Medians over --repeats repeats; ratios come from this run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siamese_retrieval.models.embedding import embed_all
from siamese_retrieval.retrieval.index import IndexConfig, build_index, search

ROOT = Path(__file__).resolve().parents[2]


def keypoint_model() -> torch.nn.Module:
    cfg = OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "keypoint_snn.yaml")})
    module = instantiate(OmegaConf.to_container(cfg.model.module, resolve=True), _recursive_=False)
    return module.eval()


def random_inputs(n: int, n_kp: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "desc": torch.randint(0, 256, (n, n_kp, 32), dtype=torch.uint8, generator=g),
        "geom": torch.rand(n, n_kp, 4, generator=g),
        "mask": torch.ones(n, n_kp, dtype=torch.bool),
    }


def row(t: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in t.items()}


@torch.inference_mode()
def per_pair_seconds(module, db, queries, n_queries: int, budget: int) -> tuple[float, int]:
    """Seconds per query (median over queries) of scoring every database image with one call per pair."""
    n_db = len(db["desc"])
    timed = min(n_db, budget)
    db_rows = [row(db, j) for j in range(timed)]  # slicing is not charged to the model calls
    per_query = []
    for i in range(n_queries):
        q = row(queries, i)
        t = time.perf_counter()
        for d in db_rows:
            module(q, d)
        per_query.append((time.perf_counter() - t) * n_db / timed)
    return statistics.median(per_query), timed


@torch.inference_mode()
def index_seconds(module, index, queries, n_queries: int, k: int = 10) -> float:
    per_query = []
    for i in range(n_queries):
        t = time.perf_counter()
        emb = module.embed(row(queries, i))
        dist, ids = search(index, emb.numpy(), k=k)
        module.score_distances(module.distance.from_faiss(dist))
        per_query.append(time.perf_counter() - t)
    return statistics.median(per_query)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--queries", type=int, default=50, help="single queries timed per way")
    ap.add_argument("--pair-queries", type=int, default=5, help="queries timed the per-pair way")
    ap.add_argument("--pair-budget", type=int, default=2000, help="pairs timed per query (then extrapolated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch / FAISS threads (1: a single query's latency)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    module = keypoint_model()
    queries = random_inputs(max(args.queries, args.pair_queries), seed=1)
    print(f"keypoint_snn (10 ORB x 32 bytes -> 100-50-10), torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'database':>9} {'per-pair q/s':>13} {'index q/s':>11} {'ratio':>9}  notes")
    for n in args.sizes:
        db = random_inputs(n, seed=2)
        t = time.perf_counter()
        emb = embed_all(module, db)
        index = build_index(emb.numpy(), IndexConfig(kind="flat", num_threads=args.threads))
        embed_s = time.perf_counter() - t
        pair, idx, timed = [], [], n
        for _ in range(args.repeats):
            s, timed = per_pair_seconds(module, db, queries, args.pair_queries, args.pair_budget)
            pair.append(s)
            idx.append(index_seconds(module, index, queries, args.queries))
        pair_s, idx_s = statistics.median(pair), statistics.median(idx)
        note = f"db embedded once in {embed_s:.3f} s"
        if timed < n:
            note += f"; per-pair: {timed} of {n} pairs timed per query, extrapolated x{n / timed:g}"
        print(f"{n:>9} {1 / pair_s:>13.3f} {1 / idx_s:>11.1f} {pair_s / idx_s:>8.0f}x  {note}")
        print(f"{'':>9} per-pair {pair_s * 1e3:.1f} ms/query, index {idx_s * 1e3:.3f} ms/query (medians of {args.repeats})")


if __name__ == "__main__":
    main()
