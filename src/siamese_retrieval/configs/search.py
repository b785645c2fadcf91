"""The schema of search and verification: index, rerank, orb_ransac, orb_bow (conf/index, conf/rerank, conf/orb)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from siamese_retrieval.configs.fields import ABSENT, Getter, is_int, knob, node
from siamese_retrieval.configs.model import SEED_RANGE
from siamese_retrieval.errors import ConfigError


@dataclass
class Index:
    """The FAISS index (retrieval/index.py IndexConfig)."""

    kind: str = knob("factory: set by index.factory", choices=("flat", "ivf", "ivfpq", "factory"))
    metric: str = knob("l2 | ip (inner product)", choices=("l2", "ip"))
    num_threads: Optional[int] = knob("FAISS threads; null: torch's", ge=1)
    nlist: Optional[int] = knob("null: ~4 sqrt(n)", ge=1)
    nprobe: int = knob(ge=1)
    pq_m: int = knob(ge=1)
    pq_bits: int = knob(ge=1)
    use_gpu: bool = knob()
    factory: Optional[str] = knob("a faiss.index_factory string; null: `kind` decides")
    k_factor: int = knob("Refine shortlist: k x k_factor candidates re-ranked exactly", ge=1)
    tune: bool = knob()
    target_recall: float = knob("recall@10 agreement with exact search that tune aims for", gt=0, le=1)

    @staticmethod
    def check(get: Getter, at: str) -> None:
        factory, kind = get("factory"), get("kind")
        if isinstance(factory, str) and not factory.strip():
            raise ConfigError(f"{at}factory='': must be a faiss.index_factory string or null")
        if kind == "factory" and factory is None:
            raise ConfigError(f"{at}kind='factory': needs {at}factory (a faiss.index_factory string)")


def _side_order(get: Getter, at: str) -> None:
    lo, hi = get("min_side"), get("max_side")
    if is_int(lo) and is_int(hi) and lo > hi:
        raise ConfigError(f"{at}min_side={lo}: must be <= {at}max_side ({hi})")


@dataclass
class OrbFeatures:
    """ORB features of an image (retrieval/orb_features.py OrbFeatureConfig)."""

    n_features: int = knob("ORB features per image", ge=1)
    fast_threshold: int = knob("ORB's FAST threshold", ge=0)
    min_side: int = knob("smaller images are upscaled first; <= max_side", ge=1)
    max_side: int = knob("larger images are downscaled first", ge=1)

    check = staticmethod(_side_order)  # min_side <= max_side


@dataclass
class VerifierFeatures(OrbFeatures):
    n_features: int = knob("a match needs two features at least", ge=2)
    fast_threshold: int = knob(ge=1)


@dataclass
class VerifierMatching:
    ratio: float = knob("Lowe's ratio test", gt=0, le=1)
    mutual: bool = knob()
    max_matches: int = knob(ge=1)


@dataclass
class VerifierNetwork:
    hidden: int = knob(ge=1)
    blocks: int = knob(ge=0)
    pool: str = knob(choices=("inliers", "learned"))


@dataclass
class VerifierTraining:
    seed: int = knob(**SEED_RANGE)
    positives: int = knob(ge=0)
    partial: int = knob(ge=0)
    lookalikes: int = knob(ge=0)
    labels: str = knob(choices=("ransac", "ransac_relevant"))
    ransac_threshold: float = knob(gt=0)
    min_matches: int = knob("a homography needs 4", ge=4)
    epochs: int = knob(ge=1)
    batch_pairs: int = knob(ge=1)
    lr: float = knob(gt=0)
    weight_decay: float = knob(ge=0)
    match_loss: float = knob(ge=0)
    pair_loss: float = knob(ge=0)
    max_seconds: float = knob(gt=0)


@dataclass
class Rerank:
    """conf/rerank/<name>.yaml: the re-ranker of the top candidates (retrieval/rerankers.py)."""

    name: str = knob("registry RERANKERS")
    top_n: int = knob("candidates verified geometrically", ge=1)
    min_inliers: int = knob("inliers for a verified candidate", ge=1)
    saturate: Optional[int] = knob("null: = min_inliers", ge=1)
    outlier_z: float = knob("robust spreads above the query's median inliers", ge=0)
    skip_margin: Optional[float] = knob("null: verify every query", ge=0)
    trust_threshold: float = knob("re-rank a query when P(challenger right) >= this", gt=0, lt=1)
    max_challenger_rank: Optional[int] = knob("a challenger the model ranked below this abstains", ge=2)
    combine: str = knob("trusted: the abstaining trust rule + the verifier's agreement | replace: the verifier's "
                        "order | fused: FusedReranker over soft inlier counts", choices=("trusted", "replace", "fused"))
    model_weight: float = knob("verifier score + this x the model's relevance", ge=0)
    workers: int = knob(ge=1)
    features: Optional[VerifierFeatures] = node()
    matching: Optional[VerifierMatching] = node()
    network: Optional[VerifierNetwork] = node()
    train: Optional[VerifierTraining] = node()

    @staticmethod
    def check(get: Getter, at: str) -> None:
        saturate, min_inliers = get("saturate"), get("min_inliers")
        if is_int(saturate) and is_int(min_inliers) and saturate < min_inliers:
            raise ConfigError(f"{at}saturate={saturate}: must be >= {at}min_inliers ({min_inliers}) or null")
        if get("combine") == "fused" and get("network.pool") not in ("inliers", ABSENT):
            raise ConfigError(f"{at}network.pool={get('network.pool')!r}: {at}combine='fused' needs "
                              f"{at}network.pool='inliers' (soft inlier counts)")


@dataclass
class OrbRansac:
    """conf/orb/default.yaml: ORB features + RANSAC (retrieval/orb_ransac.py OrbRansacConfig)."""

    n_features: int = knob(ge=1)
    ratio: float = knob("Lowe's ratio test", gt=0, le=1)
    ransac_threshold: float = knob(gt=0)
    ransac_method: str = knob(choices=("usac", "ransac", "rho"))
    ransac_max_iters: int = knob(ge=1)
    fast_threshold: int = knob("ORB's FAST threshold", ge=0)
    min_matches: int = knob("a homography needs 4", ge=4)
    min_side: int = knob("<= max_side", ge=1)
    max_side: int = knob(ge=1)
    workers: int = knob(ge=1)

    check = staticmethod(_side_order)  # min_side <= max_side


@dataclass
class OrbBow:
    """method=orb_bow (retrieval/orb_bow.py BowConfig)."""

    vocabulary_size: int = knob("K visual words", ge=2)
    kmeans_samples: int = knob(">= vocabulary_size", ge=1)
    kmeans_iters: int = knob(ge=1)
    weighting: str = knob("tf: no idf weights (retrieval/orb_bow.py)", choices=("tfidf", "tf"))
    power: float = knob("tf ** power; 1: plain tf", gt=0, le=1)
    seed: int = knob(**SEED_RANGE)

    @staticmethod
    def check(get: Getter, at: str) -> None:
        k, n = get("vocabulary_size"), get("kmeans_samples")
        if is_int(k) and is_int(n) and n < k:
            raise ConfigError(f"{at}kmeans_samples={n}: must be >= {at}vocabulary_size ({k})")
