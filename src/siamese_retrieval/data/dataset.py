"""The on-disk dataset contract (MSLS per-city files as labelled by GCL): read, validate, write.

    <root>/database/database.json   {"im_paths": [...], "loc": [[east, north, heading], ...]}  ("im_prefix" optional)
    <root>/query/query.json         same keys
    <root>/<name>_gt.h5 or gt.h5    "sim" (n_query, n_database) binary, "fov" (n_query, n_database) in [0, 1]

Everything is checked before training starts; every failure is one `DatasetError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import cv2
import h5py
import numpy as np

from siamese_retrieval.errors import DatasetError
from siamese_retrieval.io_utils import atomic_path, atomic_write_json, file_fingerprint


@dataclass(frozen=True)
class DatasetFiles:
    """Where the three contract files live inside a root (the study used the *_lite names)."""

    database_json: str = "database/database.json"
    query_json: str = "query/query.json"
    gt_h5: str | None = None  # None: "gt.h5", else the single "*_gt.h5" in the root


@dataclass
class RetrievalDataset:
    """A validated query/database split with binary (`sim`) and graded (`fov`) relevance."""

    root: Path
    db_paths: list[str]  # relative to root, im_prefix applied
    db_loc: np.ndarray  # (n_db, 3) float64: east, north, heading
    q_paths: list[str]
    q_loc: np.ndarray  # (n_q, 3)
    sim: np.ndarray  # (n_q, n_db) bool
    fov: np.ndarray  # (n_q, n_db) float32 in [0, 1]
    fingerprint: str = ""  # contract files' bytes + every image's size and mtime: caches keyed on it are rebuilt
    # whenever any of those change
    name: str = field(default="")

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


def _safe_relpath(root: Path, im_path: str, source: Path, index: int) -> str:
    """Refuse absolute paths and paths that climb out of the root; never touch them."""
    if not isinstance(im_path, str) or not im_path:
        raise DatasetError(f"{source}: im_paths[{index}] is not a non-empty string: {im_path!r}")
    pure = PurePosixPath(im_path.replace("\\", "/"))
    if pure.is_absolute() or Path(im_path).is_absolute():
        raise DatasetError(f"{source}: im_paths[{index}] is absolute ({im_path!r}); paths must be relative to {root}")
    if ".." in pure.parts:
        raise DatasetError(f"{source}: im_paths[{index}] escapes the dataset root ({im_path!r})")
    return str(pure)


def _read_split_json(root: Path, rel: str) -> tuple[list[str], np.ndarray]:
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object with keys im_paths and loc")
    missing = [k for k in ("im_paths", "loc") if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}")
    im_paths, loc = meta["im_paths"], meta["loc"]
    if not isinstance(im_paths, list):
        raise DatasetError(f"{path}: im_paths must be a list")
    if not isinstance(loc, list) or len(loc) != len(im_paths):
        n_loc = len(loc) if isinstance(loc, list) else type(loc).__name__
        raise DatasetError(f"{path}: im_paths has {len(im_paths)} entries but loc has {n_loc}")
    prefix = meta.get("im_prefix", "") or ""
    rel_paths = [_safe_relpath(root, prefix + p if isinstance(p, str) else p, path, i) for i, p in enumerate(im_paths)]
    try:
        loc_arr = np.asarray(loc, dtype=np.float64).reshape(len(loc), -1) if loc else np.zeros((0, 3))
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: loc must be a list of numeric [east, north, heading] rows") from None
    if len(loc) and (loc_arr.shape[1] < 2 or not np.isfinite(loc_arr).all()):
        raise DatasetError(f"{path}: loc rows must hold finite [east, north(, heading)] numbers")
    if loc_arr.shape[1] == 2:
        loc_arr = np.concatenate([loc_arr, np.zeros((len(loc_arr), 1))], axis=1)
    return rel_paths, loc_arr[:, :3]


def _read_gt(path: Path, n_query: int, n_db: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("sim", "fov") if k not in f]
            if missing:
                raise DatasetError(f"{path}: missing dataset(s) {', '.join(missing)}")
            sim, fov = f["sim"][()], f["fov"][()]
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from None
    for key, arr in (("sim", sim), ("fov", fov)):
        if arr.shape != (n_query, n_db):
            raise DatasetError(f"{path}: {key} has shape {arr.shape}, expected (n_query, n_database) = ({n_query}, {n_db})")
    fov = fov.astype(np.float32)
    if np.isnan(fov).any():
        raise DatasetError(f"{path}: fov contains NaN")
    if fov.size and (fov.min() < 0 or fov.max() > 1):
        raise DatasetError(f"{path}: fov must lie in [0, 1], found values in [{fov.min():.3g}, {fov.max():.3g}]")
    if sim.size and not np.isin(np.unique(sim), [0, 1]).all():
        raise DatasetError(f"{path}: sim must be binary (0/1), found values {np.unique(sim)[:5].tolist()}")
    return sim.astype(bool), fov


def check_image(path: Path) -> str | None:
    """Why `path` is not a usable image, or None. Decodes it: a truncated file fails here, not mid-epoch."""
    if not path.is_file():
        return "image not found"
    if path.stat().st_size == 0:
        return "image file is empty (0 bytes)"
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return "not a decodable image"
    if path.suffix.lower() in (".jpg", ".jpeg") and not data[-2:].tobytes() == b"\xff\xd9":
        return "truncated JPEG (no end-of-image marker)"
    return None


def check_images(paths: Sequence[Path], workers: int = 4) -> None:
    """Raise one DatasetError listing the first bad images (missing, empty, corrupt)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(check_image, paths)) if why]
    if problems:
        shown = "; ".join(f"{p}: {why}" for p, why in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError(f"{len(problems)} unusable image(s): {shown}{more}")


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


def read_dataset(
    root: str | Path,
    files: DatasetFiles | None = None,
    check: str = "decode",
    name: str = "",
) -> RetrievalDataset:
    """Read and validate a dataset root. `check`: "decode" (open every image), "exists", or "none"."""
    files = files or DatasetFiles()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    root = root.resolve()
    db_paths, db_loc = _read_split_json(root, files.database_json)
    q_paths, q_loc = _read_split_json(root, files.query_json)
    if not db_paths:
        raise DatasetError(f"{root / files.database_json}: the database is empty")
    if not q_paths:
        raise DatasetError(f"{root / files.query_json}: there are no queries")
    gt_path = _resolve_gt(root, files.gt_h5)
    sim, fov = _read_gt(gt_path, len(q_paths), len(db_paths))
    all_paths = [root / p for p in db_paths + q_paths]
    if check == "decode":
        check_images(all_paths)
    elif check == "exists":
        missing = [p for p in all_paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) not found, first: {missing[0]}")
    elif check != "none":
        raise DatasetError(f"unknown image check {check!r} (use decode, exists or none)")
    contract = file_fingerprint([root / files.database_json, root / files.query_json, gt_path])
    fingerprint = hashlib.sha256(f"{contract}:{images_stamp(all_paths)}".encode()).hexdigest()[:16]
    return RetrievalDataset(root, db_paths, db_loc, q_paths, q_loc, sim, fov, fingerprint, name or root.name)


# ----------------------------------------------------------------------------------------- writing


def write_split_json(path: Path, im_paths: Sequence[str], loc: np.ndarray) -> None:
    atomic_write_json(path, {"im_paths": list(im_paths), "loc": np.asarray(loc, dtype=float).round(4).tolist()})


def write_gt(path: Path, sim: np.ndarray, fov: np.ndarray) -> None:
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("sim", data=np.asarray(sim, dtype=np.uint8), compression="gzip")
            f.create_dataset("fov", data=np.asarray(fov, dtype=np.float32), compression="gzip")


def write_dataset(
    root: str | Path,
    db_paths: Sequence[str],
    db_loc: np.ndarray,
    q_paths: Sequence[str],
    q_loc: np.ndarray,
    sim: np.ndarray,
    fov: np.ndarray,
    files: DatasetFiles | None = None,
) -> Path:
    """Write the contract files (images must already be under root). The gt file is written last."""
    files = files or DatasetFiles()
    root = Path(root)
    write_split_json(root / files.database_json, db_paths, db_loc)
    write_split_json(root / files.query_json, q_paths, q_loc)
    write_gt(root / (files.gt_h5 or "gt.h5"), sim, fov)
    return root
