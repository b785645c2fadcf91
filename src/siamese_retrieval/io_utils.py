"""Atomic file writes: a crash or kill mid-write never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """An .npz cache written under a temporary name and renamed: a killed writer leaves no half file."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append .npz to the name
            np.savez(f, **arrays)


def load_npz_cache(path: Path, keys: Sequence[str], what: str) -> dict[str, Any] | None:
    """The arrays of an .npz cache, or None (the file deleted, with a warning) when it cannot be read."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s cache %s is unreadable (%s); rebuilding it", what, path, exc)
        path.unlink(missing_ok=True)
        return None


def cached_npz(
    path: Path | None,
    keys: Sequence[str],
    what: str,
    compute: Callable[[], Mapping[str, Any]],
    validate: Callable[[dict[str, Any]], bool] | None = None,
    logger: logging.Logger = log,
) -> dict[str, Any]:
    """The arrays `keys` of the .npz cache at `path` when it is readable and `validate(arrays)` holds;
    otherwise `compute()`'s arrays, written to `path` atomically. A bad cache is deleted with a warning.
    No cache when `path` is None. `what` names the cache in the messages ("image" -> "image cache hit"),
    which go to `logger` (the caller's)."""
    if path is not None and path.is_file():
        arrays = load_npz_cache(path, keys, what)
        if arrays is not None and validate is not None and not validate(arrays):
            logger.warning("%s cache %s has unexpected shapes; rebuilding it", what, path)
            path.unlink(missing_ok=True)
            arrays = None
        if arrays is not None:
            logger.info("%s cache hit: %s", what, path)
            return arrays
    arrays = dict(compute())
    if path is not None:
        atomic_save_npz(path, **arrays)
    return arrays


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short content hash of a JSON-serialisable object (cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_fingerprint(paths: list[Path]) -> str:
    """Hash of the bytes of small metadata files (json/h5): changes whenever their content changes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
