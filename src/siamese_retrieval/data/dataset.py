"""The on-disk dataset contract (MSLS per-city files as labelled by GCL): read, validate, write.

    <root>/database/database.json   {"im_paths": [...], "loc": [[east, north, heading], ...]}  ("im_prefix" optional)
    <root>/query/query.json         same keys
    <root>/<name>_gt.h5 or gt.h5    dense: "sim" (n_query, n_database) binary, "fov" (n_query, n_database) in [0, 1]
                                    or sparse (CSR, for large sets): "indptr" (n_query + 1,), "indices" (nnz,)
                                    database ids sorted within each query, "sim_values" (nnz,) 0/1,
                                    "fov_values" (nnz,) in [0, 1]; attribute "n_database". A pair not listed
                                    has sim 0 and fov 0 (data/ground_truth.py, SparseRelevance)

Everything is checked before training starts; every failure is one `DatasetError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import cv2
import h5py
import numpy as np

from siamese_retrieval.data.ground_truth import DenseRelevance, GroundTruth, SparseRelevance
from siamese_retrieval.errors import DatasetError, json_kind, json_snippet, one_line
from siamese_retrieval.image_header import PNG_SIGNATURE, jpeg_segments, pixel_problem
from siamese_retrieval.io_utils import atomic_path, atomic_write_json, file_fingerprint
from siamese_retrieval.registry import LAYOUTS


@dataclass(frozen=True)
class DatasetFiles:
    """Where the three contract files live inside a root (the study used the *_lite names)."""

    database_json: str = "database/database.json"
    query_json: str = "query/query.json"
    gt_h5: str | None = None  # None: "gt.h5", else the single "*_gt.h5" in the root


@dataclass
class RetrievalDataset:
    """A validated query/database split with binary (`sim`) and graded (`fov`) relevance.

    `relevance` is what every consumer reads (metrics, pair sampling, splits, grids): the dense arrays behind
    the `GroundTruth` interface, or a `SparseRelevance` when the set is too large for dense arrays, in which
    case `sim` and `fov` are None.
    """

    root: Path
    db_paths: list[str]  # relative to root, im_prefix applied
    db_loc: np.ndarray  # (n_db, 3) float64: east, north, heading
    q_paths: list[str]
    q_loc: np.ndarray  # (n_q, 3)
    sim: np.ndarray | None  # (n_q, n_db) bool; None when the ground truth is sparse
    fov: np.ndarray | None  # (n_q, n_db) float32 in [0, 1]; None when the ground truth is sparse
    fingerprint: str = ""  # contract files' bytes + every image's size and mtime: caches keyed on it are rebuilt
    # whenever any of those change
    name: str = field(default="")
    relevance: GroundTruth = field(default=None, repr=False)  # type: ignore[assignment]  # from sim/fov if None
    # the positives training draws from, where they differ from the evaluation's (layouts: a 10 m radius against
    # the 25 m of evaluation); None: `relevance`
    train_relevance: GroundTruth | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.relevance is None:
            if self.sim is None or self.fov is None:
                raise ValueError("a dataset needs dense sim and fov arrays or a sparse relevance")
            self.relevance = DenseRelevance(self.sim, self.fov)
        if (self.relevance.n_query, self.relevance.n_db) != (len(self.q_paths), len(self.db_paths)):
            raise ValueError(f"relevance is {self.relevance.n_query} x {self.relevance.n_db}, the dataset has "
                             f"{len(self.q_paths)} queries x {len(self.db_paths)} database images")

    @property
    def is_sparse(self) -> bool:
        return self.sim is None

    @property
    def n_db(self) -> int:
        return len(self.db_paths)

    @property
    def n_query(self) -> int:
        return len(self.q_paths)

    def db_file(self, i: int) -> Path:
        return self.root / self.db_paths[i]

    def query_file(self, i: int) -> Path:
        return self.root / self.q_paths[i]

    def all_files(self) -> list[Path]:
        return [self.root / p for p in self.db_paths] + [self.root / p for p in self.q_paths]


# ----------------------------------------------------------------------------------------- reading


def existing_root(root: str | Path) -> Path:
    """A dataset root (a leading ~ expanded) as an absolute real path; one DatasetError line when it is no folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    return root.resolve()


def _resolve_gt(root: Path, gt_h5: str | None) -> Path:
    if gt_h5:
        path = root / gt_h5
        if not path.is_file():
            raise DatasetError(f"{path}: ground-truth file not found")
        return path
    if (root / "gt.h5").is_file():
        return root / "gt.h5"
    found = sorted(root.glob("*_gt.h5"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"{root}: no ground-truth file (expected gt.h5 or <name>_gt.h5)")
    names = ", ".join(p.name for p in found)
    raise DatasetError(f"{root}: several ground-truth files ({names}); set data.files.gt_h5")


def relpath_problem(im_path: object) -> str | None:
    """Why `im_path` cannot be an image path of the contract (None: it can): the reader's rules, which
    convert.py also applies to the names it is about to write."""
    if not isinstance(im_path, str) or not im_path:
        return f"is not a non-empty string: {json_snippet(im_path)}"
    bad = next((c for c in im_path if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"contains the control character U+{ord(bad):04X} ({json_snippet(im_path)})"
    try:
        im_path.encode("utf-8")
    except UnicodeEncodeError:
        return f"is not valid UTF-8 (a name in another encoding: {json_snippet(im_path)})"
    pure = PurePosixPath(im_path.replace("\\", "/"))
    if pure.is_absolute() or Path(im_path).is_absolute():
        return f"is absolute ({im_path!r})"
    if ".." in pure.parts:
        return f"escapes the dataset root ({im_path!r})"
    return None


def contract_relpath(im_path: str) -> str:
    """The path the reader uses for a valid `im_path` (backslashes as '/', redundant '/' and '.' removed)."""
    return str(PurePosixPath(im_path.replace("\\", "/")))


def _safe_relpath(root: Path, im_path: object, source: Path, index: int) -> str:
    """Refuse absolute paths and paths that climb out of the root; never touch them."""
    problem = relpath_problem(im_path)
    if problem is not None:
        if problem.startswith("is absolute"):
            problem += f"; paths must be relative to {root}"
        raise DatasetError(f"{source}: im_paths[{index}] {problem}")
    return contract_relpath(im_path)  # type: ignore[arg-type]


def _check_unique(rel_paths: Sequence[str], source: Path) -> None:
    """The same image listed twice in one split would count twice in every metric."""
    seen: dict[str, int] = {}
    for i, rel in enumerate(rel_paths):
        first = seen.setdefault(rel, i)
        if first != i:
            raise DatasetError(f"{source}: im_paths[{first}] and im_paths[{i}] are the same image {rel!r} "
                               "(every entry of a split must be unique)")


def check_real_paths(root: Path, rel_paths: Sequence[str], source: Path, follow_outside: bool) -> None:
    """Refuse entries whose real path (symlinks followed, in folders or the file itself) leaves `root`.

    Stats only, never opens a file: one realpath per folder, one lstat per image.
    """
    if follow_outside:
        return
    root_real = os.path.realpath(root)
    inside = root_real.rstrip(os.sep) + os.sep
    folders: dict[str, str] = {}
    for i, rel in enumerate(rel_paths):
        folder, name = os.path.split(rel)
        folder_real = folders.get(folder)
        if folder_real is None:
            folder_real = folders[folder] = os.path.realpath(os.path.join(root_real, folder))
        real = os.path.join(folder_real, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if real != root_real and not real.startswith(inside):
            raise DatasetError(
                f"{source}: im_paths[{i}] ({rel!r}) resolves to {real}, outside the dataset root {root_real} "
                "(a symbolic link; set data.follow_symlinks_outside_root=true to allow links out of the root)")


def read_utf8(path: Path, what: str = "", encoding: str = "utf-8") -> str:
    """The text of a metadata file; missing, unreadable or not UTF-8 is one DatasetError naming the file.
    `what` (e.g. "not valid JSON") prefixes the encoding problem."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({one_line(exc.strerror or exc)})") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        where = f"byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        raise DatasetError(f"{path}: {what} (not UTF-8 text: {where})" if what
                           else f"{path}: not UTF-8 text ({where})") from None


def _load_json_object(path: Path) -> dict:
    """The JSON object in `path`; every way it can fail is one DatasetError naming the file."""
    text = read_utf8(path, what="not valid JSON")
    try:
        meta = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise DatasetError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object with keys im_paths and loc, found {json_kind(meta)}")
    return meta


def _parse_loc(path: Path, loc: object, n_paths: int) -> np.ndarray:
    """loc: one [east, north] or [east, north, heading] row of finite numbers per image -> (n, 3) float64."""
    if not isinstance(loc, list):
        raise DatasetError(f"{path}: loc must be a list of [east, north(, heading)] rows, found {json_kind(loc)}")
    if len(loc) != n_paths:
        raise DatasetError(f"{path}: im_paths has {n_paths} entries but loc has {len(loc)}")
    rows = []
    for i, row in enumerate(loc):
        if not isinstance(row, list) or len(row) not in (2, 3):
            what = f"{len(row)} value{'s' * (len(row) != 1)}" if isinstance(row, list) else json_kind(row)
            raise DatasetError(f"{path}: loc[{i}] must be a row of 2 or 3 numbers [east, north(, heading)], "
                               f"found {what}: {json_snippet(row)}")
        values = []
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DatasetError(f"{path}: loc[{i}][{j}] is not a number: {json_snippet(value)}")
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                number = math.inf
            if not math.isfinite(number):
                raise DatasetError(f"{path}: loc[{i}][{j}] is not a finite number: {json_snippet(value)}")
            values.append(number)
        rows.append(values if len(values) == 3 else values + [0.0])  # no heading: 0
    return np.array(rows, dtype=np.float64).reshape(len(rows), 3)


def _read_split_json(root: Path, rel: str) -> tuple[list[str], np.ndarray]:
    path = root / rel
    meta = _load_json_object(path)
    missing = [k for k in ("im_paths", "loc") if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}")
    im_paths, loc = meta["im_paths"], meta["loc"]
    if not isinstance(im_paths, list):
        raise DatasetError(f"{path}: im_paths must be a list of strings, found {json_kind(im_paths)}")
    prefix = meta.get("im_prefix")
    if prefix is None:
        prefix = ""
    if not isinstance(prefix, str):
        raise DatasetError(f"{path}: im_prefix must be a string, found {json_kind(prefix)}: {json_snippet(prefix)}")
    rel_paths = [_safe_relpath(root, prefix + p if isinstance(p, str) else p, path, i) for i, p in enumerate(im_paths)]
    _check_unique(rel_paths, path)
    return rel_paths, _parse_loc(path, loc, len(im_paths))


_SIM_FOV = {"sim": "binary 0/1 relevance", "fov": "field-of-view overlap in [0, 1]"}


def _h5_array(f: h5py.File, path: Path, key: str, shape: tuple[int, int]) -> np.ndarray:
    """f[key] as an array, after checking that it is a plain numeric 2-D dataset of `shape` in this file."""
    link = f.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise DatasetError(f"{path}: {key} is an external link to {link.filename}:{link.path}; "
                           "the ground truth must be stored in the file itself")
    obj = f.get(key)
    if obj is None:
        target = f" ({link.path})" if isinstance(link, h5py.SoftLink) else ""
        raise DatasetError(f"{path}: {key} is a link to nothing{target}")
    if isinstance(obj, h5py.Group):
        raise DatasetError(f"{path}: {key} is an HDF5 group, expected a dataset (the {_SIM_FOV[key]} array)")
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(f"{path}: {key} is a {type(obj).__name__}, expected a dataset")
    if obj.is_virtual:
        raise DatasetError(f"{path}: {key} is a virtual dataset (it maps data from other files); store it in the file")
    if obj.shape is None:
        raise DatasetError(f"{path}: {key} is an empty (null) dataset, expected {shape[0]} x {shape[1]} values")
    if obj.ndim != 2:
        raise DatasetError(f"{path}: {key} must be 2-D (n_query, n_database), found {obj.ndim}-D shape {obj.shape}")
    if obj.shape != shape:
        raise DatasetError(f"{path}: {key} has shape {obj.shape}, expected (n_query, n_database) = {shape}")
    if obj.dtype.kind not in "biuf":
        kind = "string" if h5py.check_string_dtype(obj.dtype) is not None else str(obj.dtype)
        raise DatasetError(f"{path}: {key} must be numeric ({_SIM_FOV[key]}), found dtype {kind}")
    return obj[()]


SPARSE_KEYS = ("indptr", "indices", "sim_values", "fov_values")
_SPARSE_WHAT = {"indptr": "row offsets", "indices": "database ids", "sim_values": "binary 0/1 relevance",
                "fov_values": "field-of-view overlap in [0, 1]"}


def _h5_vector(f: h5py.File, path: Path, key: str, length: int | None) -> np.ndarray:
    """f[key] as a 1-D numeric array stored in this file (of `length` when given)."""
    obj = f.get(key)
    link = f.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink) or not isinstance(obj, h5py.Dataset) or obj.is_virtual:
        raise DatasetError(f"{path}: {key} must be a dataset stored in the file itself ({_SPARSE_WHAT[key]})")
    if obj.shape is None or obj.ndim != 1:
        raise DatasetError(f"{path}: {key} must be 1-D ({_SPARSE_WHAT[key]}), found shape {obj.shape}")
    if length is not None and obj.shape[0] != length:
        raise DatasetError(f"{path}: {key} has {obj.shape[0]} entries, expected {length}")
    if obj.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: {key} must be numeric ({_SPARSE_WHAT[key]}), found dtype {obj.dtype}")
    return obj[()]


def _read_sparse_gt(f: h5py.File, path: Path, n_query: int, n_db: int) -> SparseRelevance:
    missing = [k for k in SPARSE_KEYS if f.get(k, getlink=True) is None]
    if missing:
        raise DatasetError(f"{path}: sparse ground truth is missing dataset(s) {', '.join(missing)}")
    stored_n_db = f.attrs.get("n_database")
    if stored_n_db is not None and int(stored_n_db) != n_db:
        raise DatasetError(f"{path}: n_database attribute is {int(stored_n_db)}, the database has {n_db} images")
    indptr = _h5_vector(f, path, "indptr", n_query + 1)
    nnz = int(indptr[-1]) if len(indptr) else 0
    indices = _h5_vector(f, path, "indices", None)
    sim = _h5_vector(f, path, "sim_values", len(indices))
    fov = _h5_vector(f, path, "fov_values", len(indices)).astype(np.float32)
    if indptr.dtype.kind == "f" or indices.dtype.kind == "f":
        raise DatasetError(f"{path}: indptr and indices must be integers")
    if len(indices) != nnz or indptr[0] != 0 or (np.diff(indptr) < 0).any():
        raise DatasetError(f"{path}: indptr must rise from 0 to the number of stored pairs ({len(indices)})")
    if len(sim) and not np.isin(np.unique(sim), [0, 1]).all():
        raise DatasetError(f"{path}: sim_values must be binary (0/1), found values {np.unique(sim)[:5].tolist()}")
    try:
        return SparseRelevance(n_query, n_db, indptr.astype(np.int64), indices.astype(np.int64), sim.astype(bool), fov)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def _read_gt(path: Path, n_query: int, n_db: int) -> tuple[np.ndarray, np.ndarray] | SparseRelevance:
    """Dense (sim, fov) arrays, or a SparseRelevance for a file in the sparse layout."""
    try:
        with h5py.File(path, "r") as f:
            if f.get("sim", getlink=True) is None and f.get("indptr", getlink=True) is not None:
                return _read_sparse_gt(f, path, n_query, n_db)
            missing = [k for k in ("sim", "fov") if f.get(k, getlink=True) is None]
            if missing:
                raise DatasetError(f"{path}: missing dataset(s) {', '.join(missing)} (or the sparse layout's "
                                   f"{', '.join(SPARSE_KEYS)})")
            sim = _h5_array(f, path, "sim", (n_query, n_db))
            fov = _h5_array(f, path, "fov", (n_query, n_db))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({one_line(exc)})") from None
    fov = fov.astype(np.float32)
    if np.isnan(fov).any():
        raise DatasetError(f"{path}: fov contains NaN")
    if fov.size and (fov.min() < 0 or fov.max() > 1):
        raise DatasetError(f"{path}: fov must lie in [0, 1], found values in [{fov.min():.3g}, {fov.max():.3g}]")
    if sim.size and not np.isin(np.unique(sim), [0, 1]).all():
        raise DatasetError(f"{path}: sim must be binary (0/1), found values {np.unique(sim)[:5].tolist()}")
    return sim.astype(bool), fov


# ----------------------------------------------------------------------------------------- images

_TRUNCATED_JPEG = "truncated JPEG (the data ends before the end-of-image marker)"


def _jpeg_problem(data: bytes) -> str | None:
    """Walk a JPEG's segments and entropy-coded scans up to its end-of-image marker (EOI).

    Bytes after the EOI (camera trailers, a second picture) are fine; a file that ends before it was
    cut short. Decoders differ here (OpenCV 4 fills the missing part with grey and prints a warning), so
    truncation is decided from the structure, whatever the decoder does.
    """
    for marker, j, i, length in jpeg_segments(data):
        if marker == 0xD9:  # EOI
            return None
        if length < 2:
            return f"corrupt JPEG (segment 0xFF{marker:02X} at byte {j} has length {length})"
        if i + length > len(data):
            return _TRUNCATED_JPEG
    return _TRUNCATED_JPEG  # the data ends before a marker or a length field


def _png_problem(data: bytes) -> str | None:
    """Walk a PNG's chunks up to IEND: a file that ends before it was cut short (trailing bytes are fine)."""
    n, i = len(data), len(PNG_SIGNATURE)
    while i + 8 <= n:
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        i += 12 + length  # length, type, data, CRC
        if i > n:
            break
        if kind == b"IEND":
            return None
    return "truncated PNG (the data ends before the IEND chunk)"


@contextmanager
def _quiet_opencv():
    """OpenCV logs its decoders' complaints on stderr; the DatasetError says it in one line instead."""
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is None:
        yield
        return
    level = logging_api.getLogLevel()
    logging_api.setLogLevel(logging_api.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging_api.setLogLevel(level)


def check_image(path: Path, max_pixels: int | None = None) -> str | None:
    """Why `path` is not a usable image, or None. Decodes it: a truncated file fails here, not mid-epoch.

    What the bytes are decides, never the file name: a PNG named .jpg is a good image. JPEG and PNG
    files are also walked to their end marker first (a cut-short file is refused before any decoder
    sees it, and trailing bytes after the marker are accepted). An image whose header claims more than
    `max_pixels` pixels (None: data.max_image_pixels, image_header.py) is refused before it is decoded.
    """
    if not path.is_file():
        return "image not found"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read image ({one_line(exc.strerror or exc)})"
    if not data:
        return "image file is empty (0 bytes)"
    if data.startswith(b"\xff\xd8"):
        problem = _jpeg_problem(data)
    elif data.startswith(PNG_SIGNATURE):
        problem = _png_problem(data)
    else:
        problem = None
    if problem:
        return problem
    problem = pixel_problem(data, max_pixels)  # from the header: a small file can claim a huge image
    if problem:
        return problem
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        return "not a decodable image"
    return None


def images_stamp(paths: Sequence[Path]) -> str:
    """Hash of (path, size, mtime) of every image: changes when an image is replaced, added or removed.

    Stat only (no reading): microseconds per file. A missing file counts as (-1, -1).
    """
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "-1:-1"
        h.update(f"{p}\0{stamp}\n".encode())
    return h.hexdigest()[:16]


def check_image_files(paths: Sequence[Path], check: str, max_pixels: int | None = None) -> None:
    """`check` the images: decode (every file decodes, none above `max_pixels` by its header; None:
    data.max_image_pixels), exists (every file is there) or none. One DatasetError lists the first bad images
    (decode: missing, empty, corrupt, too large by their header)."""
    if check == "decode":
        with _quiet_opencv(), ThreadPoolExecutor(max_workers=4) as pool:
            problems = [(p, why) for p, why in zip(paths, pool.map(lambda p: check_image(p, max_pixels), paths)) if why]
        if problems:
            shown = "; ".join(f"{p}: {why}" for p, why in problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DatasetError(f"{len(problems)} unusable image(s): {shown}{more}")
    elif check == "exists":
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) not found, first: {missing[0]}")
    elif check != "none":
        raise DatasetError(f"unknown image check {check!r} (use decode, exists or none)")


@LAYOUTS.register("contract")  # the project's own format (docs/datasets.md); data.files names its files
def read_dataset(
    root: str | Path,
    files: DatasetFiles | None = None,
    check: str = "decode",
    name: str = "",
    *,
    follow_symlinks_outside_root: bool = False,
) -> RetrievalDataset:
    """Read and validate a dataset root. `check`: "decode" (open every image), "exists", or "none".

    Image paths are checked whatever `check` says: relative, inside the root, unique within their split,
    and, unless `follow_symlinks_outside_root`, not leading out of the root through a symbolic link.
    """
    files = files or DatasetFiles()
    root = existing_root(root)
    db_paths, db_loc = _read_split_json(root, files.database_json)
    q_paths, q_loc = _read_split_json(root, files.query_json)
    check_real_paths(root, db_paths, root / files.database_json, follow_symlinks_outside_root)
    check_real_paths(root, q_paths, root / files.query_json, follow_symlinks_outside_root)
    if not db_paths:
        raise DatasetError(f"{root / files.database_json}: the database is empty")
    if not q_paths:
        raise DatasetError(f"{root / files.query_json}: there are no queries")
    gt_path = _resolve_gt(root, files.gt_h5)
    truth = _read_gt(gt_path, len(q_paths), len(db_paths))
    sim, fov, relevance = (None, None, truth) if isinstance(truth, SparseRelevance) else (*truth, None)
    all_paths = [root / p for p in db_paths + q_paths]
    check_image_files(all_paths, check)
    contract = file_fingerprint([root / files.database_json, root / files.query_json, gt_path])
    fingerprint = hashlib.sha256(f"{contract}:{images_stamp(all_paths)}".encode()).hexdigest()[:16]
    return RetrievalDataset(root, db_paths, db_loc, q_paths, q_loc, sim, fov, fingerprint, name or root.name,
                            relevance=relevance)


# ----------------------------------------------------------------------------------------- writing


DENSE_MAX_CELLS = 1 << 25  # n_query x n_database above this (160 MB of sim + fov) is stored and held sparse


def fits_dense(n_query: int, n_db: int) -> bool:
    """Whether dense sim/fov arrays of this size are small enough to hold (and write) as the contract's arrays."""
    return int(n_query) * int(n_db) <= DENSE_MAX_CELLS


def dataset_with_relevance(root: Path, db_paths: list[str], db_loc: np.ndarray, q_paths: list[str], q_loc: np.ndarray,
                           relevance: SparseRelevance, fingerprint: str, name: str) -> RetrievalDataset:
    """A dataset around `relevance`: with dense sim/fov when they fit (`fits_dense`), sparse only otherwise."""
    dense = fits_dense(relevance.n_query, relevance.n_db)
    sim, fov = relevance.to_dense() if dense else (None, None)
    return RetrievalDataset(root, db_paths, db_loc, q_paths, q_loc, sim, fov, fingerprint, name,
                            relevance=None if dense else relevance)


def write_split_json(path: Path, im_paths: Sequence[str], loc: np.ndarray) -> None:
    atomic_write_json(path, {"im_paths": list(im_paths), "loc": np.asarray(loc, dtype=float).round(4).tolist()})


def write_gt(path: Path, sim: np.ndarray | None, fov: np.ndarray | None, sparse: SparseRelevance | None = None) -> None:
    """Dense sim/fov, or with `sparse` the sparse layout (module docstring); written atomically."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            if sparse is not None:
                f.attrs["n_database"] = int(sparse.n_db)
                f.create_dataset("indptr", data=sparse.indptr.astype(np.int64))
                f.create_dataset("indices", data=sparse.indices.astype(np.int64), compression="gzip")
                f.create_dataset("sim_values", data=sparse.sim.astype(np.uint8), compression="gzip")
                f.create_dataset("fov_values", data=sparse.fov.astype(np.float32), compression="gzip")
                return
            f.create_dataset("sim", data=np.asarray(sim, dtype=np.uint8), compression="gzip")
            f.create_dataset("fov", data=np.asarray(fov, dtype=np.float32), compression="gzip")


def write_dataset(
    root: str | Path,
    db_paths: Sequence[str],
    db_loc: np.ndarray,
    q_paths: Sequence[str],
    q_loc: np.ndarray,
    sim: np.ndarray | None,
    fov: np.ndarray | None,
    files: DatasetFiles | None = None,
    sparse: SparseRelevance | None = None,
) -> Path:
    """Write the contract files (images must already be under root). The gt file is written last, dense from
    `sim`/`fov` or sparse from `sparse`."""
    files = files or DatasetFiles()
    root = Path(root)
    write_split_json(root / files.database_json, db_paths, db_loc)
    write_split_json(root / files.query_json, q_paths, q_loc)
    write_gt(root / (files.gt_h5 or "gt.h5"), sim, fov, sparse)
    return root
