"""Per-query latency on the default city, in one run: a trained model, ORB + RANSAC, and the model + rerank=fused.

    python experiments/benchmarks/query_latency.py --ckpt CKPT [--queries 30] [--repeats 3]

Both sides prepare their database once, outside the timing: the model embeds the 960 database images
and builds a flat FAISS index; ORB + RANSAC extracts the database's ORB features (evaluate.py's
`method=orb_ransac` settings, 2 worker threads). The timing covers one test query at a time, from its
image file to its ranked top 10:
  * model: decode + resize the query (the checkpoint's input builder), embed it, search the index;
  * ORB + RANSAC: decode, extract ORB, ratio-test matches + RANSAC inliers against every database
    image, sort;
  * model + old fused: the model's top 20, then (unless the model is confident: --skip-margin) the query's ORB
    features and RANSAC against those 20 only, the candidates whose inliers stand out moved ahead
    (retrieval/ranking.py FusedReranker, rerank=fused before its trust rule).
  * model + fused: the same verification with each candidate's evidence and the trust rule deciding per query
    (retrieval/trusted_rerank.py, rerank=fused today; the rule is fitted once, not timed).
Medians over the queries (each timed --repeats times, best kept: the machine is shared); the ratio
comes from this run only. Torch and the ORB pool both use the machine's cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable
from pathlib import Path

import numpy as np
import torch

from siamese_retrieval.checkpoints import load_checkpoint
from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.images import read_image
from siamese_retrieval.data.splits import split_by_place
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.models.embedding import embed_all
from siamese_retrieval.retrieval.index import IndexConfig, build_index, search
from siamese_retrieval.retrieval.orb_features import cached_features, image_features
from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig, rerank_evidence, rerank_scores, score_matrix
from siamese_retrieval.retrieval.ranking import FusedReranker
from siamese_retrieval.retrieval.rerankers import RerankSource, trust_rule
from siamese_retrieval.retrieval.trusted_rerank import TrustedReranker
from siamese_retrieval.retrieve import query_inputs

ROOT = Path(__file__).resolve().parents[2]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a trained checkpoint (e.g. cnn_snn's epochNN.ckpt)")
    ap.add_argument("--queries", type=int, default=30, help="test queries timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(ROOT / "data_cache"))
    ap.add_argument("--skip-margin", type=float, default=0.02, help="rerank=fused's skip_margin (conf/rerank/fused.yaml)")
    args = ap.parse_args()

    dataset = read_dataset(ensure_city(args.cache_dir, SynthConfig()), check="none")
    splits = split_by_place(dataset, (0.6, 0.2, 0.2), cell_size_m=1000.0, seed=0)
    test_q = splits.test_q[: args.queries]
    files = [dataset.query_file(int(q)) for q in test_q]

    ckpt = load_checkpoint(args.ckpt)
    module, inputs = ckpt.module, ckpt.build_inputs()
    db_inputs, _ = inputs.build(dataset, args.cache_dir)
    t = time.perf_counter()
    with torch.inference_mode():
        db_emb = embed_all(module, db_inputs)
    index = build_index(db_emb, IndexConfig(metric=module.distance.faiss_metric))
    model_prep = time.perf_counter() - t

    cfg = OrbRansacConfig()
    t = time.perf_counter()
    db_feats = cached_features([dataset.db_file(i) for i in range(dataset.n_db)],
                               {"benchmark": dataset.fingerprint}, cfg, None)
    orb_prep = time.perf_counter() - t

    def model_query(path: Path) -> np.ndarray:
        with torch.inference_mode():
            emb = embed_all(module, query_inputs(inputs, [path]))
        return search(index, emb.numpy(), k=10)[1][0]

    def orb_query(path: Path) -> np.ndarray:
        scores = score_matrix([image_features(read_image(path), cfg)], db_feats, cfg, workers=2)[0]
        return np.argsort(-scores, kind="stable")[:10]

    def reranked_query(path: Path, reranker: Callable[[Callable], Any], measure: Callable) -> np.ndarray:
        """The model's top 20 of one query image, re-ranked; the query's ORB features are extracted (and timed) only
        when the re-ranker verifies it (a confident query is skipped)."""
        with torch.inference_mode():
            emb = embed_all(module, query_inputs(inputs, [path]))
            relevance, ids = module.cross_scores(emb, db_emb).topk(20, dim=1)

        def verify(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
            return measure(candidates, [image_features(read_image(path), cfg)], db_feats, cfg, workers=2)

        return reranker(verify)(np.array([0]), ids.numpy(), relevance.numpy())[0][0, :10]

    def fused_query(path: Path) -> np.ndarray:  # the old rule: inliers standing out
        return reranked_query(path, lambda verify: FusedReranker(20, verify, min_inliers=12, outlier_z=5.0,
                                                                 skip_margin=args.skip_margin), rerank_scores)

    # rerank=fused today: the same top 20, ORB + RANSAC evidence per candidate, the trust rule decides per query
    rule = trust_rule(RerankSource(dataset, query_idx=test_q, cache_dir=Path(args.cache_dir), splits=splits), 20)

    def trusted_query(path: Path) -> np.ndarray:
        return reranked_query(path, lambda evidence: TrustedReranker(20, evidence, rule, skip_margin=args.skip_margin),
                              rerank_evidence)

    model_query(files[0]), orb_query(files[0]), fused_query(files[0]), trusted_query(files[0])  # warm-up
    model_s = [best_of(lambda: model_query(f), args.repeats) for f in files]
    orb_s = [best_of(lambda: orb_query(f), 1) for f in files]  # seconds each: one repeat is plenty
    fused_s = [best_of(lambda: fused_query(f), args.repeats) for f in files]
    trusted_s = [best_of(lambda: trusted_query(f), args.repeats) for f in files]
    m, o = statistics.median(model_s), statistics.median(orb_s)
    print(f"default city: {dataset.n_db} database images, {len(files)} test queries; checkpoint {args.ckpt}")
    print(f"database preparation (not timed per query): model embed + index {model_prep:.1f} s, "
          f"ORB features {orb_prep:.1f} s")
    print(f"{'method':>14} {'median s/query':>15} {'p90 s/query':>12}")
    for name, s in (("model", model_s), ("ORB + RANSAC", orb_s), ("model + old fused", fused_s),
                    ("model + fused", trusted_s)):
        print(f"{name:>14} {statistics.median(s):>15.4f} {float(np.percentile(s, 90)):>12.4f}")
    print(f"model vs ORB + RANSAC: {o / m:.1f}x faster per query (median)")
    print(f"model + rerank=fused vs ORB + RANSAC: {o / statistics.median(trusted_s):.1f}x faster per query (median)")
    print(f"rerank=fused with its trust rule vs the old fused rule (inliers standing out): "
          f"{statistics.median(trusted_s) / statistics.median(fused_s):.2f}x the time per query (median)")


if __name__ == "__main__":
    main()
