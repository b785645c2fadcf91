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
from pathlib import Path

from omegaconf import OmegaConf

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.data.splits import split_by_place
from siamese_retrieval.retrieval.thumbnail import thumbnail_metrics


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
    ds = read_dataset(root, check="none")
    split = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "data" / "synth.yaml").split
    test_q = split_by_place(ds, fractions=tuple(split.fractions), cell_size_m=split.cell_size_m, seed=args.seed).test_q
    for name, queries in (("all queries", None), ("default test split", test_q)):
        res = thumbnail_metrics(ds, queries)
        print(
            f"thumbnail baseline on {name} ({int(res['n_queries'])} queries, "
            f"{int(res['n_queries_without_positive'])} without positive): "
            + "  ".join(f"recall@{k}={res[f'recall@{k}']:.3f}" for k in (1, 5, 10))
            + f"  mAP={res['mAP']:.3f}"
        )
    print(f"mean positives per query: {ds.sim.sum(1).mean():.2f}; random recall@1 ~ {ds.sim[ds.sim.any(1)].mean():.3f}")
    verdict = "PASS" if res["recall@1"] < 0.5 else "FAIL"
    print(f"{verdict}: test-split recall@1 {'<' if verdict == 'PASS' else '>='} 0.5")

if __name__ == "__main__":
    main()
