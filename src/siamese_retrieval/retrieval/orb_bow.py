"""A non-learned keypoint baseline: bag of binary words over ORB descriptors, tf-idf, cosine search.

    vocab = cached_vocabulary(train_feats, key, BowConfig(), cache_dir)   # words + idf, from TRAINING images only
    db_vecs, q_vecs = vocab.encode(db_feats), vocab.encode(q_feats)       # (n, K) L2-normalised histograms
    ranking = rank_bow(db_vecs, q_vecs, query_idx, truth, settings)       # the engine's Ranking and metrics

The features are orb_ransac.py's (same extraction, same cache): the baseline differs from ORB+RANSAC only
in how two images are compared. It is the fair yardstick for a learned model of keypoint sets: the same
descriptors, no geometry, no labels, only what unsupervised statistics of the training images give.

Vocabulary. K visual words by k-majority (Grana et al. 2013): k-means in Hamming space with binary
centroids, on a seeded sample of the TRAINING images' descriptors. Assignment is a popcount nearest-word
search (faiss.knn_hamming, the kernel orb_ransac.py matches with); a word's update is the bitwise majority of
its members, the binary point nearest to them in summed Hamming distance. So a word is itself a 32-byte
descriptor, fitting and encoding stay in Hamming space, and the fit is ~10x cheaper than FAISS' float k-means
on the +-1 bit vectors (for those, L2^2 = 4 x Hamming, so it is the same objective relaxed to real centroids):
experiments/benchmarks/orb_bow_vocabulary.py measures both, at equal retrieval quality.

Weighting. idf_w = log((1 + N) / (1 + n_w)) over the N training images, n_w of which contain word w
(`weighting: tf` leaves it out). A histogram is tf_w^power * idf_w, then L2-normalised: power 0.5 (square
root) damps bursts, the many identical words a repeated window grid or facade texture gives, which raw tf
lets dominate the cosine (Jegou et al. 2009); power 1 is plain tf-idf. Images without keypoints get the zero
vector (score 0 against everything).

Search. Cosine = inner product of the normalised histograms, through the project's FAISS index
(retrieval/index.py, `index=` config, inner-product metric) over the whole database, ranked and scored by
ranking.py's RankingBuilder, exactly as a model's embeddings are (full ranking, or the top search_k).

Cost: the vocabulary is cached (one .npz, written atomically) keyed by the dataset fingerprint, the
training image list, the ORB config and this config; a cache hit leaves only encoding and search.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.search import OrbBow
from siamese_retrieval.errors import ConfigError
from siamese_retrieval.io_utils import cached_npz, stable_hash
from siamese_retrieval.retrieval.index import set_faiss_threads
from siamese_retrieval.retrieval.orb_features import Features
from siamese_retrieval.retrieval.ranking import Ranking, RankingSettings, rank_index

log = logging.getLogger(__name__)

ORB_BOW_CACHE_VERSION = 1
DESC_BITS = 256  # ORB: 32 bytes


@dataclass(frozen=True)
class BowConfig:
    vocabulary_size: int = 4096  # K visual words
    kmeans_samples: int = 100_000  # training descriptors sampled for k-means (all of them when fewer)
    kmeans_iters: int = 10  # Lloyd iterations (fewer when no assignment changes)
    weighting: str = "tfidf"  # tfidf | tf
    power: float = 0.5  # histogram entries tf ** power (0.5: square root, damps bursts; 1: plain tf)
    seed: int = 0  # descriptor sample and k-means initialisation

    def __post_init__(self) -> None:
        check_fields(self, OrbBow, "orb_bow")


@dataclass
class Vocabulary:
    """K binary words (K, 32) uint8 and their idf (K,) float32 (all ones with weighting=tf)."""

    words: np.ndarray
    idf: np.ndarray
    power: float = 0.5
    n_images: int = 0  # training images it was fitted on
    n_descriptors: int = 0  # descriptors k-means ran on

    @property
    def size(self) -> int:
        return len(self.words)

    def assign(self, desc: np.ndarray) -> np.ndarray:
        """Nearest word (Hamming) of each packed descriptor (n, 32) -> (n,) int64."""
        if not len(desc):
            return np.zeros(0, np.int64)
        _, idx = faiss.knn_hamming(np.ascontiguousarray(desc, np.uint8), self.words, 1)
        return idx[:, 0].astype(np.int64)

    def counts(self, feats: Sequence[Features], chunk: int = 512) -> np.ndarray:
        """(n_images, K) float32 word counts, images `chunk` at a time (bounded memory)."""
        out = np.zeros((len(feats), self.size), np.float32)
        for start in range(0, len(feats), chunk):
            part = feats[start : start + chunk]
            sizes = np.array([len(f.desc) for f in part], np.int64)
            if not sizes.sum():
                continue
            words = self.assign(np.concatenate([f.desc for f in part]))
            rows = np.repeat(np.arange(len(part)), sizes)
            out[start : start + len(part)] = np.bincount(rows * self.size + words,
                                                         minlength=len(part) * self.size).reshape(len(part), -1)
        return out

    def encode(self, feats: Sequence[Features]) -> np.ndarray:
        """(n_images, K) float32 L2-normalised tf**power * idf histograms (zero rows for images without keypoints)."""
        vecs = self.counts(feats)
        if self.power != 1.0:
            np.power(vecs, self.power, out=vecs)
        vecs *= self.idf[None, :]
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        np.divide(vecs, norms, out=vecs, where=norms > 0)
        return vecs


def training_images(splits: Any, n_db: int) -> tuple[np.ndarray, np.ndarray]:
    """(database indices, query indices) whose descriptors fit the vocabulary and idf: the place split's train
    queries and train-place database images (`Splits.train_db`: those overlapping no val/test query); never a
    val/test image. Without a split (`splits` None, evaluate.py split=all) the database images, no query."""
    if splits is None:
        return np.arange(n_db, dtype=np.int64), np.zeros(0, np.int64)
    return np.asarray(splits.train_db, np.int64), np.asarray(splits.train_q, np.int64)


def k_majority(desc: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means in Hamming space (k-majority, Grana et al. 2013): packed descriptors (n, 32) -> k words (k, 32).

    Lloyd's iterations with binary centroids: assign each descriptor to its nearest word (popcount, FAISS),
    set each word to its members' bitwise majority (a tie reads as 1) -- the binary point that minimises the
    summed Hamming distance to them. Starts from k distinct random descriptors; an emptied word restarts at
    a random descriptor. Stops early when no assignment changes. Deterministic given `rng`.
    """
    n = len(desc)
    bits = np.unpackbits(desc, axis=1)  # (n, 256) uint8
    _, first = np.unique(desc, axis=0, return_index=True)  # distinct starting words where there are enough
    pool = np.sort(first) if len(first) >= k else np.arange(n)
    words = desc[np.sort(rng.choice(pool, size=k, replace=False))].copy()
    labels = np.full(n, -1, np.int64)
    for it in range(iters):
        _, idx = faiss.knn_hamming(desc, words, 1)
        new = idx[:, 0].astype(np.int64)
        changed = int((new != labels).sum())
        log.debug("k-majority iteration %d: %d of %d descriptors changed word", it + 1, changed, n)
        if not changed:
            break
        labels = new
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        filled = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
        ones = np.add.reduceat(bits[order], starts, axis=0, dtype=np.int32)  # (len(filled), 256) set bits
        words[filled] = np.packbits(2 * ones >= counts[filled, None], axis=1)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            words[empty] = desc[rng.choice(n, size=len(empty), replace=False)]
    return words


def fit_vocabulary(feats: Sequence[Features], cfg: BowConfig = BowConfig()) -> Vocabulary:
    """Words (k-majority on a seeded sample of descriptors) and idf from `feats` (the training images only);
    deterministic given cfg.seed. ConfigError when there are fewer descriptors than words."""
    sizes = np.array([len(f.desc) for f in feats], np.int64)
    total = int(sizes.sum())
    if total < cfg.vocabulary_size:
        raise ConfigError(f"orb_bow.vocabulary_size={cfg.vocabulary_size}: the {len(feats)} training images have only "
                          f"{total} ORB descriptors; lower orb_bow.vocabulary_size")
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.kmeans_samples, total)
    pick = np.sort(rng.choice(total, size=n, replace=False)) if n < total else np.arange(total)
    desc = np.ascontiguousarray(np.concatenate([f.desc for f in feats if len(f.desc)])[pick])
    set_faiss_threads()
    words = k_majority(desc, cfg.vocabulary_size, cfg.kmeans_iters, rng)
    vocab = Vocabulary(words, np.ones(cfg.vocabulary_size, np.float32), float(cfg.power), len(feats), n)
    if cfg.weighting == "tfidf":
        present = (vocab.counts(feats) > 0).sum(axis=0)
        vocab.idf = np.log((1.0 + len(feats)) / (1.0 + present)).astype(np.float32)
    log.info("ORB bag of words: %d words from %d descriptors of %d training images in %.1f s", cfg.vocabulary_size,
             n, len(feats), time.perf_counter() - started)
    return vocab


VOCABULARY_FIELDS = ("words", "idf", "power", "n_images", "n_descriptors")


def vocabulary_cache_path(key: dict, cfg: BowConfig, n_images: int, cache_dir: str | os.PathLike) -> Path:
    """Where `cached_vocabulary` keeps the vocabulary of `n_images` training images under `key` and `cfg`."""
    digest = stable_hash({**key, "cfg": asdict(cfg), "n_images": int(n_images), "version": ORB_BOW_CACHE_VERSION,
                          "faiss": faiss.__version__})
    return Path(cache_dir) / f"orb_bow-{digest}.npz"


def _scalar_problem(arrays: dict[str, np.ndarray], name: str, kinds: str) -> str | None:
    value = arrays[name]
    if value.shape != () or value.dtype.kind not in kinds:
        what = "an integer" if kinds == "iu" else "a number"
        return f"has {name} of dtype {value.dtype} and shape {value.shape}, not {what}"
    return None


def vocabulary_problem(arrays: dict[str, np.ndarray], cfg: BowConfig, n_images: int) -> str | None:
    """Why the arrays of a cached vocabulary cannot be the one `cfg` fits on `n_images` training images (None:
    they can). The cache is data: every array is checked (dtype, shape, finite values, scalars being scalars)."""
    k, width = cfg.vocabulary_size, DESC_BITS // 8
    words, idf = arrays["words"], arrays["idf"]
    if words.dtype != np.uint8 or words.shape != (k, width):
        return f"has words of dtype {words.dtype} and shape {words.shape}, expected uint8 {(k, width)}"
    if idf.dtype != np.float32 or idf.shape != (k,):
        return f"has idf of dtype {idf.dtype} and shape {idf.shape}, expected float32 {(k,)}"
    if not np.isfinite(idf).all():
        return "has non-finite idf weights"
    if cfg.weighting == "tf" and not (idf == 1).all():
        return "has idf weights other than 1 (weighting=tf)"
    if cfg.weighting == "tfidf" and ((idf < 0).any() or (idf > np.log1p(n_images) + 1e-4).any()):
        return f"has idf weights outside [0, log(1 + {n_images})]"
    for name, kinds in (("power", "f"), ("n_images", "iu"), ("n_descriptors", "iu")):
        problem = _scalar_problem(arrays, name, kinds)
        if problem is not None:
            return problem
    if float(arrays["power"]) != float(cfg.power):
        return f"has power {float(arrays['power'])!r}, expected {float(cfg.power)!r}"
    if int(arrays["n_images"]) != n_images:
        return f"was fitted on {int(arrays['n_images'])} images, expected {n_images}"
    if not k <= int(arrays["n_descriptors"]) <= cfg.kmeans_samples:
        return (f"has n_descriptors {int(arrays['n_descriptors'])}, outside [{k}, {cfg.kmeans_samples}] "
                f"(vocabulary_size, kmeans_samples)")
    return None


def cached_vocabulary(feats: Sequence[Features], key: dict, cfg: BowConfig,
                      cache_dir: str | os.PathLike | None) -> Vocabulary:
    """`fit_vocabulary`, cached in `cache_dir` as one .npz (written atomically) keyed by `key` (the dataset
    fingerprint, the training image list, the ORB config) and `cfg`. No cache when `cache_dir` is None. A cached
    vocabulary that does not fit `cfg` in every array (`vocabulary_problem`) is refitted with one warning."""
    fit = lambda: dataclasses.asdict(fit_vocabulary(feats, cfg))  # noqa: E731
    if cache_dir is None:
        return Vocabulary(**fit())
    arrays = cached_npz(vocabulary_cache_path(key, cfg, len(feats), cache_dir), VOCABULARY_FIELDS, "ORB vocabulary",
                        fit, logger=log, problem=lambda a: vocabulary_problem(a, cfg, len(feats)))
    return Vocabulary(np.ascontiguousarray(arrays["words"]), np.ascontiguousarray(arrays["idf"]),
                      float(arrays["power"]), int(arrays["n_images"]), int(arrays["n_descriptors"]))


def rank_bow(db_vecs: np.ndarray, q_vecs: np.ndarray, query_idx: np.ndarray, truth: Any,
             settings: RankingSettings) -> Ranking:
    """Rank the whole database (or its top search_k) by cosine of the histograms; the engine's metrics."""
    return rank_index(db_vecs, q_vecs, "ip", query_idx, truth, settings)
