"""Index scale: exact flat vs IVF-PQ on 100k and 1M random clustered embeddings (d=128).

    python experiments/benchmarks/index_scale.py [--sizes 100000 1000000] [--queries 500] [--nprobe 16] [--pq-m 16]

Data: 1000 clusters in 128-d (like a city of places seen many times), each spread over a shared 16-d
subspace plus a little noise (embeddings have a low intrinsic dimension); queries from the same clusters. Reported per size: build time, memory of each index (its serialized size: flat holds
n x d float32; IVF-PQ pq_m bytes per vector + ids + codebooks), single-query latency (median over
--queries queries, one at a time), batched throughput, and recall@10 agreement = mean |top10(ivfpq)
intersect top10(flat)| / 10. Both indexes are built by siamese_retrieval.retrieval.index.build_index.
1M x 128 float32 is 512 MB; flat + IVF-PQ + data stay under ~2 GB. Use --sizes to shrink.
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np

from siamese_retrieval.retrieval.index import IndexConfig, build_index, search


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Cluster centre + a point of a 16-d subspace + a little isotropic noise: nearest neighbours are
    well defined (isotropic 128-d clusters would make every in-cluster point equally near)."""
    which = rng.integers(0, len(centers), n)
    z = rng.standard_normal((n, basis.shape[0]), dtype=np.float32)
    x = centers[which] + z @ basis + rng.standard_normal((n, centers.shape[1]), dtype=np.float32) * 0.02
    return np.ascontiguousarray(x, dtype=np.float32)


def single_latency(index, q: np.ndarray) -> float:
    times = []
    for i in range(len(q)):
        t = time.perf_counter()
        index.search(q[i : i + 1], 10)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_mb(index) -> float:
    return faiss.serialize_index(index).nbytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--nlist", type=int, default=None, help="default: 4 sqrt(n), at most 1024 (training time)")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((1000, args.dim), dtype=np.float32)
    basis = rng.standard_normal((16, args.dim), dtype=np.float32) * 0.1
    q = clustered(args.queries, rng, centers, basis)
    print(f"d={args.dim}, {args.queries} queries, IVF-PQ pq_m={args.pq_m} x 8 bits, nprobe={args.nprobe}")
    print(f"{'n':>9} {'index':>6} {'build s':>8} {'MB':>8} {'1-query ms':>11} {'batch q/s':>10} {'recall@10 agr.':>15}")
    for n in args.sizes:
        x = clustered(n, rng, centers, basis)
        nlist = args.nlist or min(1024, int(round(4 * np.sqrt(n))))
        results = {}
        for kind in ("flat", "ivfpq"):
            cfg = IndexConfig(kind=kind, nlist=nlist, nprobe=args.nprobe, pq_m=args.pq_m, num_threads=args.threads)
            t = time.perf_counter()
            index = build_index(x, cfg)
            build_s = time.perf_counter() - t
            one = single_latency(index, q[: min(200, len(q))])
            t = time.perf_counter()
            _, ids = search(index, q, k=10, num_threads=args.threads)
            batch_qps = len(q) / (time.perf_counter() - t)
            results[kind] = ids
            agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, results["flat"])])
            print(f"{n:>9} {kind:>6} {build_s:>8.1f} {memory_mb(index):>8.1f} {one * 1e3:>11.3f} {batch_qps:>10.0f} "
                  f"{agree:>15.3f}")
            results[kind + "_lat"] = one
            results[kind + "_mb"] = memory_mb(index)
            del index
        print(f"{'':>9} ivfpq vs flat: {results['flat_lat'] / results['ivfpq_lat']:.1f}x faster single queries, "
              f"{results['flat_mb'] / results['ivfpq_mb']:.1f}x less memory (nlist={nlist})")
        del x


if __name__ == "__main__":
    main()
