"""Streaming evaluation at real size: 10k queries against 1M database embeddings (d=128), sparse ground truth.

    python experiments/benchmarks/streaming_eval.py [--db 1000000] [--queries 10000] [--search-k 100]
        [--chunk 2048] [--seed 0]

Data (random but clustered, so retrieval is neither trivial nor hopeless):
  hidden space   every database item has an exact 16-d "place" coordinate: one of n_db / 50 place centres
                 plus a spread; a query is a database item's place moved by 0.4 per dimension (10k of them).
  embeddings     hidden coordinate -> 128-d by one fixed random linear map, plus isotropic noise (the
                 "model" sees the place through a noisy embedding).
  ground truth   per query, its n_i (uniform in 5..10) nearest database items in the HIDDEN space are the
                 positives (sim=1, fov from 1.0 down to 0.55 by rank), the rest of its 10 nearest overlap
                 (fov 0.25, sim=0): a `SparseRelevance` built by exact FAISS search in chunks of queries.
Evaluation: `rank_embeddings` (the project's engine) with `RankingSettings(search_k=K)` over a flat index
(exact search; the approximate index is another engineer's work), `query_chunk=--chunk`.

Reported: seconds per stage, the metrics, and the peak resident set size of the process
(resource.getrusage ru_maxrss, which includes the 512 MB of database embeddings and FAISS's copy of them).
For scale: the dense ground truth of this set would be n_q x n_db bytes of `sim` and 4x that of `fov`
(10 GB + 40 GB), and a full ranking holds chunk x n_db int64 ids per chunk (2 GB for a chunk of 256).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

from siamese_retrieval.data.ground_truth import SparseRelevance
from siamese_retrieval.models.distance import Distance
from siamese_retrieval.retrieval.index import IndexConfig, build_index, search
from siamese_retrieval.retrieval.ranking import RankingSettings, rank_embeddings

HIDDEN_D, EMB_D, TRUTH_K = 16, 128, 10
NOISE = 0.7  # embedding noise per dimension: recall@1 well below 1 (the hidden place is seen through it)


class IdentityModel:
    """The embeddings are the inputs; relevance = -distance (monotonic, as the engine assumes)."""

    device = torch.device("cpu")
    distance = Distance("euclidean")

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["x"].float()

    def score_distances(self, distance: torch.Tensor) -> torch.Tensor:
        return -distance


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def make_data(n_db: int, n_q: int, seed: int, block: int = 100_000):
    """(db hidden (n_db, 16), q hidden (n_q, 16), db emb (n_db, 128), q emb (n_q, 128)), float32, in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n_db // 50), HIDDEN_D), dtype=np.float32) * 3.0
    lift = rng.standard_normal((HIDDEN_D, EMB_D), dtype=np.float32) / np.sqrt(HIDDEN_D)
    db_h = np.empty((n_db, HIDDEN_D), np.float32)
    db_e = np.empty((n_db, EMB_D), np.float32)
    for s in range(0, n_db, block):
        m = min(block, n_db - s)
        db_h[s : s + m] = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, HIDDEN_D), np.float32) * 0.5
        db_e[s : s + m] = db_h[s : s + m] @ lift + rng.standard_normal((m, EMB_D), np.float32) * NOISE
    src = rng.choice(n_db, n_q, replace=False)
    q_h = db_h[src] + rng.standard_normal((n_q, HIDDEN_D), np.float32) * 0.4
    q_e = q_h @ lift + rng.standard_normal((n_q, EMB_D), np.float32) * NOISE
    return db_h, q_h, db_e, q_e.astype(np.float32)


def hidden_truth(db_h: np.ndarray, q_h: np.ndarray, seed: int, chunk: int = 2000) -> SparseRelevance:
    """Positives: each query's n_i in [5, 10] nearest database items in the hidden space (exact, chunked)."""
    rng = np.random.default_rng(seed + 1)
    index = build_index(db_h, IndexConfig(kind="flat", metric="l2"))
    n_q = len(q_h)
    n_pos = rng.integers(5, 11, n_q)
    ids = np.empty((n_q, TRUTH_K), np.int64)
    for s in range(0, n_q, chunk):
        ids[s : s + chunk] = search(index, q_h[s : s + chunk], k=TRUTH_K)[1]
    rank = np.broadcast_to(np.arange(TRUTH_K), ids.shape)
    sim = rank < n_pos[:, None]
    fov = np.where(sim, 1.0 - 0.45 * rank / np.maximum(n_pos[:, None] - 1, 1), 0.25).astype(np.float32)
    qi = np.repeat(np.arange(n_q), TRUTH_K)
    return SparseRelevance.from_pairs(n_q, len(db_h), qi, ids.reshape(-1), sim.reshape(-1), fov.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--search-k", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"database {args.db} x {EMB_D}, queries {args.queries}, search_k {args.search_k}, chunk {args.chunk}")

    t0 = time.perf_counter()
    db_h, q_h, db_e, q_e = make_data(args.db, args.queries, args.seed)
    t1 = time.perf_counter()
    truth = hidden_truth(db_h, q_h, args.seed)
    del db_h, q_h
    t2 = time.perf_counter()
    print(f"data {t1 - t0:.1f} s (peak RSS {peak_rss_mb():.0f} MB); sparse ground truth {t2 - t1:.1f} s: "
          f"{truth.nnz} pairs, {int(truth.sim.sum())} positives, "
          f"{(truth.indptr.nbytes + truth.indices.nbytes + truth.sim.nbytes + truth.fov.nbytes) / 2**20:.1f} MiB "
          f"(dense sim + fov: {args.queries * args.db * 5 / 2**30:.1f} GiB)")

    settings = RankingSettings(search_k=args.search_k, query_chunk=args.chunk, keep_top=10)
    ranking = rank_embeddings(IdentityModel(), torch.from_numpy(db_e), torch.from_numpy(q_e),
                              np.arange(args.queries), truth, settings)
    t3 = time.perf_counter()
    print(f"engine (flat index build + search top {args.search_k} + metrics) {t3 - t2:.1f} s "
          f"= {1000 * (t3 - t2) / args.queries:.2f} ms/query")
    for name, value in ranking.metrics.items():
        print(f"  {name:28s} {value:.4f}")
    beyond = int((ranking.first_positive_rank == args.search_k + 1).sum())
    print(f"queries whose first positive lies beyond the top {args.search_k}: {beyond}")
    print(f"total {t3 - t0:.1f} s; peak RSS {peak_rss_mb():.0f} MB (goal < 4096 MB)")


if __name__ == "__main__":
    main()
