"""Thumbnail baseline on the synthetic city: the "not a toy" acceptance check.

Each image -> 16x12 grayscale thumbnail, standardised per image (zero mean, unit std); a query's
ranking is the L2 distance to every database thumbnail. recall@k = fraction of queries (with at
least one positive) that have a positive (sim = 1) among the k nearest. The city passes when
recall@1 stays clearly below 0.5: pixel similarity alone must not solve it.

    python experiments/benchmarks/thumbnail_baseline.py [--cache-dir data_cache] [--preset default] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.data.synth.preview import thumbnail


def thumbnail_recall(root, ks=(1, 5, 10)) -> dict:
    ds = read_dataset(root, check="none")
    db = np.stack([thumbnail(ds.db_file(i)) for i in range(ds.n_db)])
    q = np.stack([thumbnail(ds.query_file(i)) for i in range(ds.n_query)])
    dist = (q**2).sum(1)[:, None] + (db**2).sum(1)[None, :] - 2 * q @ db.T
    order = np.argsort(dist, axis=1, kind="stable")[:, : max(ks)]
    has_pos = ds.sim.any(1)
    hits = np.take_along_axis(ds.sim, order, axis=1)[has_pos]
    out = {f"recall@{k}": float(hits[:, :k].any(1).mean()) for k in ks}
    out["queries"] = int(ds.n_query)
    out["queries_without_positive"] = int((~has_pos).sum())
    out["mean_positives"] = float(ds.sim.sum(1).mean())
    out["random_recall@1"] = float(ds.sim[has_pos].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="data_cache")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cfg = SynthConfig.from_preset(args.preset, seed=args.seed)
    t0 = time.perf_counter()
    root = ensure_city(args.cache_dir, cfg, workers=args.workers)
    print(f"city: {root} (ready in {time.perf_counter() - t0:.1f} s)")
    res = thumbnail_recall(root)
    print(
        f"thumbnail baseline (16x12 standardised grayscale, L2) over {res['queries']} queries "
        f"({res['queries_without_positive']} without positive, mean positives {res['mean_positives']:.2f}):"
    )
    print("  " + "  ".join(f"recall@{k}={res[f'recall@{k}']:.3f}" for k in (1, 5, 10)) + f"  (random recall@1 ~ {res['random_recall@1']:.3f})")
    verdict = "PASS" if res["recall@1"] < 0.5 else "FAIL"
    print(f"{verdict}: recall@1 {'<' if verdict == 'PASS' else '>='} 0.5")


if __name__ == "__main__":
    main()
