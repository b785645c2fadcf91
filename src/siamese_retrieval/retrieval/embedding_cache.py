"""Database embeddings + FAISS index cached in the cache directory, so the second search skips embedding.

    <cache_dir>/<key>/embeddings.npy   (n_db, d) float32        (retrieve.py: ${paths.cache_dir}/index/)
                      index.faiss      the FAISS index over them (retrieval/index.py)
                      meta.json        what the key was made of, the checkpoint and database paths, timings

`key` hashes everything the cached content depends on: the checkpoint's content (SHA-256 and size of its
bytes: a copied or moved checkpoint still hits, a rewritten one misses), the dataset fingerprint (its
contract files' bytes), its root and database paths, the input builder's config and the index config.
Anything changes -> another key -> a miss. Nothing is written next to the checkpoint: that folder is
another run's outputs.
Written atomically: the entry is assembled in a private temporary sibling directory with a random name
(io_utils.make_temp_dir) and renamed into place, so a crash or a concurrent writer never leaves a
half-written entry under the key (a reader sees either nothing or the complete entry). A symbolic link
under the key's name (a shared cache folder) is removed, never followed, and the entry rebuilt. A cache
directory that cannot be written only costs the cache (a warning), never the search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from siamese_retrieval.errors import UserError
from siamese_retrieval.io_utils import check_cache_entry, make_temp_dir, no_link, publish_dir, safe_remove, stable_hash
from siamese_retrieval.retrieval.index import (
    IndexConfig,
    build_index,
    index_problem,
    load_index,
    place_index,
    save_index,
)

log = logging.getLogger(__name__)

EMBEDDING_CACHE_VERSION = 2  # 2: in the cache dir, keyed by the checkpoint's content (not its mtime)


@dataclass
class CachedIndex:
    index: faiss.Index
    embeddings: np.ndarray  # (n_db, d) float32
    hit: bool  # True when read from the cache
    seconds: float  # time to get it (load on a hit; embed + build + write on a miss)
    directory: Path | None  # the cache entry (None when caching was impossible or disabled)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's content: where it lies and when it was written do not change the embeddings."""
    return {"size": Path(ckpt_path).stat().st_size, "sha256": file_sha256(ckpt_path)}


def cache_key(ckpt_path: str | os.PathLike, dataset: Any, inputs_cfg: dict[str, Any], index_cfg: IndexConfig) -> dict:
    """What the entry depends on (JSON-serialisable); `stable_hash` of it names the entry."""
    return {
        "version": EMBEDDING_CACHE_VERSION,
        "checkpoint": checkpoint_identity(ckpt_path),
        "dataset_fingerprint": dataset.fingerprint,
        "dataset_root": str(Path(dataset.root).resolve()),
        "db_paths_hash": stable_hash(list(dataset.db_paths)),
        "n_db": int(dataset.n_db),
        "inputs": inputs_cfg,
        "index": {k: v for k, v in asdict(index_cfg).items() if k not in ("use_gpu", "num_threads")},
    }


def embeddings_problem(emb: np.ndarray, n_db: int, dim: int | None) -> str | None:
    """Why cached embeddings cannot be this database's (None: they can): (n_db, dim) float32, finite."""
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n_db or (dim is not None and emb.shape[1] != dim):
        expected = f"({n_db}, {dim if dim is not None else 'd'})"
        return f"has embeddings of dtype {emb.dtype} and shape {emb.shape}, expected float32 {expected}"
    if not np.isfinite(emb).all():
        return "has non-finite embeddings"
    return None


def _read_entry(entry: Path, key: dict, index_cfg: IndexConfig,
                dim: int | None) -> tuple[faiss.Index, np.ndarray] | None:
    """The entry's index and embeddings when they are this key's and fit it in every respect: the database size,
    the embedding dimension `dim` (this checkpoint's; None: the embeddings' own), the index config's metric and
    kind, float32 finite embeddings. Anything else is one warning and None (rebuilt). The entry is data: read with
    allow_pickle=False, never through a link."""
    try:
        meta = json.loads(no_link(entry / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("key") != json.loads(json.dumps(key)):
            log.warning("embedding cache %s does not match its key; rebuilding it", entry)
            return None
        emb = np.load(no_link(entry / "embeddings.npy"), allow_pickle=False)
        index = load_index(no_link(entry / "index.faiss"), use_gpu=False)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        log.warning("embedding cache %s is unreadable (%s); rebuilding it", entry, exc)
        return None
    n_db = int(key["n_db"])
    problem = embeddings_problem(emb, n_db, dim) if isinstance(emb, np.ndarray) else "has no embedding array"
    if problem is None:
        problem = index_problem(index, index_cfg, emb.shape[1], n_db)
        problem = None if problem is None else "index " + problem
    if problem is not None:
        log.warning("embedding cache %s %s; rebuilding it", entry, problem)
        return None
    return place_index(index, index_cfg.use_gpu), emb


def _write_entry(entry: Path, key: dict, emb: np.ndarray, index: faiss.Index, extra: dict[str, Any]) -> bool:
    try:
        tmp = make_temp_dir(entry)  # private, random name: never an existing name or a planted link
    except (OSError, UserError) as exc:
        log.warning("cannot cache the database embeddings under %s (%s): the next search embeds again",
                    entry.parent, getattr(exc, "strerror", None) or exc)
        return False
    try:
        np.save(tmp / "embeddings.npy", emb)
        save_index(index, tmp / "index.faiss")
        (tmp / "meta.json").write_text(json.dumps({"key": key, **extra}, indent=2) + "\n")
        # an older, unreadable entry under the same key is replaced; a link there is removed, never followed
        publish_dir(tmp, entry, "embedding", lambda _: False, log)
        return True
    except (OSError, UserError) as exc:
        log.warning("could not write the embedding cache %s (%s)", entry, getattr(exc, "strerror", None) or exc)
        return False
    finally:
        safe_remove(tmp, ignore_errors=True)


def _usable_entry(entry: Path) -> bool:
    """Whether `entry` may be read or replaced: a symbolic link (or file) under its name is removed (never
    followed) first; one that cannot be removed costs the cache (a warning), never the search."""
    try:
        check_cache_entry(entry, "embedding", "dir", log)
    except (OSError, UserError) as exc:
        log.warning("%s: the database is embedded without the cache", exc)
        return False
    return True


def cached_database_index(
    cache_dir: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    dataset: Any,
    inputs_cfg: dict[str, Any],
    index_cfg: IndexConfig,
    embed: Callable[[], np.ndarray],
    enabled: bool = True,
    dim: int | None = None,
) -> CachedIndex:
    """The database's embeddings and index: from `<cache_dir>/<key>/` when there and valid, else `embed()` + build
    + write. `dim`: the checkpoint's embedding dimension (e.g. its query embeddings'), which a cached entry must
    have (a damaged or foreign one is rebuilt with one warning, never searched)."""
    started = time.perf_counter()
    key = cache_key(ckpt_path, dataset, inputs_cfg, index_cfg)
    entry = Path(cache_dir) / stable_hash(key)
    enabled = enabled and _usable_entry(entry)
    if enabled and entry.is_dir():
        found = _read_entry(entry, key, index_cfg, dim)
        if found is not None:
            index, emb = found
            log.info("embedding cache hit: %s", entry)
            return CachedIndex(index, emb, True, time.perf_counter() - started, entry)
    emb = np.ascontiguousarray(embed(), dtype=np.float32)
    embed_s = time.perf_counter() - started
    index = build_index(emb, index_cfg)
    written = False
    if enabled:
        written = _write_entry(entry, key, emb, index, {
            "checkpoint_path": str(Path(ckpt_path).resolve()),
            "db_paths": list(dataset.db_paths), "dim": int(emb.shape[1]), "embed_s": round(embed_s, 4),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        if written:
            log.info("embedding cache written: %s", entry)
    return CachedIndex(index, emb, False, time.perf_counter() - started, entry if written else None)
