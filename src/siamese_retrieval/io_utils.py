"""Atomic file writes: a crash or kill mid-write never leaves a half-written file under the final name.

Two kinds of array cache: `cached_npz`, one `.npz` read fully into memory (small caches), and
`cached_arrays`, a directory of `.npy` files opened memory-mapped (caches too large for RAM: decoded
images, keypoints of 100k+ images), filled in place and renamed into place whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import time
import weakref
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

    ArraySpecs = Mapping[str, tuple[tuple[int, ...], "np.dtype | type"]]

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


# ----------------------------------------------------------------------------------------- memory-mapped caches


def cached_arrays(
    path: Path | None,
    specs: ArraySpecs,
    what: str,
    fill: Callable[[dict[str, np.ndarray]], None],
    logger: logging.Logger = log,
) -> dict[str, np.ndarray]:
    """Arrays of exactly `specs` (name -> (shape, dtype)), memory-mapped from the cache directory `path`.

    The directory holds one `<name>.npy` per array. On a hit the files are opened copy-on-write
    (mmap_mode "c"): nothing is read until touched, pages come from (and stay in) the page cache, and
    the arrays are writable (torch.from_numpy neither copies nor warns) without ever writing back. On a
    miss `fill(arrays)` writes into fresh `.npy` memmaps in a temporary sibling directory, which is then
    renamed onto `path` whole, so a producer never holds the arrays in RAM and a killed writer leaves
    nothing under the final name. A directory that cannot be read or has other shapes is rebuilt with a
    warning; a rebuild deletes the old files and writes new ones, never rewriting a file in place (a file
    truncated under a live mapping would fault its readers with SIGBUS). `path` None: no cache, in-memory
    arrays filled by `fill`. `what` names the cache in the messages ("image" -> "image cache hit"), which
    go to `logger` (the caller's)."""
    import numpy as np

    if path is None:
        arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in specs.items()}
        fill(arrays)
        return arrays
    path = Path(path)
    arrays = open_array_cache(path, specs, what, logger, remove_invalid=True)
    if arrays is not None:
        logger.info("%s cache hit: %s", what, path)
        return arrays
    _write_array_cache(path, specs, what, fill, logger)
    arrays = open_array_cache(path, specs, what, logger, remove_invalid=False)
    if arrays is None:
        raise OSError(f"{what} cache {path} is unreadable right after it was written")
    return arrays


def open_array_cache(
    path: Path, specs: ArraySpecs, what: str, logger: logging.Logger = log, remove_invalid: bool = False
) -> dict[str, np.ndarray] | None:
    """The copy-on-write memmaps of a complete cache directory, or None when it is missing or invalid
    (then, with `remove_invalid`, it is deleted with a warning so that it is rebuilt)."""
    if not path.exists():
        return None
    try:
        arrays = _open_arrays(path, specs)
    except (OSError, ValueError, EOFError) as exc:
        problem = f"is unreadable ({exc})"
    else:
        if arrays is not None:
            return arrays
        problem = "has unexpected shapes"
    if remove_invalid:
        logger.warning("%s cache %s %s; rebuilding it", what, path, problem)
        _remove(path)
    return None


def _open_arrays(path: Path, specs: ArraySpecs) -> dict[str, np.ndarray] | None:
    """Every array opened with mmap_mode "c"; None when one has another shape, dtype or memory order."""
    import numpy as np

    arrays = {}
    for name, (shape, dtype) in specs.items():
        arr = np.load(path / f"{name}.npy", mmap_mode="c", allow_pickle=False)
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype) or not arr.flags.c_contiguous:
            return None
        arrays[name] = arr
    for arr in arrays.values():
        _MAPPED[id(arr)] = arr
    return arrays


def _write_array_cache(
    path: Path, specs: ArraySpecs, what: str, fill: Callable[[dict[str, np.ndarray]], None], logger: logging.Logger
) -> None:
    """`fill` into `.npy` memmaps in a temporary sibling directory, flushed, then renamed onto `path`.
    A concurrent writer that got there first with a valid cache wins; ours is dropped."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", suffix=f"-{os.getpid()}", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the cache gets normal permissions
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", shape=tuple(shape), dtype=dtype)
                  for name, (shape, dtype) in specs.items()}
        for name in arrays:
            _allocate(tmp / f"{name}.npy")
            _MAPPED[id(arrays[name])] = arrays[name]
        fill(arrays)
        for arr in arrays.values():
            arr.flush()
        del arrays
        _rename_into_place(tmp, path, specs, what, logger)
    finally:
        _remove(tmp)


def _allocate(file: Path) -> None:
    """Reserve the disk blocks of a new (sparse) memmap file now: a full disk is then an OSError naming the
    file here, not a SIGBUS killing the process when `fill` writes to a page that has no block."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(file, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # a file system without it: writes will allocate, as without this step
            raise OSError(exc.errno, exc.strerror, str(file)) from None


def _rename_into_place(tmp: Path, path: Path, specs: ArraySpecs, what: str, logger: logging.Logger) -> None:
    if open_array_cache(path, specs, what, logger, remove_invalid=True) is not None:
        return  # a concurrent writer finished first
    try:
        os.replace(tmp, path)
    except OSError:  # a directory appeared under `path` meanwhile (os.replace cannot overwrite a full one)
        if open_array_cache(path, specs, what, logger) is None:
            raise


def remove_stale_temporaries(path: Path) -> None:
    """The temporary siblings `.<name>.tmp-...-<pid>` of `path` whose writer died are deleted (the caches here,
    the synthetic cities of data/synth/generate.py): a killed writer's half-written output never piles up."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            _remove(stale)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- resident pages

_MAPPED: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()  # id -> open cache memmap
_RELEASE_EVERY_S = 1.0
_last_release = 0.0


def release_mapped_pages(force: bool = False) -> int:
    """Unmap the resident pages of every open cache memmap (madvise MADV_DONTNEED); returns how many arrays.

    Why: a page of a memory-mapped cache, once touched, counts in this process's RSS until unmapped, so one
    epoch over 100k images would show the whole cache (3.7 GB at 96x128) as resident. The pages stay in the
    kernel's page cache (the next touch is a minor fault, not a disk read), so calling this while iterating
    keeps RSS to the working set at almost no cost. Safe because the mappings are never written: the read
    mappings are copy-on-write and nothing writes to them (a write would be dropped here), and the write
    mappings of a cache being filled are shared, so their data is already in the page cache. At most once a
    second unless `force`."""
    global _last_release
    now = time.monotonic()
    if not force and now - _last_release < _RELEASE_EVERY_S:
        return 0
    _last_release = now
    released = 0
    for arr in list(_MAPPED.values()):
        mapping = getattr(arr, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            continue
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
            released += 1
        except (ValueError, OSError):  # closed, or a platform without it: the pages just stay mapped
            continue
    return released


# ----------------------------------------------------------------------------------------- keys


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
