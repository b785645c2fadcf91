"""Re-ranking time per query, in one run: rerank=orb_ransac (ORB ratio-test matches + USAC homography inliers)
vs rerank=learned_matches (batched mutual ratio-test matches + the learned match verifier), on a model's top 20.

    python experiments/benchmarks/rerank_time.py --ckpt CKPT [--top-n 20] [--repeats 3] [--split test]
    python experiments/benchmarks/rerank_time.py            # no checkpoint: the 16x12 thumbnail's top 20

Both sides get their features beforehand, outside the timing (each from its own cache in data_cache:
conf/eval.yaml's orb_ransac node, 1000 ORB features; conf/rerank/learned_matches.yaml's features), and the
learned verifier is fitted on the training split at first use (cached; the fit is not timed). Timed per
query, over its N candidates, one thread (cv2, FAISS and torch set to 1: a single query's latency):
  * verification only: the matches computed beforehand too; orb_ransac = N cv2.findHomography (USAC) calls,
    learned = one padded forward pass over the N pairs' match features;
  * matching included: orb_ransac = N x (FAISS 2-NN + ratio test + USAC), exactly rerank_scores' per-pair work;
    learned = one Hamming matrix against all N candidates, mutual + ratio test, features, forward pass.
Each query is timed --repeats times and the best kept (the machine is shared); medians over the queries;
the ratios come from this run. recall@1 (and @5) of the model's own order and of each way evaluate.py combines
the scores (replace: the verifier's order; fused: conf/rerank/fused.yaml's rule), same queries.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
from omegaconf import OmegaConf

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.ground_truth import as_ground_truth
from siamese_retrieval.data.splits import split_by_place
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.retrieval import learned_matches as lm
from siamese_retrieval.retrieval import verifier_fit
from siamese_retrieval.retrieval.orb_features import cached_features
from siamese_retrieval.retrieval.orb_ransac import _METHODS, OrbRansacConfig, hamming_knn2, inlier_count
from siamese_retrieval.retrieval.ranking import FusedReranker, InlierReranker

from query_latency import best_of  # this folder's scripts: sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[2]




def model_top_n(ckpt_path: str | None, dataset, query_idx: np.ndarray, n: int, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) (m, n): the checkpoint's top n (flat index), or without one the thumbnail L2 top n."""
    if ckpt_path is None:
        from siamese_retrieval.data.images import thumbnail

        db = torch.from_numpy(np.stack([thumbnail(dataset.db_file(j)) for j in range(dataset.n_db)]))
        q = torch.from_numpy(np.stack([thumbnail(dataset.query_file(int(i))) for i in query_idx]))
        d = torch.cdist(q, db)
        dist, ids = d.topk(n, dim=1, largest=False)
        return ids.numpy(), (1.0 / (1.0 + dist)).numpy()
    from siamese_retrieval.checkpoints import load_checkpoint
    from siamese_retrieval.data.inputs import take
    from siamese_retrieval.retrieval.index import IndexConfig, build_index
    from siamese_retrieval.models.embedding import embed_all
    from siamese_retrieval.retrieval.ranking import search_relevance

    ckpt = load_checkpoint(ckpt_path)
    module = ckpt.module
    db_inputs, q_inputs = ckpt.build_inputs().build(dataset, cache_dir)
    db_emb = embed_all(module, db_inputs)
    q_emb = embed_all(module, take(q_inputs, query_idx))
    index = build_index(module.distance.for_index(db_emb).numpy(), IndexConfig(metric=module.distance.faiss_metric))
    ids, _, scores = search_relevance(module, index, q_emb, k=n)
    return ids, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint; without one: the thumbnail's top N")
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--split", default="test", choices=("test", "val"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(ROOT / "data_cache"))
    ap.add_argument("overrides", nargs="*", help="dotlist overrides of conf/rerank/learned_matches.yaml (train.epochs=10)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dataset = read_dataset(ensure_city(args.cache_dir, SynthConfig()), check="none")
    splits = split_by_place(dataset, (0.6, 0.2, 0.2), seed=0)  # conf/data/synth.yaml's split
    query_idx = splits.queries(args.split)
    truth = as_ground_truth(dataset)
    ids, rel = model_top_n(args.ckpt, dataset, query_idx, args.top_n, args.cache_dir)

    db_files = [dataset.db_file(j) for j in range(dataset.n_db)]
    q_files = [dataset.query_file(i) for i in range(dataset.n_query)]
    key = {"fingerprint": dataset.fingerprint}
    eval_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval.yaml").orb_ransac)
    eval_cfg.pop("workers", None)
    orb_cfg = OrbRansacConfig(**eval_cfg)
    orb = cached_features(db_files + q_files, key, orb_cfg, args.cache_dir, workers=2)  # evaluate.py's cache
    orb_db, orb_q = orb[: dataset.n_db], orb[dataset.n_db :]
    node = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "rerank" / "learned_matches.yaml"),
                           OmegaConf.from_dotlist(args.overrides))
    cfg = lm.LearnedMatchesConfig.from_mapping(OmegaConf.to_container(node))
    feats = cached_features(db_files + q_files, key, cfg.features, args.cache_dir, workers=2)
    lm_db, lm_q = feats[: dataset.n_db], feats[dataset.n_db :]
    data = verifier_fit.TrainData(lm_q, lm_db, q_files, db_files, splits.train_q, splits.train_db, truth, key)
    net = verifier_fit.fit_or_load(data, cfg, args.cache_dir)
    verifier = lm.LearnedVerifier(net, lm_q, lm_db, cfg.matching)

    cv2.setNumThreads(1)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    t_orb_v, t_orb_all, t_lm_v, t_lm_all = [], [], [], []
    inliers = np.zeros(ids.shape)
    learned = np.zeros(ids.shape)
    for r, (q, cand) in enumerate(zip(query_idx, ids)):
        qf = orb_q[q]
        pairs = []  # orb_ransac's ratio-test matches of each candidate, computed outside the timing
        for j in cand:
            dist, nn = hamming_knn2(qf.desc, orb_db[j].desc)
            good = np.flatnonzero(dist[:, 0] < orb_cfg.ratio * dist[:, 1])
            pairs.append((qf.points[good].reshape(-1, 1, 2), orb_db[j].points[nn[good, 0]].reshape(-1, 1, 2)))

        def orb_verify() -> None:
            for src, dst in pairs:
                if len(src) >= orb_cfg.min_matches:
                    cv2.findHomography(src, dst, _METHODS[orb_cfg.ransac_method], orb_cfg.ransac_threshold,
                                       maxIters=orb_cfg.ransac_max_iters)

        def orb_all() -> None:
            inliers[r] = [inlier_count(qf, orb_db[j], orb_cfg) for j in cand]

        mt = lm.match_features(lm_q[q], [lm_db[j] for j in cand], cfg.matching)
        x, mask = torch.from_numpy(mt.x), torch.from_numpy(mt.mask)

        def lm_verify() -> None:
            with torch.inference_mode():
                net.pair_scores(net(x, mask)[1]).numpy()

        def lm_all() -> None:
            learned[r] = verifier.score(lm_q[q], cand)

        t_orb_v.append(best_of(orb_verify, args.repeats))
        t_orb_all.append(best_of(orb_all, args.repeats))
        t_lm_v.append(best_of(lm_verify, args.repeats))
        t_lm_all.append(best_of(lm_all, args.repeats))

    rows = np.arange(len(query_idx))
    fused_knobs = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "rerank" / "fused.yaml"))
    orderings = {  # the same verification scores, combined as evaluate.py's rerank= options do
        "orb_ransac (replace)": InlierReranker(args.top_n, lambda rr, c: inliers[rr])(rows, ids, rel)[0],
        "fused (ORB inliers)": FusedReranker(args.top_n, lambda rr, c: inliers[rr], min_inliers=fused_knobs["min_inliers"],
                                             outlier_z=fused_knobs["outlier_z"])(rows, ids, rel)[0],
        "learned (replace)": lm.LearnedReranker(args.top_n, lambda rr, c: learned[rr], cfg.model_weight)(rows, ids, rel)[0],
        "learned (fused)": FusedReranker(args.top_n, lambda rr, c: learned[rr], min_inliers=cfg.min_inliers,
                                         saturate=cfg.saturate, outlier_z=cfg.outlier_z)(rows, ids, rel)[0],
    }

    def recall(ranked: np.ndarray, k: int) -> float:
        sim, _ = truth.lookup(query_idx, ranked[:, :k])
        has = truth.n_positives(query_idx) > 0
        return float(sim.any(axis=1)[has].mean())

    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    source = f"checkpoint {args.ckpt}" if args.ckpt else "thumbnail L2 (no checkpoint)"
    print(f"\nre-ranking the top {args.top_n} of {source}: {len(query_idx)} {args.split} queries x {dataset.n_db} "
          f"database images; one thread; medians of best-of-{args.repeats}")
    print(f"{'':28s}{'orb_ransac':>12s}{'learned':>12s}{'ratio':>9s}")
    print(f"{'verification ms/query':28s}{med(t_orb_v):12.2f}{med(t_lm_v):12.2f}{med(t_orb_v) / med(t_lm_v):8.1f}x")
    print(f"{'matching + verif. ms/query':28s}{med(t_orb_all):12.2f}{med(t_lm_all):12.2f}"
          f"{med(t_orb_all) / med(t_lm_all):8.1f}x")
    print(f"\nrecall@1 / recall@5 of the same {len(query_idx)} queries (model alone {recall(ids, 1):.3f} / "
          f"{recall(ids, 5):.3f}; learned combine={cfg.combine} is what rerank=learned_matches does):")
    for name, ranked in orderings.items():
        print(f"  {name:24s}{recall(ranked, 1):8.3f}{recall(ranked, 5):8.3f}")
    print(f"features per image: orb_ransac {orb_cfg.n_features} (mean {np.mean([len(f) for f in orb_db]):.0f} db), "
          f"learned {cfg.features.n_features} (mean {np.mean([len(f) for f in lm_db]):.0f} db)")


if __name__ == "__main__":
    main()
