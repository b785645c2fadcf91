"""Atomic file writes: a crash or kill mid-write never leaves a half-written file under the final name.

Two kinds of array cache: `cached_npz`, one `.npz` read fully into memory (small caches), and
`cached_arrays`, a directory of `.npy` files opened memory-mapped (caches too large for RAM: decoded
images, keypoints of 100k+ images), filled in place and renamed into place whole.

Shared cache folders (a cluster's or a lab server's, where other users can create entries): no write ever
goes through a name someone else could have planted. Temporaries get random names and are created
exclusively (`atomic_path`/`atomic_file`: mkstemp, O_CREAT|O_EXCL|O_NOFOLLOW; `make_temp_dir`: mkdtemp,
0700 until published), so an existing name or symbolic link is never opened, and a temporary's name is
not known before it exists. A cache's final name that is a symbolic link (or not of the cache's type) is
removed, never followed, and the cache rebuilt (`check_cache_entry`; an entry that cannot be removed is
one UserError naming it); renames never follow their destination; `safe_remove` deletes without ever
following a link. Residual: in a folder without the sticky bit another user can also rename or delete
entries they do not own; use sticky (chmod +t) shared folders.
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
import stat
import sys
import tempfile
import time
import weakref
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from siamese_retrieval.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    ArraySpecs = Mapping[str, tuple[tuple[int, ...], "np.dtype | type"]]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- never follow a planted link


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def safe_remove(path: str | os.PathLike, ignore_errors: bool = False) -> None:
    """Delete `path` without ever following a symbolic link: a link (or file, socket, ...) is unlinked, the link
    itself and never its target; a real directory is deleted by shutil.rmtree, which unlinks the links inside
    without descending into them (and refuses a directory that turned into a link meanwhile). Nothing there:
    nothing to do. Other failures raise OSError unless `ignore_errors`."""
    path = os.fspath(path)

    def gone_is_fine(exc: BaseException) -> None:  # removed concurrently: the goal is reached
        if not isinstance(exc, FileNotFoundError):
            raise exc

    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=lambda func, name, exc: gone_is_fine(exc))
            else:
                shutil.rmtree(path, onerror=lambda func, name, exc_info: gone_is_fine(exc_info[1]))
        else:
            os.unlink(path)
    except FileNotFoundError:
        return
    except OSError:
        if not ignore_errors:
            raise


def _link_is_trusted(link: Path, st: os.stat_result) -> bool:
    """The rule of Linux' fs.protected_symlinks: a link may be followed when it is ours, root's, or made by the
    owner of the folder that holds it (who could have put anything there anyway)."""
    if st.st_uid in (os.getuid(), 0):
        return True
    try:
        return os.stat(link.parent).st_uid == st.st_uid
    except OSError:
        return False


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents) when missing. The folder a caller names (a configured cache or output
    folder) may be a symbolic link, but only one of the caller's own (or root's, or the owner's of the folder
    holding it): a link there made by another user is refused with one line, never written through."""
    folder = Path(folder)
    try:
        st = os.lstat(folder)
    except OSError:  # missing, or e.g. a parent that is not a folder: mkdir below says so
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode) and not _link_is_trusted(folder, st):
        raise UserError(f"{folder} is a symbolic link made by another user (uid {st.st_uid}, to "
                        f"{os.readlink(folder)}): refusing to write through it; remove it or use another folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _entry_problem(path: Path, kind: str) -> str | None:
    """Why the cache entry `path` cannot be used as it is (None: missing, or a real `kind` "file"/"dir")."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"is a symbolic link (to {target})"
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        return "is unreadable (not a directory)"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return "is unreadable (not a regular file)"
    return None


def _remove_entry(path: Path, what: str, problem: str) -> None:
    """Remove the cache entry `path` (never following it); one UserError naming it when that is impossible."""
    try:
        safe_remove(path)
    except OSError as exc:
        raise UserError(f"{what} cache {path} {problem} and cannot be removed ({exc.strerror or exc}); "
                        f"delete it or use another cache folder") from None


def check_cache_entry(path: str | os.PathLike, what: str, kind: str, logger: logging.Logger = log) -> None:
    """Make a cache's final name safe to read and to rename onto (`kind`: "file" or "dir"). A symbolic link
    there (anyone's, in a shared cache folder) is never followed: the link itself is removed, its target left
    untouched, and the cache rebuilt; so is an entry of the other type (a folder where the cache is a file, ...).
    Only the final name: the cache folder itself is `ensure_folder`'s. An entry that cannot be removed (another
    user's, in a sticky folder) is a UserError naming it."""
    path = Path(path)
    problem = _entry_problem(path, kind)
    if problem is not None:
        logger.warning("%s cache %s %s; removing it (never following it) and rebuilding it", what, path, problem)
        _remove_entry(path, what, problem)


def _open_nofollow(path: str | os.PathLike, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


@contextlib.contextmanager
def _temp_file_beside(path: Path, suffix: str) -> Iterator[tuple[int, Path]]:
    """(descriptor, name) of a new file beside `path`, renamed onto `path` when the block succeeds."""
    ensure_folder(path.parent)
    # mkstemp: a random name, opened O_CREAT|O_EXCL|O_NOFOLLOW, so never an existing file or a planted link
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets normal permissions
        created = os.fstat(fd)
        yield fd, tmp_path
        now = os.lstat(tmp_path)
        if (now.st_dev, now.st_ino) != (created.st_dev, created.st_ino):
            raise OSError(errno.EEXIST, "the temporary file was replaced by someone else", str(tmp_path))
        try:
            os.replace(tmp_path, path)  # a link under `path` is replaced, not followed
        except PermissionError as exc:  # another user's link in a sticky folder: refused, never written through
            problem = _entry_problem(path, "file")
            if problem is None:
                raise
            raise UserError(f"{path} {problem} and cannot be replaced ({exc.strerror or exc}); delete it or use "
                            f"another folder") from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)  # gone after the rename; else ours (or, never followed, whatever took its name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary is created exclusively under a random name before it is yielded (so it is never a planted
    link); the rename replaces a link under `path` without following it. Prefer `atomic_file` where the writer
    takes a file object: then the bytes go to the created file whatever happens to names meanwhile."""
    with _temp_file_beside(Path(path), suffix) as (_, tmp):
        yield tmp


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[BinaryIO]:
    """`atomic_path`, yielding the temporary opened for binary writing (the descriptor mkstemp created)."""
    with _temp_file_beside(Path(path), suffix) as (fd, _):
        with os.fdopen(os.dup(fd), "wb") as f:
            yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A new, empty, private (0700) directory beside the cache directory `path`, to be filled and then
    `publish_dir`-ed: `.<name>.tmp-<random>-<pid>`, made by mkdtemp, so it is never an existing name or a planted
    link and its name cannot be known before it exists (the pid only tells `remove_stale_temporaries` whether
    its writer is alive). The stale temporaries of dead writers are removed first."""
    path = Path(path)
    ensure_folder(path.parent)
    remove_stale_temporaries(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", suffix=f"-{os.getpid()}", dir=path.parent))


def normal_dir_mode(tmp: str | os.PathLike) -> None:
    """Give a filled `make_temp_dir`/mkdtemp directory (0700) the normal permissions (0777 minus the umask), through
    a descriptor opened without following a link (never chmod-ing whatever took its name)."""
    fd = _open_nofollow(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fchmod(fd, 0o777 & ~_umask())
    finally:
        os.close(fd)


def publish_dir(tmp: Path, path: Path, what: str, keep_existing: Callable[[Path], bool],
                logger: logging.Logger = log) -> bool:
    """Rename the filled temporary directory `tmp` (from `make_temp_dir`) onto the cache directory `path`, giving
    it normal permissions first. A link or file under `path` is removed (never followed); a real directory there
    is kept when `keep_existing(path)` (a concurrent writer's complete cache: ours is dropped, False returned),
    else removed (an incomplete leftover). True when ours was renamed into place."""
    normal_dir_mode(tmp)
    for _ in range(3):
        check_cache_entry(path, what, "dir", logger)
        if os.path.lexists(path):
            if keep_existing(path):
                return False
            if os.path.lexists(path):
                _remove_entry(path, what, "is incomplete or unreadable")
        try:
            os.replace(tmp, path)  # rename(2): never follows a link under `path` (a directory cannot replace one)
            return True
        except OSError as exc:  # something appeared under `path` meanwhile: look again
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
    raise OSError(errno.EEXIST, f"{what} cache keeps reappearing while being replaced", str(path))


def no_link(path: Path) -> Path:
    """`path`, or ValueError when it is a symbolic link (a cache's member files are read, never followed: in a
    shared cache folder a planted link must not redirect the read)."""
    if os.path.islink(path):
        raise ValueError(f"{path.name} is a symbolic link")
    return path


def cached_npz(
    path: Path | None,
    keys: Sequence[str],
    what: str,
    compute: Callable[[], Mapping[str, Any]],
    problem: Callable[[dict[str, Any]], str | None],
    logger: logging.Logger = log,
) -> dict[str, Any]:
    """The arrays `keys` of the .npz cache at `path` when it is readable and `problem(arrays)` finds no fault;
    otherwise `compute()`'s arrays, written to `path` atomically. A bad cache is deleted with a warning,
    and so is a symbolic link (or folder) under `path`: never followed, rebuilt (`check_cache_entry`).
    `problem(arrays)` says why the arrays cannot be used (None: they can), in the one warning.
    What a cache holds is data: check every array the caller uses (dtype, shape, values), not only one of
    them. No cache when `path` is None. `what` names the cache in the messages ("image" -> "image
    cache hit"), which go to `logger` (the caller's). Written under a temporary name and renamed (`atomic_file`):
    a killed writer leaves no half file."""
    import numpy as np

    if path is not None:
        path = Path(path)
        check_cache_entry(path, what, "file", logger)
        if path.is_file():
            try:  # O_NOFOLLOW: a link planted under `path` since the check is unreadable, so removed and rebuilt
                with os.fdopen(_open_nofollow(path, os.O_RDONLY), "rb") as f, np.load(f, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in keys}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                why = f"is unreadable ({exc})"
            else:
                why = problem(arrays)
                if why is None:
                    logger.info("%s cache hit: %s", what, path)
                    return arrays
            logger.warning("%s cache %s %s; rebuilding it", what, path, why)
            safe_remove(path, ignore_errors=True)
    arrays = dict(compute())
    if path is not None:
        check_cache_entry(path, what, "file", logger)  # what appeared there while computing
        with atomic_file(path, suffix=".npz") as f:  # a file object: np.savez would otherwise append .npz to the name
            np.savez(f, **arrays)
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
    miss `fill(arrays)` writes into fresh `.npy` memmaps in a private temporary sibling directory
    (`make_temp_dir`), which is then renamed onto `path` whole (`publish_dir`), so a producer never holds
    the arrays in RAM and a killed writer leaves nothing under the final name. A directory that cannot be
    read or has other shapes is rebuilt with a warning; so is a symbolic link under `path` or among its
    files (removed, never followed). A rebuild deletes the old files and writes new ones, never rewriting a
    file in place (a file truncated under a live mapping would fault its readers with SIGBUS). `path` None:
    no cache, in-memory arrays filled by `fill`. `what` names the cache in the messages ("image" -> "image
    cache hit"), which go to `logger` (the caller's)."""
    import numpy as np

    if path is None:
        arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in specs.items()}
        fill(arrays)
        return arrays
    path = Path(path)
    arrays = open_array_cache(path, specs, what, logger, remove_invalid=True)  # removes a link there, unfollowed
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
    (then, with `remove_invalid`, it is deleted with a warning so that it is rebuilt). A symbolic link under
    `path` or in place of one of its files is invalid: never followed."""
    problem = _entry_problem(path, "dir")
    if problem is None:
        if not os.path.lexists(path):
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
        _remove_entry(path, what, problem)
    return None


def _open_arrays(path: Path, specs: ArraySpecs) -> dict[str, np.ndarray] | None:
    """Every array opened with mmap_mode "c"; None when one has another shape, dtype or memory order."""
    import numpy as np

    arrays = {}
    for name, (shape, dtype) in specs.items():
        arr = np.load(no_link(path / f"{name}.npy"), mmap_mode="c", allow_pickle=False)
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype) or not arr.flags.c_contiguous:
            return None
        arrays[name] = arr
    for arr in arrays.values():
        _MAPPED[id(arr)] = arr
    return arrays


def _write_array_cache(
    path: Path, specs: ArraySpecs, what: str, fill: Callable[[dict[str, np.ndarray]], None], logger: logging.Logger
) -> None:
    """`fill` into `.npy` memmaps in a private temporary sibling directory, flushed, then renamed onto `path`.
    A concurrent writer that got there first with a valid cache wins; ours is dropped."""
    import numpy as np

    tmp = make_temp_dir(path)
    try:
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", shape=tuple(shape), dtype=dtype)
                  for name, (shape, dtype) in specs.items()}
        for name in arrays:
            _allocate(tmp / f"{name}.npy")
            _MAPPED[id(arrays[name])] = arrays[name]
        fill(arrays)
        for arr in arrays.values():
            arr.flush()
        del arrays
        publish_dir(tmp, path, what,
                    lambda p: open_array_cache(p, specs, what, logger, remove_invalid=True) is not None, logger)
    finally:
        safe_remove(tmp, ignore_errors=True)


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


def remove_stale_temporaries(path: Path) -> None:
    """The temporary siblings `.<name>.tmp-...-<pid>` of `path` whose writer died are deleted (the caches here,
    the synthetic cities of data/synth/generate.py): a killed writer's half-written output never piles up.
    Links among them are unlinked, never followed; what cannot be removed (another user's) is left."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            safe_remove(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


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


def stable_hash(obj: Any) -> str:
    """Short (16 hex digits) content hash of a JSON-serialisable object (cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(paths: list[Path]) -> str:
    """Hash of the bytes of small metadata files (json/h5): changes whenever their content changes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
