"""FAISS nearest-neighbour search over database embeddings.

    index = build_index(db_emb, IndexConfig(kind="flat"))      # exact; "ivf" / "ivfpq" for large databases
    distances, ids = search(index, query_emb, k=10)           # (m, k) float32, (m, k) int64

Large databases (10^5..10^7 vectors) use a `faiss.index_factory` string instead of a kind, e.g. the
OPQ rotation + IVF-PQ + exact re-ranking of a shortlist of conf/index/opq_ivfpq_refine.yaml:

    cfg = IndexConfig(factory="OPQ16_64,IVF{nlist},PQ16x8,Refine(Flat)", nprobe=16, k_factor=16)
    index = build_index(db_emb, cfg)                           # "{nlist}" -> cfg.nlist or ~4 sqrt(n)
    tuned = tune_search_params(index, db_emb, held_out_queries, target_recall=0.95, k=10)

`tune_search_params` picks the cheapest (nprobe, k_factor) whose recall@k agreement with exact search
reaches the target on held-out queries and sets it on the index; `IndexConfig(tune=True)` does the same
inside `build_index` on a leave-one-out sample of database rows.

Distances are what FAISS returns: for metric "l2" they are SQUARED Euclidean distances (smaller is
closer), for metric "ip" they are inner products (larger is closer); models.distance.Distance turns
them back into the model's distance. With a Refine stage they are exact (recomputed on the stored
vectors). Ids are database row numbers; FAISS pads with id -1 when an approximate index finds fewer than
k candidates in the probed lists.

Threads: FAISS uses OpenMP. Every build/search sets FAISS' thread count to `IndexConfig.num_threads`,
or, when that is None, to `torch.get_num_threads()`, so torch and FAISS (which share libgomp on Linux
wheels) never oversubscribe the cores by more than the user already asked torch for. Importing faiss and
torch together in either order is tested (tests/test_index.py) on this stack.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import faiss
import numpy as np
import torch

from siamese_retrieval.configs.fields import check_fields
from siamese_retrieval.configs.search import Index
from siamese_retrieval.errors import ConfigError, first_line
from siamese_retrieval.io_utils import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "IndexConfig",
    "TunedSearch",
    "build_index",
    "search",
    "search_params",
    "set_search_params",
    "tune_search_params",
    "recall_agreement",
    "save_index",
    "load_index",
    "index_problem",
    "place_index",
]

# FAISS' k-means warns below this many training points per centroid.
_MIN_POINTS_PER_CENTROID = 39
# A factory index trains on at most this many points per centroid (FAISS' own k-means sampling cap).
_MAX_TRAIN_POINTS_PER_CENTROID = 256
# IndexConfig(tune=True): database rows used as held-out (leave-one-out) tuning queries.
_TUNE_QUERIES = 1000
# tune_search_params' default k_factor grid goes up to this (shortlist = k * k_factor candidates).
_MAX_K_FACTOR = 256


@dataclass(frozen=True)
class IndexConfig:
    """How to index the database.

    kind:        "flat" (exact, default), "ivf" (inverted lists over exact vectors) or
                 "ivfpq" (inverted lists over product-quantised codes: smallest, least exact).
                 "factory" when `factory` is set (set automatically: the factory string defines the index).
    metric:      "l2" (squared Euclidean) or "ip" (inner product; cosine on L2-normalised embeddings).
    nlist:       number of inverted lists; None = auto, ~4*sqrt(n) but at most n // 39 so that
                 k-means has enough points per centroid. In a factory string it replaces "{nlist}".
    nprobe:      lists visited per query (capped at nlist). Higher = more exact, slower.
    pq_m:        sub-quantizers for "ivfpq"; must divide the embedding dimension.
    pq_bits:     bits per sub-quantizer code; training needs at least 2**pq_bits vectors.
    use_gpu:     move the index to a GPU when this faiss build has one; silently CPU otherwise.
    num_threads: FAISS OpenMP threads; None = torch.get_num_threads().
    factory:     a faiss.index_factory string, e.g. "OPQ16_64,IVF{nlist},PQ16x8,Refine(Flat)"; built with
                 `metric`; overrides kind / pq_m / pq_bits. Trained on a sample of at most 256 points
                 per centroid.
    k_factor:    Refine(...) indexes: the base index returns k * k_factor candidates per query, which
                 are re-ranked exactly; higher = more exact, slower. Ignored without a Refine stage.
    tune:        after building, pick the cheapest (nprobe, k_factor) whose recall@10 agreement with
                 exact search reaches `target_recall` on up to 1000 held-out database rows (leave-one-out);
                 skipped when nprobe already covers every list (full rankings probe everything).
    target_recall: the recall@10 agreement `tune` aims for, in (0, 1].
    """

    kind: Literal["flat", "ivf", "ivfpq", "factory"] = "flat"
    metric: Literal["l2", "ip"] = "l2"
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int = 8
    pq_bits: int = 8
    use_gpu: bool = False
    num_threads: int | None = None
    factory: str | None = None
    k_factor: int = 16
    tune: bool = False
    target_recall: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.factory, str) and self.factory.strip():
            object.__setattr__(self, "kind", "factory")  # the factory string defines the index
        check_fields(self, Index, "index")


def set_faiss_threads(num_threads: int | None = None) -> int:
    """Set FAISS' OpenMP thread count (None = torch's intra-op thread count); return it."""
    n = int(num_threads) if num_threads else max(1, torch.get_num_threads())
    faiss.omp_set_num_threads(n)
    return n


def _as_float32(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) array, got shape {x.shape}")
    return x


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _flat(d: int, metric: str) -> faiss.Index:
    return faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)


def _nlist(cfg: IndexConfig, n: int) -> int:
    """cfg.nlist, or when None ~4*sqrt(n) but at most n // 39 (enough k-means points per centroid)."""
    if cfg.nlist is not None:
        return int(cfg.nlist)
    return max(1, min(int(round(4 * math.sqrt(n))), n // _MIN_POINTS_PER_CENTROID))


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def _with_base(index: faiss.IndexRefine, base: faiss.Index) -> faiss.IndexRefine:
    """The Refine index `index` over another `base` (its base index moved to or from the GPU)."""
    out = faiss.IndexRefine(base, index.refine_index)
    out.k_factor = index.k_factor
    out.referenced_objects = [base, index]  # `index` owns the refine index's vectors
    return out


def _to_gpu(index: faiss.Index) -> faiss.Index:
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    if isinstance(index, faiss.IndexRefine):
        # the base index (OPQ + IVF-PQ) searches on the GPU; the exact re-ranking of its shortlist reads
        # the stored vectors through a CPU distance computer, which GPU indexes do not provide
        return _with_base(index, faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index.base_index))
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def _to_cpu(index: faiss.Index) -> faiss.Index:
    if isinstance(index, faiss.IndexRefine) and type(faiss.downcast_index(index.base_index)).__name__.startswith("Gpu"):
        return _with_base(index, faiss.index_gpu_to_cpu(index.base_index))
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


# ----------------------------------------------------------------------------------------- factory indexes


def _parts(index: Any) -> Iterator[Any]:
    """`index` and the indexes / vector transforms nested in it (refine, pre-transform, id map), downcast."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexRefine):
        yield from _parts(index.base_index)
        if index.refine_index is not None:
            yield from _parts(index.refine_index)
    elif isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            yield faiss.downcast_VectorTransform(index.chain.at(i))
        yield from _parts(index.index)
    elif isinstance(index, faiss.IndexIDMap):
        yield from _parts(index.index)


def _is_ivf(part: Any) -> bool:
    return hasattr(part, "nprobe") and hasattr(part, "nlist")  # CPU IndexIVF* and GpuIndexIVF*


def _faiss_reason(exc: Exception) -> str:
    """The one-line gist of a FAISS C++ exception ("Error in <function> at <file>:<line>: <what>")."""
    text = first_line(exc)
    m = re.match(r"^Error in .*? at \S+:\d+: (.*)$", text)
    return (m.group(1) if m else text).strip()


def _factory_string(cfg: IndexConfig, n: int) -> str:
    return str(cfg.factory).strip().replace("{nlist}", str(_nlist(cfg, n)))


def _training_needs(index: faiss.Index) -> tuple[int, int]:
    """(most inverted lists, most PQ centroids) that training the factory index must fit; 0 if none."""
    nlist = ksub = 0
    for part in _parts(index):
        if _is_ivf(part):
            nlist = max(nlist, int(part.nlist))
        if isinstance(part, faiss.OPQMatrix):
            ksub = max(ksub, 256)  # OPQ trains an 8-bit PQ inside its rotation loop
        pq = getattr(part, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            ksub = max(ksub, int(pq.ksub))
    return nlist, ksub


def _prepare_training(index: faiss.Index) -> list[Any]:
    """Silence FAISS' per-k-means "please provide at least N training points" lines (build_index logs
    one warning instead), and skip polysemous training: index_factory turns it on for 8-bit PQ, it only
    serves Hamming-threshold filtering (the "ht" parameter, never used here) and it is most of the
    training time. Returns the objects to keep alive during training (OPQ's borrowed PQ)."""
    keep: list[Any] = []
    for part in _parts(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
        if isinstance(part, faiss.IndexIVF):
            part.cp.min_points_per_centroid = 1
        pq = getattr(part, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            pq.cp.min_points_per_centroid = 1
        if isinstance(part, faiss.OPQMatrix) and not part.is_trained and part.pq is None:
            opq_pq = faiss.ProductQuantizer(part.d_out, part.M, 8)
            opq_pq.cp.min_points_per_centroid = 1
            part.pq = opq_pq  # borrowed pointer: reset after training
            keep.append((part, opq_pq))
    return keep


def _train_sample(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    if size >= len(x):
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[rows]


def _build_factory(x: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    n, d = x.shape
    description = _factory_string(cfg, n)
    try:
        index = faiss.index_factory(d, description, _faiss_metric(cfg.metric))
    except (RuntimeError, ValueError, TypeError) as exc:
        shown = repr(cfg.factory) + (f" (as {description!r})" if description != cfg.factory else "")
        raise ConfigError(f"index.factory={shown}: faiss.index_factory cannot build it for d={d}: "
                          f"{_faiss_reason(exc)}") from None
    nlist, ksub = _training_needs(index)
    if n < max(nlist, ksub):
        log.warning("database has %d vectors, fewer than the %d inverted lists / %d PQ centroids of %r: "
                    "using a flat (exact) index instead", n, nlist, ksub, description)
        index = _flat(d, cfg.metric)
        index.add(x)
        return index
    for what, count in (("inverted lists", nlist), ("PQ centroids", ksub)):
        if count and n < _MIN_POINTS_PER_CENTROID * count:
            log.warning("database has %d vectors for %d %s (< %d each) in %r: clustering may be poor",
                        n, count, what, _MIN_POINTS_PER_CENTROID, description)
    keep = _prepare_training(index)
    try:
        if not index.is_trained:
            index.train(_train_sample(x, _MAX_TRAIN_POINTS_PER_CENTROID * max(nlist, ksub, 1)))
    finally:
        for opq, _ in keep:
            opq.pq = None
    index.add(x)
    set_search_params(index, nprobe=cfg.nprobe, k_factor=cfg.k_factor)
    return index


def set_search_params(index: faiss.Index, nprobe: int | None = None, k_factor: int | None = None) -> None:
    """Set the search parameters of `index` and of the indexes nested in it (a refine's base, a
    pre-transform's index): `nprobe` on every IVF (capped at its nlist), `k_factor` on every Refine.
    None leaves a parameter as it is; an index without IVF / Refine ignores it."""
    for part in _parts(index):
        if nprobe is not None and _is_ivf(part):
            part.nprobe = max(1, min(int(nprobe), int(part.nlist)))
        if k_factor is not None and isinstance(part, faiss.IndexRefine):
            part.k_factor = float(max(1, int(k_factor)))


def search_params(index: faiss.Index) -> dict[str, int]:
    """{"nlist", "nprobe"} of the first IVF in `index` and {"k_factor"} of its first Refine, when present."""
    out: dict[str, int] = {}
    for part in _parts(index):
        if _is_ivf(part) and "nprobe" not in out:
            out.update(nlist=int(part.nlist), nprobe=int(part.nprobe))
        if isinstance(part, faiss.IndexRefine) and "k_factor" not in out:
            out["k_factor"] = int(round(part.k_factor))
    return out


# ----------------------------------------------------------------------------------------- build


def build_index(db_emb: np.ndarray | torch.Tensor, cfg: IndexConfig | None = None) -> faiss.Index:
    """Index the database embeddings `db_emb` (n, d); IVF/PQ quantizers are trained on them.

    When n is too small for the requested structure (fewer vectors than lists, or fewer than the
    2**pq_bits codebook entries PQ must train), the index falls back to exact "flat" search and a
    warning is logged. A `pq_m` that does not divide d is a configuration error, and so is a factory
    string FAISS cannot build (ConfigError naming the string).
    """
    cfg = cfg or IndexConfig()
    x = _as_float32(db_emb, "database embeddings")
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty database (0 embeddings)")
    set_faiss_threads(cfg.num_threads)

    if cfg.factory is not None:
        index = _build_factory(x, cfg)
    else:
        index = _build_kind(x, cfg)
    if cfg.tune:
        _tune_on_database(index, x, cfg)
    return place_index(index, cfg.use_gpu)


def place_index(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """`index` moved to the GPU when `use_gpu` and this faiss build has one (a warning and the CPU otherwise)."""
    if use_gpu:
        if _gpu_available():
            try:
                index = _to_gpu(index)
            except RuntimeError as exc:
                log.warning("this index cannot move to the GPU (%s): searching on CPU", _faiss_reason(exc))
        else:
            log.warning("use_gpu requested but this faiss build has no GPU available: searching on CPU")
    return index


# What `build_index` makes for each kind: the kind's own index, or the flat one it falls back to on a small database.
_KIND_TYPES: dict[str, tuple[str, ...]] = {
    "flat": ("IndexFlat",),
    "ivf": ("IndexIVFFlat", "IndexFlat"),
    "ivfpq": ("IndexIVFPQ", "IndexFlat"),
}


def index_problem(index: faiss.Index, cfg: IndexConfig, d: int, ntotal: int) -> str | None:
    """Why `index` (e.g. read from a cache: data, not trusted) cannot be the CPU index `build_index` makes with
    `cfg` over `ntotal` vectors of dimension `d` (None: it can): its dimension, size, training, metric and kind."""
    index = faiss.downcast_index(index)
    if int(index.d) != int(d):
        return f"has dimension {index.d}, expected {d} (the embeddings' dimension)"
    if int(index.ntotal) != int(ntotal):
        return f"holds {index.ntotal} vectors, expected {ntotal} (the database images)"
    if not index.is_trained:
        return "is not trained"
    if int(index.metric_type) != _faiss_metric(cfg.metric):
        names = {faiss.METRIC_L2: "l2", faiss.METRIC_INNER_PRODUCT: "ip"}
        return f"uses metric {names.get(int(index.metric_type), int(index.metric_type))}, expected {cfg.metric}"
    allowed = _KIND_TYPES.get(cfg.kind)
    if allowed is not None and not any(isinstance(index, getattr(faiss, name)) for name in allowed):
        return f"is a {type(index).__name__}, not what index kind {cfg.kind!r} builds ({' or '.join(allowed)})"
    if isinstance(index, faiss.IndexIVF):
        quantizer = faiss.downcast_index(index.quantizer)
        if int(quantizer.d) != int(index.d) or int(quantizer.ntotal) != int(index.nlist):
            return (f"has a coarse quantizer of dimension {quantizer.d} with {quantizer.ntotal} centroids, expected "
                    f"{index.d} and {index.nlist}")
    return None


def _build_kind(x: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    n, d = x.shape
    kind = cfg.kind
    nlist = _nlist(cfg, n)
    if kind == "ivfpq" and d % cfg.pq_m != 0:
        raise ConfigError(f"index pq_m={cfg.pq_m} must divide the embedding dimension d={d}")
    if kind in ("ivf", "ivfpq") and n < nlist:
        log.warning("database has %d vectors, fewer than nlist=%d: using a flat (exact) index instead of %s",
                    n, nlist, kind)
        kind = "flat"
    if kind == "ivfpq" and n < 2**cfg.pq_bits:
        log.warning("database has %d vectors, fewer than the %d PQ centroids (pq_bits=%d) needs: "
                    "using a flat (exact) index instead of ivfpq", n, 2**cfg.pq_bits, cfg.pq_bits)
        kind = "flat"
    if kind in ("ivf", "ivfpq") and n < _MIN_POINTS_PER_CENTROID * nlist:
        log.warning("database has %d vectors for nlist=%d lists (< %d per list): IVF clustering may be poor",
                    n, nlist, _MIN_POINTS_PER_CENTROID)
    if kind == "ivfpq" and n < _MIN_POINTS_PER_CENTROID * 2**cfg.pq_bits:
        log.warning("database has %d vectors for %d PQ centroids (< %d each): PQ codebooks may be poor",
                    n, 2**cfg.pq_bits, _MIN_POINTS_PER_CENTROID)

    if kind == "flat":
        index = _flat(d, cfg.metric)
    else:
        quantizer = _flat(d, cfg.metric)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, _faiss_metric(cfg.metric))
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, cfg.pq_bits, _faiss_metric(cfg.metric))
        # the warnings above replace FAISS' own (printed to stderr once per k-means run, i.e. per sub-quantizer)
        index.cp.min_points_per_centroid = 1
        if kind == "ivfpq":
            index.pq.cp.min_points_per_centroid = 1
        index.train(x)
        index.nprobe = min(int(cfg.nprobe), nlist)  # faiss' wrapper keeps `quantizer` alive with the index
    index.add(x)
    return index


# ----------------------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class TunedSearch:
    """What `tune_search_params` chose (and set on the index).

    nprobe / k_factor: the chosen parameters (None: the index has no IVF / no Refine stage);
    recall: recall@k agreement with exact search on the tuning queries at those parameters, and
    recall_se its standard error over the queries;
    reached: whether recall - z * recall_se >= the target (if not, the most exact setting tried was chosen);
    ms_per_query: single-thread search time per tuning query (batched; best of the repeats);
    candidates: (nprobe, k_factor, recall, ms_per_query) of the settings that reached the target with
    the fewest lists for their k_factor and the smallest k_factor for their lists (the Pareto front
    found), the fastest of which was chosen;
    trials: (nprobe, k_factor, recall) of every setting evaluated.
    """

    nprobe: int | None
    k_factor: int | None
    recall: float
    recall_se: float
    reached: bool
    target_recall: float
    k: int
    ms_per_query: float
    candidates: tuple[tuple[int | None, int | None, float, float], ...]
    trials: tuple[tuple[int | None, int | None, float], ...]


def _per_query_recall(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> np.ndarray:
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    return ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1) / k


def recall_agreement(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int | None = None) -> float:
    """Mean over queries of |top-k(approx) intersect top-k(exact)| / k (recall@k agreement; -1 never counts)."""
    return float(_per_query_recall(approx_ids, exact_ids, int(k or np.asarray(exact_ids).shape[1])).mean())


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row that are not the row's own database id (leave-one-out)."""
    keep = ids != np.asarray(self_ids)[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept ids first, in their order
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def _powers_of_two(top: int) -> list[int]:
    """1, 2, 4, ... below `top` (a Python int >= 1), then `top` itself."""
    return [1 << i for i in range((top - 1).bit_length())] + [int(top)]


def tune_search_params(
    index: faiss.Index,
    reference: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    target_recall: float = 0.95,
    k: int = 10,
    *,
    query_ids: np.ndarray | None = None,
    nprobes: list[int] | None = None,
    k_factors: list[int] | None = None,
    z: float = 1.645,
    repeats: int = 3,
    num_threads: int | None = None,
) -> TunedSearch:
    """Pick the cheapest (nprobe, k_factor) of `index` whose recall@k agreement with exact search on the
    held-out `queries` reaches `target_recall`, set it on the index, and return it (`TunedSearch`).

    reference: either the database embeddings (n, d) float, whose exact top-k for `queries` is then
               computed here (faiss.knn, the index's metric), or the exact top-k ids (m, >= k) integers.
    query_ids: when the queries are database rows (a leave-one-out sample), their row numbers: each
               query's own id is left out of both the exact and the approximate results.
    nprobes / k_factors: the grid (default: powers of two up to nlist, and up to 256 or n / k).
    z:         a setting reaches the target when its agreement minus z standard errors (over the
               queries) does: the default 1.645 is a one-sided 95% bound, so that the target holds
               for new queries, not just on average over these; z=0 compares the mean itself.

    Search: for k_factor from the largest down, the fewest lists reaching the target (recall grows with
    both, so that count only rises as k_factor falls: about len(nprobes) + len(k_factors) evaluations);
    for each such nprobe the smallest k_factor is a candidate; candidates are timed single-threaded
    (batched, best of `repeats`) and the fastest wins. If no setting reaches the target,
    the most exact one tried is set, `reached` is False and a warning is logged.
    """
    q = _as_float32(queries, "tuning queries")
    k = int(k)
    if k < 1 or k >= index.ntotal:
        raise ValueError(f"k must be in [1, ntotal) = [1, {index.ntotal}), got {k}")
    loo = query_ids is not None
    if loo:
        query_ids = np.asarray(query_ids, dtype=np.int64)
        if query_ids.shape != (len(q),):
            raise ValueError(f"query_ids must have one database row per query ({len(q)}), got {query_ids.shape}")
    k_search = k + 1 if loo else k
    ref = reference.detach().cpu().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    threads_before = faiss.omp_get_max_threads()
    set_faiss_threads(num_threads)
    try:
        if np.issubdtype(ref.dtype, np.integer):
            exact = ref[:, :k_search].astype(np.int64)
        else:
            db = _as_float32(ref, "reference database")
            exact = faiss.knn(q, db, k_search, metric=faiss.downcast_index(index).metric_type)[1]
        if len(exact) != len(q) or exact.shape[1] < k:
            raise ValueError(f"exact ids must be ({len(q)}, >= {k}), got {exact.shape}")
        exact = _drop_self(exact, query_ids, k) if loo else exact[:, :k]

        params = search_params(index)
        if nprobes is None:
            nprobes = _powers_of_two(params["nlist"]) if "nlist" in params else [None]
        if k_factors is None:
            top_kf = min(_MAX_K_FACTOR, max(1, math.ceil(index.ntotal / k)))
            k_factors = _powers_of_two(top_kf) if "k_factor" in params else [None]
        nprobes, k_factors = sorted(nprobes, key=lambda v: v or 0), sorted(k_factors, key=lambda v: v or 0)

        recalls: dict[tuple[int | None, int | None], tuple[float, float]] = {}  # (mean, standard error)

        def recall_at(npr: int | None, kf: int | None) -> tuple[float, float]:
            if (npr, kf) not in recalls:
                set_search_params(index, nprobe=npr, k_factor=kf)
                ids = index.search(q, k_search)[1]
                per_query = _per_query_recall(_drop_self(ids, query_ids, k) if loo else ids, exact, k)
                se = float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
                recalls[npr, kf] = (float(per_query.mean()), se)
            return recalls[npr, kf]

        def reaches(npr: int | None, kf: int | None) -> bool:
            mean, se = recall_at(npr, kf)
            return mean - z * se >= target_recall

        fewest_candidates: dict[int | None, int | None] = {}  # nprobe -> the smallest k_factor reaching it
        j = 0
        for kf in reversed(k_factors):
            while j < len(nprobes) and not reaches(nprobes[j], kf):
                j += 1
            if j == len(nprobes):
                break  # fewer candidates cannot reach it either
            fewest_candidates[nprobes[j]] = kf  # a larger k_factor with the same nprobe only costs more
        frontier = sorted(fewest_candidates.items(), key=lambda item: item[0] or 0)

        def timed(npr: int | None, kf: int | None) -> float:
            set_search_params(index, nprobe=npr, k_factor=kf)
            faiss.omp_set_num_threads(1)
            best = math.inf
            for _ in range(max(1, int(repeats))):
                t = time.perf_counter()
                index.search(q, k_search)
                best = min(best, time.perf_counter() - t)
            set_faiss_threads(num_threads)
            return best * 1e3 / len(q)

        candidates = [(npr, kf, recalls[npr, kf][0], timed(npr, kf)) for npr, kf in frontier]
        if candidates:
            npr, kf, _, ms = min(candidates, key=lambda c: c[3])
            reached = True
        else:
            npr, kf = max(recalls, key=lambda key: (recalls[key][0], -(key[0] or 0), -(key[1] or 0)))
            ms, reached = timed(npr, kf), False
            log.warning("no search setting reaches recall@%d agreement %.3f (best %.3f +- %.3f at nprobe=%s, "
                        "k_factor=%s): using that one", k, target_recall, *recalls[npr, kf], npr, kf)
        rec, rec_se = recalls[npr, kf]
        set_search_params(index, nprobe=npr, k_factor=kf)
    finally:
        faiss.omp_set_num_threads(threads_before)
    return TunedSearch(
        nprobe=npr, k_factor=kf, recall=rec, recall_se=rec_se, reached=reached,
        target_recall=float(target_recall), k=k, ms_per_query=ms, candidates=tuple(candidates),
        trials=tuple((a, b, r) for (a, b), (r, _) in recalls.items()),
    )


def _tune_on_database(index: faiss.Index, x: np.ndarray, cfg: IndexConfig, k: int = 10) -> TunedSearch | None:
    """IndexConfig(tune=True): tune on up to 1000 database rows, each left out of its own results."""
    params = search_params(index)
    if "nprobe" not in params and "k_factor" not in params:
        return None  # nothing to tune (flat)
    if "nlist" in params and int(cfg.nprobe) >= params["nlist"]:
        log.info("index nprobe=%d covers all %d lists: search is exhaustive, not tuned", cfg.nprobe,
                 params["nlist"])
        return None
    if len(x) <= k + 1:
        return None
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=min(_TUNE_QUERIES, len(x)), replace=False))
    t = time.perf_counter()
    tuned = tune_search_params(index, x, x[rows], cfg.target_recall, k=k, query_ids=rows,
                               num_threads=cfg.num_threads)
    log.info("index tuned in %.1f s on %d held-out database rows: nprobe=%s k_factor=%s, recall@%d agreement "
             "%.3f (target %.3f), %.3f ms/query", time.perf_counter() - t, len(rows), tuned.nprobe,
             tuned.k_factor, k, tuned.recall, cfg.target_recall, tuned.ms_per_query)
    return tuned


# ----------------------------------------------------------------------------------------- search / io


def search(
    index: faiss.Index,
    queries: np.ndarray | torch.Tensor,
    k: int,
    batch_size: int = 4096,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database neighbours of each query, in batches of `batch_size` queries.

    Returns (distances (m, k) float32, ids (m, k) int64), best first. For an L2 index distances are
    squared Euclidean; for an inner-product index, similarities. `k` larger than
    the database is capped at `index.ntotal` with a warning. A Refine index's shortlist k * k_factor
    is capped at the database size (a full ranking re-ranks every vector once, not k_factor times).
    """
    q = _as_float32(queries, "query embeddings")
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} does not match the index dimension {index.d}")
    if index.ntotal == 0:
        raise ValueError("cannot search an empty index (ntotal == 0)")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > index.ntotal:
        warnings.warn(f"requested k={k} neighbours but the database has only {index.ntotal} items: "
                      f"using k={index.ntotal}", stacklevel=2)
        k = int(index.ntotal)
    params = None
    if isinstance(index, faiss.IndexRefine) and k * index.k_factor > index.ntotal:
        params = faiss.IndexRefineSearchParameters(k_factor=float(max(1, math.ceil(index.ntotal / k))))
    set_faiss_threads(num_threads)
    m = q.shape[0]
    distances = np.empty((m, k), dtype=np.float32)
    ids = np.empty((m, k), dtype=np.int64)
    step = max(1, int(batch_size))
    for start in range(0, m, step):
        stop = min(m, start + step)
        distances[start:stop], ids[start:stop] = index.search(q[start:stop], k, params=params)
    return distances, ids


def save_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write `index` to `path` atomically (temporary file, then rename). GPU indexes are saved as CPU."""
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(_to_cpu(index), str(tmp))
    return path


def load_index(path: str | os.PathLike, use_gpu: bool = False, nprobe: int | None = None,
               k_factor: int | None = None) -> faiss.Index:
    """Read an index written by `save_index` (nprobe and k_factor are stored with the index; pass them to
    change them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS index at {path}")
    index = faiss.read_index(str(path))
    set_search_params(index, nprobe=nprobe, k_factor=k_factor)
    if use_gpu and _gpu_available():
        index = _to_gpu(index)
    return index
