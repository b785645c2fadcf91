"""Every re-ranker is registered here and built by one function, for evaluate.py and retrieve.py alike.

A re-ranker is a callable `(rows, ids, scores) -> (ids, scores)`: the model's ranked candidates of some
query rows in, a new order (and scores) out (retrieval/ranking.py applies it to each chunk of queries). A
builder gets the `rerank=` node and a `RerankSource` (the database, the queries being ranked, the feature
cache, the training split when the dataset has one) and returns one:

    @RERANKERS.register("my_reranker")
    def build(cfg: Mapping[str, Any], source: RerankSource) -> Reranker: ...

`rerank=my_reranker` (conf/rerank/my_reranker.yaml with `name: my_reranker`) then works in both pipelines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from siamese_retrieval.errors import ConfigError
from siamese_retrieval.registry import RERANKERS
from siamese_retrieval.retrieval.orb_features import (
    Features,
    OrbFeatureConfig,
    cached_features,
    extract_features,
)
from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig, rerank_evidence, rerank_scores
from siamese_retrieval.retrieval.ranking import FusedReranker, InlierReranker, Reranker
from siamese_retrieval.retrieval.trusted_rerank import (
    FEATURES,
    SECOND_OPINION,
    TrustedReranker,
    TrustRule,
    fitted_rule,
    load_rule,
    never,
    rule_path,
    save_rule,
)

log = logging.getLogger(__name__)


@dataclass
class RerankSource:
    """What a re-ranker is built from.

    dataset: the RetrievalDataset whose database is ranked.
    query_idx: the dataset's queries being ranked, in row order (evaluate.py); None with `query_files`.
    query_files: outside images being ranked, in row order (retrieve.py); None with `query_idx`.
    cache_dir: where features are cached (None: no cache).
    orb: the `orb_ransac` node (ORB features and RANSAC) shared by the ORB re-rankers and baselines.
    splits: the dataset's place split (its train split fits learned re-rankers); None for split=all / retrieve.
    split: the name of the split being ranked (a warning when it is the training split).
    log_dir: where a re-ranker fitted now logs its training (evaluate.py: the run dir); None: nowhere.
    reference: () -> (dataset, splits): training data for a learned re-ranker where `splits` is None (the
        pipelines pass the synthetic city: data.train_views.reference_training_set); None: none.
    """

    dataset: Any
    query_idx: np.ndarray | None = None
    query_files: Sequence[Path] | None = None
    cache_dir: Path | None = None
    orb: Mapping[str, Any] = field(default_factory=dict)
    splits: Any = None
    split: str = "test"
    log_dir: Path | None = None
    reference: Callable[[], tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        if (self.query_idx is None) == (self.query_files is None):
            raise ValueError("RerankSource: give exactly one of query_idx and query_files")


def build_reranker(cfg: Mapping[str, Any], source: RerankSource) -> Reranker:
    """The re-ranker `cfg["name"]` names (a one-line ConfigError lists the registered ones)."""
    builder = RERANKERS.get(str(cfg.get("name")), key="rerank")
    return builder(cfg, source)


# ----------------------------------------------------------------------------------------- ORB features


def orb_config(node: Mapping[str, Any]) -> tuple[OrbRansacConfig, int]:
    """The `orb_ransac` node -> (OrbRansacConfig, worker threads); a bad value is one ConfigError."""
    params = dict(node)
    workers = int(params.pop("workers", 2))
    try:
        return OrbRansacConfig(**params), workers
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"orb_ransac: {exc}") from None


def dataset_orb_features(cfg: OrbRansacConfig | OrbFeatureConfig, workers: int, dataset: Any,
                         cache_dir: Path | None) -> tuple[list[Features], list[Features]]:
    """(database, query) ORB features of every image of the dataset, cached together under its fingerprint."""
    files = [dataset.root / p for p in dataset.db_paths + dataset.q_paths]
    feats = cached_features(files, {"fingerprint": dataset.fingerprint}, cfg, cache_dir, workers)
    return feats[: dataset.n_db], feats[dataset.n_db :]


CandidateMeasure = Callable[..., np.ndarray]  # rerank_scores or rerank_evidence (retrieval/orb_ransac.py)
Verify = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows, candidates) -> per-candidate scores or evidence


def orb_rows(queries: Sequence[Features], db: Sequence[Features], cfg: OrbRansacConfig, workers: int,
             measure: CandidateMeasure) -> Verify:
    """(rows, candidates) -> `measure` of those query rows (their features: `queries[row]`) against their
    candidates: the shape every ORB re-ranker and the trust rule's fitting call verification through."""
    return lambda rows, candidates: measure(candidates, [queries[int(r)] for r in rows], db, cfg, workers)


def orb_measure(source: RerankSource, measure: CandidateMeasure) -> Verify:
    """(rows, candidates) -> `measure` of the ranked query rows against their candidates: `rerank_scores`, the
    RANSAC homography inlier counts (len(rows), N), or `rerank_evidence`, the ORB + RANSAC EVIDENCE
    (len(rows), N, F) of each candidate. The features: the dataset's cache, plus outside queries extracted now
    (they have no fingerprint to cache them under)."""
    cfg, workers = orb_config(source.orb)
    if source.query_idx is not None:
        db, queries = dataset_orb_features(cfg, workers, source.dataset, source.cache_dir)
        return orb_rows([queries[int(i)] for i in source.query_idx], db, cfg, workers, measure)
    ds = source.dataset
    db = cached_features([ds.root / p for p in ds.db_paths], {"fingerprint": ds.fingerprint}, cfg, source.cache_dir,
                         workers)
    return orb_rows(extract_features(list(source.query_files), cfg, workers), db, cfg, workers, measure)


def with_opinion(evidence: Verify, opinion: Verify) -> Verify:
    """The EVIDENCE plus a second verifier's score of each candidate as one more column (trusted_rerank's
    SECOND_OPINION)."""
    def both(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        e = evidence(rows, candidates)
        return np.concatenate([e, np.asarray(opinion(rows, candidates), e.dtype)[..., None]], axis=-1)
    return both


def trust_rule(source: RerankSource, width: int, name: str = "rerank=fused",
               opinion_of: Callable[[Any], Verify] | None = None, opinion_key: Any = None) -> TrustRule:
    """The trust rule (retrieval/trusted_rerank.py), fitted on the dataset's training split, or on the reference
    training set (the synthetic city's) where the dataset has none here or too little to learn from; cached as
    JSON. With neither, every query abstains (a warning says so). `opinion_of(dataset)` -> a second verifier over
    that dataset's queries and database adds its agreement to the evidence (`opinion_key` names it in the cache)."""
    cfg, workers = orb_config(source.orb)
    abstain = never(FEATURES if opinion_of is None else SECOND_OPINION)
    fit = dict(cfg=cfg, workers=workers, width=width, cache_dir=source.cache_dir, name=name, opinion_of=opinion_of,
               opinion_key=opinion_key, abstain=abstain)
    if source.splits is not None:
        rule = _fitted_trust_rule(source.dataset, source.splits, **fit)
        if rule is not None:
            return rule
        log.warning("%s: too few training queries of this dataset verify to learn when to trust them; using the "
                    "reference training set's rule", name)
    if source.reference is None:
        if source.splits is None:
            raise ConfigError(f"{name} learns when to trust verification from a training split; this dataset "
                              "has none here and no reference training set was given: use rerank=orb_ransac")
        log.warning("%s: no reference training set either: every query keeps the model's order", name)
        return abstain
    reference, splits = source.reference()
    rule = _fitted_trust_rule(reference, splits, **fit)
    if rule is None:
        log.warning("%s: the reference training set gives nothing to learn from: every query keeps the model's "
                    "order", name)
        return abstain
    return rule


def _fitted_trust_rule(train_ds: Any, splits: Any, cfg: OrbRansacConfig, workers: int, width: int,
                       cache_dir: Path | None, name: str, opinion_of: Callable[[Any], Verify] | None,
                       opinion_key: Any, abstain: TrustRule) -> TrustRule | None:
    """The rule of one dataset's training split: from the cache, or fitted (seconds) and cached; None when there
    is too little to learn from (also cached, as `abstain`)."""
    from dataclasses import asdict

    from siamese_retrieval.retrieval.learned_matches import TrainConfig
    from siamese_retrieval.retrieval.verifier_fit import TrainData, training_candidates

    key = {"fingerprint": train_ds.fingerprint, "orb": asdict(cfg), "width": width,
           "train_q": [int(q) for q in splits.train_q], "train_db_n": int(len(splits.train_db))}
    if opinion_of is not None:
        key["opinion"] = opinion_key
    path = rule_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        rule = load_rule(path)
        if rule is not None:
            return None if rule.n_train == 0 else rule
    db, queries = dataset_orb_features(cfg, workers, train_ds, cache_dir)
    data = TrainData.of(train_ds, splits, db, queries)
    picked = training_candidates(data, TrainConfig(positives=2, partial=4, lookalikes=max(width - 6, 1), seed=0))
    ds_name = train_ds.name or Path(train_ds.root).name
    log.info("%s: fitting its trust rule on %s's training split (%d queries)", name, ds_name, len(picked))
    evidence = orb_rows(queries, db, cfg, workers, rerank_evidence)
    if opinion_of is not None:
        evidence = with_opinion(evidence, opinion_of(train_ds))
    rule = fitted_rule(evidence, np.array([q for q, _ in picked], np.int64), [c for _, c in picked],
                       lambda q, c: data.truth.lookup(np.array([q]), np.maximum(c, 0)[None])[0][0],
                       source=f"{ds_name} training split", width=width) if picked else None
    if path is not None:
        save_rule(rule or abstain, path)
    return rule


# ----------------------------------------------------------------------------------------- the re-rankers


@RERANKERS.register("orb_ransac")
def orb_ransac(cfg: Mapping[str, Any], source: RerankSource) -> Reranker:
    """The model's top N re-ordered by ORB + RANSAC inliers alone (ties: the model's order)."""
    return InlierReranker(int(cfg.get("top_n", 20)), orb_measure(source, rerank_scores))


@RERANKERS.register("fused")
def fused(cfg: Mapping[str, Any], source: RerankSource) -> Reranker:
    """The model's order; per query, the best-verified candidate moves to rank 1 only where the learned trust rule
    believes it (retrieval/trusted_rerank.py), else the query abstains and keeps the model's order."""
    top_n = int(cfg.get("top_n", 20))
    return TrustedReranker(top_n, orb_measure(source, rerank_evidence), trust_rule(source, top_n),
                           threshold=float(cfg.get("trust_threshold", 0.5)), skip_margin=cfg.get("skip_margin"),
                           max_rank=cfg.get("max_challenger_rank"))


@RERANKERS.register("learned_matches")
def learned_matches(cfg: Mapping[str, Any], source: RerankSource) -> Reranker:
    """The model's top N re-ordered with a learned match verifier (retrieval/learned_matches.py), fitted on the
    dataset's TRAINING split at first use (a minute or two on CPU) and cached in the data cache. Where the dataset
    has no training split (split=all, retrieve.py) the verifier of the reference training set (the synthetic
    city's) is used: fitted once, then a cache hit for every dataset.

    combine=trusted (the default) is rerank=fused's abstaining rule with the verifier's agreement as a 7th feature:
    the verifier alone re-ordered real photographs worse than RANSAC (viewpoint stress set 0.93-0.95 recall@1
    against 0.98-1.0), so it vetoes or supports a promotion instead of choosing one."""
    from siamese_retrieval.retrieval import learned_matches as lm
    from siamese_retrieval.retrieval import verifier_fit

    lm_cfg = lm.LearnedMatchesConfig.from_mapping(cfg)
    if source.split == "train":
        log.warning("rerank=learned_matches on split=train: the verifier was fitted on these very queries")
    train_ds, splits = source.dataset, source.splits
    if splits is None:
        if source.reference is None:
            raise ConfigError("rerank=learned_matches is fitted on a training split; this dataset has none here and no "
                              "reference training set was given: use split=test|val, or rerank=orb_ransac|fused")
        train_ds, splits = source.reference()
        log.info("rerank=learned_matches: no training split here; the verifier of %s's training split",
                 train_ds.name or train_ds.root)
    loaded: dict[int, tuple[list[Features], list[Features]]] = {}

    def features_of(ds: Any) -> tuple[list[Features], list[Features]]:
        """Each dataset's verifier (database, query) features, read from the cache once: the same extractor and
        cache as orb_ransac's, at the verifier's own n_features."""
        if id(ds) not in loaded:
            loaded[id(ds)] = dataset_orb_features(lm_cfg.features, lm_cfg.workers, ds, source.cache_dir)
        return loaded[id(ds)]

    train_db_feats, train_q_feats = features_of(train_ds)
    data = verifier_fit.TrainData.of(train_ds, splits, train_db_feats, train_q_feats, fingerprint=train_ds.fingerprint)
    net = verifier_fit.fit_or_load(data, lm_cfg, source.cache_dir, source.log_dir)
    db_feats, queries = features_of(source.dataset)
    q_feats = ([queries[int(i)] for i in source.query_idx] if source.query_idx is not None
               else extract_features(list(source.query_files), lm_cfg.features, lm_cfg.workers))
    verify = lm.LearnedVerifier(net, q_feats, db_feats, lm_cfg.matching)
    if lm_cfg.combine == "trusted":  # rerank=fused's per-query abstention, the verifier's agreement one more feature
        def opinion_of(ds: Any) -> Verify:  # rows are ds's query ids
            db, queries = features_of(ds)
            return lm.LearnedVerifier(net, queries, db, lm_cfg.matching)

        rule = trust_rule(source, lm_cfg.top_n, "rerank=learned_matches", opinion_of,
                          verifier_fit.cache_path(data, lm_cfg, ".").name)
        return TrustedReranker(lm_cfg.top_n, with_opinion(orb_measure(source, rerank_evidence), verify), rule,
                               threshold=lm_cfg.trust_threshold, max_rank=lm_cfg.max_challenger_rank)
    if lm_cfg.combine == "fused":  # soft inlier counts as evidence added to the model's order (rerank=fused's rule)
        return FusedReranker(lm_cfg.top_n, verify, min_inliers=lm_cfg.min_inliers, saturate=lm_cfg.saturate,
                             outlier_z=lm_cfg.outlier_z)
    return lm.LearnedReranker(lm_cfg.top_n, verify, lm_cfg.model_weight)

