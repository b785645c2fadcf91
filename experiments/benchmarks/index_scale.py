"""Index scale: exact flat vs IVF-PQ vs OPQ + IVF-PQ + exact re-ranking (Refine), on 100k and 1M clustered
random embeddings (d=128).

    python experiments/benchmarks/index_scale.py [--sizes 100000 1000000] [--queries 1000] [--single 100]
        [--factory "OPQ16_64,IVF{nlist},PQ16x8,Refine(Flat)"] [--target 0.95] [--tune-queries 1000]

Data: 1000 clusters in 128-d (like a city of places seen many times), each spread over a shared 16-d
subspace plus a little noise (embeddings have a low intrinsic dimension); queries from the same clusters.
Three indexes per size, all built by siamese_retrieval.retrieval.index.build_index:
  flat     exact search (the reference of every ratio)
  ivfpq    today's kind="ivfpq": pq_m=16 x 8 bits, nlist=min(1024, 4 sqrt n), nprobe=16
  factory  --factory (OPQ rotation + IVF-PQ + Refine(Flat)), nprobe / k_factor chosen by
           tune_search_params on --tune-queries held-out queries (not the evaluation queries) for the
           --target recall@10 agreement
Reported per index: build time; memory (serialized size: flat holds n x d float32, IVF-PQ pq_m bytes +
an id per vector, Refine(Flat) the float32 vectors too; and the process RSS after the build, with its
growth during the build); single-query latency (median over --single queries searched one at a time, with
1 FAISS thread and with the default threads); batched throughput (--queries queries in one call, default
threads); recall@10 agreement = mean |top10(index) intersect top10(flat)| / 10 on the --queries queries.
Ratios are against flat measured in the same run. 1M x 128 float32 is 512 MB; peak RSS stays under ~3 GB.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import faiss
import numpy as np

from siamese_retrieval.retrieval.index import (
    IndexConfig,
    build_index,
    recall_agreement,
    search,
    search_params,
    set_faiss_threads,
    tune_search_params,
)

DEFAULT_FACTORY = "OPQ16_64,IVF{nlist},PQ16x8,Refine(Flat)"


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Cluster centre + a point of a 16-d subspace + a little isotropic noise: nearest neighbours are
    well defined (isotropic 128-d clusters would make every in-cluster point equally near)."""
    which = rng.integers(0, len(centers), n)
    z = rng.standard_normal((n, basis.shape[0]), dtype=np.float32)
    x = centers[which] + z @ basis + rng.standard_normal((n, centers.shape[1]), dtype=np.float32) * 0.02
    return np.ascontiguousarray(x, dtype=np.float32)


def single_latency(index, q: np.ndarray, threads: int) -> float:
    """Median seconds of one query searched alone, FAISS on `threads` threads."""
    faiss.omp_set_num_threads(threads)
    times = []
    for i in range(len(q)):
        t = time.perf_counter()
        index.search(q[i : i + 1], 10)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_mb(index) -> float:
    return faiss.serialize_index(index).nbytes / 2**20


def rss_mb(field: str = "VmRSS") -> float:
    """This process' resident memory (VmRSS) or its peak (VmHWM) in MiB, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000, help="evaluation queries (recall, batched throughput)")
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time (median)")
    ap.add_argument("--nlist", type=int, default=None, help="default: 4 sqrt(n), at most 1024 (training time)")
    ap.add_argument("--nprobe", type=int, default=16, help="ivfpq's nprobe (the factory index is tuned)")
    ap.add_argument("--pq-m", type=int, default=16, help="ivfpq's sub-quantizers")
    ap.add_argument("--factory", default=DEFAULT_FACTORY, help="faiss.index_factory string ({nlist} as above)")
    ap.add_argument("--target", type=float, default=0.95, help="recall@10 agreement the factory index is tuned for")
    ap.add_argument("--tune-queries", type=int, default=1000, help="held-out queries the tuning measures on")
    ap.add_argument("--threads", type=int, default=None, help="FAISS default threads (default: torch's)")
    ap.add_argument("--gpu", action="store_true", help="use_gpu=True (GPU FAISS when this build has one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"{'':>9} (%(levelname)s %(message)s)")
    started = time.perf_counter()
    threads = set_faiss_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((1000, args.dim), dtype=np.float32)
    basis = rng.standard_normal((16, args.dim), dtype=np.float32) * 0.1
    q = clustered(args.queries, rng, centers, basis)
    q_single = q[: min(args.single, len(q))]
    print(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f} at start, default FAISS threads {threads}"
          f"{', GPU requested' if args.gpu else ''}")
    print(f"d={args.dim}, {args.queries} evaluation queries, {len(q_single)} single queries, ivfpq pq_m={args.pq_m} "
          f"x 8 bits nprobe={args.nprobe}, factory {args.factory!r} tuned on {args.tune_queries} held-out queries "
          f"for recall@10 agreement {args.target}")
    header = (f"{'n':>9} {'index':>8} {'build s':>8} {'MB':>8} {'RSS MB':>8} {'+RSS MB':>8} {'1q ms 1t':>9} "
              f"{'1q ms':>8} {'batch q/s':>10} {'recall@10 agr.':>15}")
    for n in args.sizes:
        x = clustered(n, rng, centers, basis)
        q_tune = clustered(args.tune_queries, rng, centers, basis)
        nlist = args.nlist or min(1024, int(round(4 * np.sqrt(n))))
        configs = {
            "flat": IndexConfig(kind="flat", num_threads=args.threads, use_gpu=args.gpu),
            "ivfpq": IndexConfig(kind="ivfpq", nlist=nlist, nprobe=args.nprobe, pq_m=args.pq_m,
                                 num_threads=args.threads, use_gpu=args.gpu),
            "factory": IndexConfig(factory=args.factory, nlist=nlist, num_threads=args.threads, use_gpu=args.gpu),
        }
        print(header)
        rows, notes = {}, []
        exact = exact_tune = None
        for name, cfg in configs.items():
            rss_before = rss_mb()
            t = time.perf_counter()
            index = build_index(x, cfg)
            build_s = time.perf_counter() - t
            rss_after = rss_mb()
            if name == "flat":
                _, exact_tune = search(index, q_tune, k=10, num_threads=args.threads)
            if name == "factory":
                t = time.perf_counter()
                tuned = tune_search_params(index, exact_tune, q_tune, target_recall=args.target, k=10,
                                           num_threads=args.threads)
                notes.append(f"factory {args.factory.replace('{nlist}', str(nlist))!r}: tuned in "
                             f"{time.perf_counter() - t:.1f} s on {len(q_tune)} held-out queries -> "
                             f"nprobe={tuned.nprobe}, k_factor={tuned.k_factor} "
                             f"(shortlist {10 * (tuned.k_factor or 1)}), recall@10 agreement "
                             f"{tuned.recall:.3f} +- {tuned.recall_se:.3f} there (target {args.target}, "
                             f"{'reached' if tuned.reached else 'NOT reached'}), {tuned.ms_per_query:.3f} ms/query "
                             f"1-thread batched")
                notes.append("   candidates (nprobe, k_factor, agreement, ms/query): " + ", ".join(
                    f"({a}, {b}, {r:.3f}, {ms:.3f})" for a, b, r, ms in tuned.candidates))
            one_1t = single_latency(index, q_single, 1)
            one = single_latency(index, q_single, threads)
            t = time.perf_counter()
            _, ids = search(index, q, k=10, num_threads=args.threads)
            batch_qps = len(q) / (time.perf_counter() - t)
            if name == "flat":
                exact = ids
            agree = recall_agreement(ids, exact, 10)
            mb = memory_mb(index)
            rows[name] = dict(one_1t=one_1t, one=one, qps=batch_qps, mb=mb, agree=agree, build=build_s)
            print(f"{n:>9} {name:>8} {build_s:>8.1f} {mb:>8.1f} {rss_after:>8.0f} {rss_after - rss_before:>8.0f} "
                  f"{one_1t * 1e3:>9.3f} {one * 1e3:>8.3f} {batch_qps:>10.0f} {agree:>15.3f}", flush=True)
            if name != "flat":
                notes.append(f"{name} search params: {search_params(index)}")
            del index
        for line in notes:
            print(f"{'':>9} {line}")
        f = rows["flat"]
        for name in ("ivfpq", "factory"):
            r = rows[name]
            print(f"{'':>9} {name} vs flat: {f['one_1t'] / r['one_1t']:.1f}x faster single queries (1 thread), "
                  f"{f['one'] / r['one']:.1f}x ({threads} threads), {r['qps'] / f['qps']:.1f}x batch throughput, "
                  f"memory {r['mb'] / f['mb']:.2f}x flat's, recall@10 agreement {r['agree']:.3f}")
        r = rows["factory"]
        ok = r["agree"] >= 0.95 and min(f["one_1t"] / r["one_1t"], f["one"] / r["one"]) >= 10
        print(f"{'':>9} acceptance at n={n} (agreement >= 0.95 and >= 10x faster single queries than flat): "
              f"{'PASS' if ok else 'FAIL'}")
        del x
    print(f"total {time.perf_counter() - started:.0f} s, peak RSS {rss_mb('VmHWM'):.0f} MB, "
          f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
