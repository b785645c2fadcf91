"""Fitting the ORB bag-of-words vocabulary: binary k-majority (what retrieval/orb_bow.py does) vs FAISS' float
k-means on the descriptors' +-1 bit vectors (L2^2 there = 4 x Hamming), centroids rounded to their sign.

    python experiments/benchmarks/orb_bow_vocabulary.py [--data synth] [--words 1024] [--samples 100000]
        [--iters 20] [--split val]

Both run on the same seeded sample of the training images' ORB descriptors (the default city's train
queries + train-place database images, features from the orb_ransac cache), with the same K and the same
number of Lloyd iterations (k-majority may stop earlier: no assignment changed). Each vocabulary is then
used the same way (Hamming assignment, tf**0.5 * idf, cosine over the full database) and scored on `--split`,
so the ratio printed is the speed-up at the quality shown, measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synth")
    parser.add_argument("--words", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    sys.path.insert(0, str(ROOT))
    import faiss
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from siamese_retrieval.data.datamodule import build_datamodule, evaluation_data_config
    from siamese_retrieval.data.inputs import NoInputs
    from siamese_retrieval.evaluate import load_split
    from siamese_retrieval.retrieval import orb_bow
    from siamese_retrieval.retrieval.index import set_faiss_threads
    from siamese_retrieval.retrieval.ranking import RankingSettings
    from siamese_retrieval.retrieval.rerankers import dataset_orb_features, orb_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"data={args.data}", "method=orb_bow", "logger=none",
                                         "hydra.runtime.output_dir=/tmp"])
    dm = build_datamodule(evaluation_data_config(cfg.data), NoInputs())
    query_idx = load_split(dm, args.split)
    orb_cfg, workers = orb_config(OmegaConf.to_container(cfg.orb_ransac, resolve=True))
    db_feats, q_feats = dataset_orb_features(orb_cfg, workers, dm.dataset, dm.cache_dir)
    train_db, train_q = orb_bow.training_images(dm.splits, dm.dataset.n_db)
    train = [db_feats[i] for i in train_db] + [q_feats[i] for i in train_q]
    bow = orb_bow.BowConfig(vocabulary_size=args.words, kmeans_samples=args.samples, kmeans_iters=args.iters)
    rng = np.random.default_rng(bow.seed)
    all_desc = np.concatenate([f.desc for f in train if len(f.desc)])
    n = min(args.samples, len(all_desc))
    desc = np.ascontiguousarray(all_desc[np.sort(rng.choice(len(all_desc), n, replace=False))])
    set_faiss_threads()
    print(f"{args.data}: {len(train)} training images, {len(all_desc)} descriptors, k-means on {n}, "
          f"K={args.words}, {args.iters} iterations, {faiss.omp_get_max_threads()} threads")

    def score(words: np.ndarray) -> float:
        vocab = orb_bow.Vocabulary(words, np.ones(args.words, np.float32))
        present = (vocab.counts(train) > 0).sum(axis=0)
        vocab.idf = np.log((1.0 + len(train)) / (1.0 + present)).astype(np.float32)
        ranking = orb_bow.rank_bow(vocab.encode(db_feats), vocab.encode([q_feats[i] for i in query_idx]), query_idx,
                                   dm.dataset, RankingSettings())
        return ranking.metrics["recall@1"]

    t = time.perf_counter()
    majority = orb_bow.k_majority(desc, args.words, args.iters, np.random.default_rng(bow.seed))
    t_majority = time.perf_counter() - t
    t = time.perf_counter()
    kmeans = faiss.Kmeans(256, args.words, niter=args.iters, seed=bow.seed, verbose=False,
                          max_points_per_centroid=max(256, -(-n // args.words)))
    kmeans.train(np.unpackbits(desc, axis=1).astype(np.float32) * 2.0 - 1.0)
    floats = np.packbits(kmeans.centroids >= 0, axis=1)
    t_float = time.perf_counter() - t

    print(f"{'method':<34}{'fit s':>8}{f'{args.split} recall@1':>16}")
    print(f"{'k-majority (orb_bow.py)':<34}{t_majority:>8.1f}{score(majority):>16.3f}")
    print(f"{'faiss.Kmeans on +-1 bits, sign':<34}{t_float:>8.1f}{score(floats):>16.3f}")
    print(f"k-majority is {t_float / t_majority:.1f}x faster")


if __name__ == "__main__":
    main()
