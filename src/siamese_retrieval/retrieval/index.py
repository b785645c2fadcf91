"""FAISS nearest-neighbour search over database embeddings.

    index = build_index(db_emb, IndexConfig(kind="flat"))      # exact; "ivf" / "ivfpq" for large databases
    distances, ids = search(index, query_emb, k=10)           # (m, k) float32, (m, k) int64

Distances are what FAISS returns: for metric "l2" they are SQUARED Euclidean distances (smaller is
closer), for metric "ip" they are inner products (larger is closer); models.distance.Distance turns
them back into the model's distance. Ids are database row numbers; FAISS pads with id -1 when an approximate index finds fewer than
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch

from siamese_retrieval.errors import ConfigError
from siamese_retrieval.io_utils import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "IndexConfig",
    "build_index",
    "search",
    "save_index",
    "load_index",
]

# FAISS' k-means warns below this many training points per centroid.
_MIN_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class IndexConfig:
    """How to index the database.

    kind:        "flat" (exact, default), "ivf" (inverted lists over exact vectors) or
                 "ivfpq" (inverted lists over product-quantised codes: smallest, least exact).
    metric:      "l2" (squared Euclidean) or "ip" (inner product; cosine on L2-normalised embeddings).
    nlist:       number of inverted lists; None = auto, ~4*sqrt(n) but at most n // 39 so that
                 k-means has enough points per centroid.
    nprobe:      lists visited per query (capped at nlist). Higher = more exact, slower.
    pq_m:        sub-quantizers for "ivfpq"; must divide the embedding dimension.
    pq_bits:     bits per sub-quantizer code; training needs at least 2**pq_bits vectors.
    use_gpu:     move the index to a GPU when this faiss build has one; silently CPU otherwise.
    num_threads: FAISS OpenMP threads; None = torch.get_num_threads().
    """

    kind: Literal["flat", "ivf", "ivfpq"] = "flat"
    metric: Literal["l2", "ip"] = "l2"
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int = 8
    pq_bits: int = 8
    use_gpu: bool = False
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "ivfpq"):
            raise ConfigError(f"index kind must be 'flat', 'ivf' or 'ivfpq', got {self.kind!r}")
        if self.metric not in ("l2", "ip"):
            raise ConfigError(f"index metric must be 'l2' or 'ip', got {self.metric!r}")
        for name in ("nprobe", "pq_m", "pq_bits"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and int(self.nlist) < 1:
            raise ConfigError(f"index nlist must be >= 1 or None (auto), got {self.nlist}")


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


def _auto_nlist(n: int) -> int:
    return max(1, min(int(round(4 * math.sqrt(n))), n // _MIN_POINTS_PER_CENTROID))


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def _to_gpu(index: faiss.Index) -> faiss.Index:
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def _to_cpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def build_index(db_emb: np.ndarray | torch.Tensor, cfg: IndexConfig | None = None) -> faiss.Index:
    """Index the database embeddings `db_emb` (n, d); IVF/PQ quantizers are trained on them.

    When n is too small for the requested structure (fewer vectors than lists, or fewer than the
    2**pq_bits codebook entries PQ must train), the index falls back to exact "flat" search and a
    warning is logged. A `pq_m` that does not divide d is a configuration error.
    """
    cfg = cfg or IndexConfig()
    x = _as_float32(db_emb, "database embeddings")
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty database (0 embeddings)")
    set_faiss_threads(cfg.num_threads)

    kind = cfg.kind
    nlist = int(cfg.nlist) if cfg.nlist is not None else _auto_nlist(n)
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
    if cfg.use_gpu:
        if _gpu_available():
            index = _to_gpu(index)
        else:
            log.warning("use_gpu requested but this faiss build has no GPU available: searching on CPU")
    return index


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
    the database is capped at `index.ntotal` with a warning.
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
    set_faiss_threads(num_threads)
    m = q.shape[0]
    distances = np.empty((m, k), dtype=np.float32)
    ids = np.empty((m, k), dtype=np.int64)
    for start in range(0, m, max(1, int(batch_size))):
        stop = min(m, start + max(1, int(batch_size)))
        distances[start:stop], ids[start:stop] = index.search(q[start:stop], k)
    return distances, ids


def save_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write `index` to `path` atomically (temporary file, then rename). GPU indexes are saved as CPU."""
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(_to_cpu(index), str(tmp))
    return path


def load_index(path: str | os.PathLike, use_gpu: bool = False, nprobe: int | None = None) -> faiss.Index:
    """Read an index written by `save_index` (nprobe is stored with IVF indexes; pass one to change it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS index at {path}")
    index = faiss.read_index(str(path))
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    if use_gpu and _gpu_available():
        index = _to_gpu(index)
    return index
