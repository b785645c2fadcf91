"""Readers for the dataset layouts people already have on disk, each returning a validated `RetrievalDataset`.

    read_vpr_folder(root, split)       the folder layout of the public VPR benchmark tools
    read_msls_official(root, city)     the official Mapillary Street-Level Sequences (MSLS) layout

Like `read_dataset`, everything is checked before anything is used, and every fault is one `DatasetError`
line naming the file (or the entry) and the problem. Positives come from the camera coordinates by a radius
search (FAISS range search over UTM metres, refined exactly in float64), never from a pairwise matrix built
in Python loops. Neither layout has a graded relevance: `fov` is `sim` as float (1.0 for a positive, 0.0
otherwise), so nDCG equals a binary nDCG and a `target=fov` recipe trains on `sim`.

`python -m siamese_retrieval.data.convert` writes either layout into the project's own format.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from siamese_retrieval.data.dataset import (
    RetrievalDataset,
    dataset_with_relevance,
    check_image_files,
    check_real_paths,
    existing_root,
    images_stamp,
    read_utf8,
)
from siamese_retrieval.data.ground_truth import SparseRelevance, heading_difference, radius_pairs  # noqa: F401 (re-exported)
from siamese_retrieval.errors import ConfigError, DatasetError, one_line
from siamese_retrieval.io_utils import file_fingerprint
from siamese_retrieval.registry import LAYOUTS


# Both benchmarks count a database image as a positive of a query when their UTM positions lie within 25 m
# (boundary included: sklearn's radius_neighbors, which both use, returns points at exactly the radius):
#   VPR benchmark: gmberton/deep-visual-geo-localization-benchmark, datasets_ws.py BaseDataset
#     (`knn.radius_neighbors(queries_utms, radius=args.val_positive_dist_threshold)`, parser.py default 25;
#     training positives use train_positives_dist_threshold, default 10).
#   MSLS: mapillary/mapillary_sls, evaluate.py (`--threshold` default 25, "Positive distance threshold defining
#     ground truth pairs", passed as MSLS(..., mode='val', posDistThr=threshold)) and
#     mapillary_sls/datasets/msls.py (`neigh.radius_neighbors(utmQ, self.posDistThr)` on postprocessed.csv's
#     easting/northing; the training default is posDistThr=10, and negDistThr=25 marks "non-negatives").
DEFAULT_RADIUS_M = 25.0
TRAIN_RADIUS_M = 10.0

# ----------------------------------------------------------------------------------------- positives


# Positives from positions (SparseRelevance.from_coordinates, radius_pairs) and heading_difference live in
# data/ground_truth.py: one implementation; imported above.


# ----------------------------------------------------------------------------------------- shared checks


def _radius_dataset(root: Path, db_paths: list[str], db_loc: np.ndarray, q_paths: list[str], q_loc: np.ndarray, *,
                    radius_m: float, train_radius_m: float | None, max_heading_deg: float | None,
                    **finish: Any) -> RetrievalDataset:
    """`finish_dataset` with positives within `radius_m` and training positives (`train_relevance`) from the same
    pairs: one radius search serves both. Training follows the benchmarks' convention, 10 m against evaluation's
    25 m: pairs within `train_radius_m` are positives (sim, fov 1); those between it and `radius_m` stay overlaps,
    not positives and never negatives (fov 0.5, as MSLS's negDistThr keeps them out of the negatives). null, or
    >= radius_m: the evaluation's positives."""
    qi, di = radius_pairs(q_loc[:, :2], db_loc[:, :2], radius_m, q_heading=q_loc[:, 2], db_heading=db_loc[:, 2],
                          max_heading_deg=max_heading_deg)
    relevance = SparseRelevance.from_pairs(len(q_loc), len(db_loc), qi, di)
    dataset = finish_dataset(root, db_paths, db_loc, q_paths, q_loc, relevance, **finish)
    if train_radius_m is None or train_radius_m >= radius_m:
        return dataset
    _check_radius(train_radius_m, max_heading_deg)  # after the images' checks, as before
    near = ((q_loc[qi, :2] - db_loc[di, :2]) ** 2).sum(axis=1) <= float(train_radius_m) ** 2
    dataset.train_relevance = SparseRelevance.from_pairs(dataset.n_query, dataset.n_db, qi, di, sim=near,
                                                         fov=np.where(near, 1.0, 0.5).astype(np.float32))
    return dataset


def _check_radius(radius_m: float, max_heading_deg: float | None) -> None:
    if isinstance(radius_m, bool) or not isinstance(radius_m, (int, float)) or not 0 <= radius_m < math.inf:
        raise DatasetError(f"positive radius must be a finite number of metres >= 0, got {radius_m!r}")
    if max_heading_deg is not None and not (
        isinstance(max_heading_deg, (int, float)) and not isinstance(max_heading_deg, bool)
        and 0 <= max_heading_deg <= 180
    ):
        raise DatasetError(f"max_heading_deg must lie in [0, 180] degrees (or be unset), got {max_heading_deg!r}")


def _finite(text: str, what: str, where: str) -> float:
    """`text` as a finite float, else one DatasetError line: '<where>: <what> is not a (finite) number: ...'."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {what} is not a finite number: {text!r}")
    return value


def finish_dataset(
    root: Path,
    db_paths: list[str],
    db_loc: np.ndarray,
    q_paths: list[str],
    q_loc: np.ndarray,
    relevance: SparseRelevance,
    *,
    db_source: Path,
    q_source: Path,
    meta_files: Sequence[Path],
    check: str,
    name: str,
    follow_symlinks_outside_root: bool,
) -> RetrievalDataset:
    """The images checked (links out of the root, then `check`), the fingerprint computed, the dataset built.

    Public for layout readers of your own (examples/custom_layout): paths are relative to `root` (resolved),
    loc rows are [east, north, heading], `db_source`/`q_source` name what listed the images in error lines, and
    `meta_files` (the files the layout was read from) join the fingerprint that keys every cache.
    """
    check_real_paths(root, db_paths, db_source, follow_symlinks_outside_root)
    check_real_paths(root, q_paths, q_source, follow_symlinks_outside_root)
    all_paths = [root / p for p in db_paths + q_paths]
    check_image_files(all_paths, check)
    h = hashlib.sha256()
    h.update(file_fingerprint(list(meta_files)).encode() if meta_files else b"")
    h.update("\0".join(db_paths + ["|"] + q_paths).encode())
    h.update(images_stamp(all_paths).encode())
    # no graded relevance in these layouts: fov = sim (documented above); dense arrays only while they are small
    return dataset_with_relevance(root, db_paths, db_loc, q_paths, q_loc, relevance, h.hexdigest()[:16], name)


# ----------------------------------------------------------------------------------------- VPR folder layout

# File names of gmberton/VPR-datasets-downloader (README.md "Overview"; util.py get_dst_image_name):
#   @UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude@pano_id@tile_num@heading@pitch@roll
#   @height@timestamp@note@.jpg
# i.e. 15 '@' separators; split("@") gives '' then these 14 fields then the extension. Only the UTM pair is
# required ("the only required values for VPR are UTM coordinates"); the others may be empty. The benchmark
# (deep-visual-geo-localization-benchmark, datasets_ws.py) lists images with
# sorted(glob(join(folder, "**", "*.jpg"), recursive=True)) and reads path.split("@")[1:3]: same order here.
VPR_FIELDS = (
    "UTM_east", "UTM_north", "UTM_zone_number", "UTM_zone_letter", "latitude", "longitude", "pano_id",
    "tile_num", "heading", "pitch", "roll", "height", "timestamp", "note",
)
VPR_SPLITS = ("train", "val", "test")
VPR_KINDS = ("database", "queries")


@dataclass(frozen=True)
class VprName:
    """The parsed fields of one VPR file name."""

    east: float
    north: float
    zone: str  # "" when the name leaves it empty
    heading: float | None
    fields: dict[str, str]


def vpr_file_name(fields: dict[str, object], extension: str = ".jpg") -> str:
    """A file name in the VPR downloader's format from a {field: value} dict (missing fields are empty)."""
    unknown = sorted(set(fields) - set(VPR_FIELDS))
    if unknown:
        raise ValueError(f"unknown VPR file-name field(s): {', '.join(unknown)}")
    values = ["" if fields.get(f) is None else str(fields[f]) for f in VPR_FIELDS]
    bad = next((v for v in values if "@" in v or "/" in v), None)
    if bad is not None:
        raise ValueError(f"VPR file-name fields cannot contain '@' or '/': {bad!r}")
    return "@" + "@".join(values) + "@" + extension


def parse_vpr_name(path: Path | str) -> VprName:
    """The fields of a VPR file name; one DatasetError line naming the file when it does not follow the format."""
    name = os.path.basename(str(path))
    parts = name.split("@")
    expected = len(VPR_FIELDS) + 1  # '@' separators
    if len(parts) - 1 != expected or parts[0] != "":
        found = f"{len(parts) - 1} '@' separator{'s' * (len(parts) != 2)}"
        start = "" if parts[0] == "" else ", and does not start with '@'"
        raise DatasetError(f"{path}: file name has {found}{start}; expected {expected} "
                           "(@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@pano_id@tile_num@heading"
                           "@pitch@roll@height@timestamp@note@.jpg)")
    fields = dict(zip(VPR_FIELDS, parts[1:-1]))
    east = _finite(fields["UTM_east"], "UTM_east (field 1 of the file name)", str(path))
    north = _finite(fields["UTM_north"], "UTM_north (field 2 of the file name)", str(path))
    heading = None
    if fields["heading"].strip():
        heading = _finite(fields["heading"], "heading (field 9 of the file name)", str(path)) % 360.0
    return VprName(east, north, fields["UTM_zone_number"].strip().lstrip("0"), heading, fields)


def _vpr_folder(root: Path, split: str, kind: str) -> Path:
    folder = root / "images" / split / kind
    if not folder.is_dir():
        have = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        hint = f" (splits present: {', '.join(have)})" if have and kind == "database" else ""
        raise DatasetError(f"{folder}: folder not found; the VPR layout is <root>/images/<split>/database and "
                           f"<root>/images/<split>/queries{hint}")
    return folder


@LAYOUTS.register("vpr_folder")
def read_vpr_folder(
    root: str | Path,
    split: str = "test",
    *,
    radius_m: float = DEFAULT_RADIUS_M,
    train_radius_m: float | None = TRAIN_RADIUS_M,
    max_heading_deg: float | None = None,
    check: str = "decode",
    name: str = "",
    follow_symlinks_outside_root: bool = False,
) -> RetrievalDataset:
    """Read `<root>/images/<split>/{database,queries}/**/*.jpg` (VPR downloader file names).

    Positives: database images within `radius_m` (25 m, the benchmark's val/test threshold; 10 m is its
    training threshold) of the query in UTM metres; headings are ignored unless `max_heading_deg` is set
    (then every image needs the heading field). loc = [UTM_east, UTM_north, heading or 0]. All images must lie
    in one UTM zone (distances across zones are meaningless). fov = sim as float.
    """
    _check_radius(radius_m, max_heading_deg)
    root = existing_root(root)
    if split not in VPR_SPLITS:
        raise DatasetError(f"{root}: unknown VPR split {split!r} (use {', '.join(VPR_SPLITS)})")
    per_kind: dict[str, tuple[list[str], np.ndarray, Path]] = {}
    zones: dict[str, Path] = {}
    for kind in VPR_KINDS:
        folder = _vpr_folder(root, split, kind)
        files = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "**", "*.jpg"), recursive=True))
        if not files:
            what = "the database is empty" if kind == "database" else "there are no queries"
            raise DatasetError(f"{folder}: {what} (no .jpg files)")
        rel_paths, rows = [], []
        for f in files:
            parsed = parse_vpr_name(f)
            if parsed.zone:
                zones.setdefault(parsed.zone, Path(f))
            if max_heading_deg is not None and parsed.heading is None:
                raise DatasetError(f"{f}: the heading field (9) is empty, but a heading rule was asked for "
                                   f"(max_heading_deg={max_heading_deg})")
            rel_paths.append(Path(f).relative_to(root).as_posix())
            rows.append([parsed.east, parsed.north, 0.0 if parsed.heading is None else parsed.heading])
        per_kind[kind] = (rel_paths, np.asarray(rows, dtype=np.float64).reshape(-1, 3), folder)
        if len(zones) > 1:
            (z1, f1), (z2, f2) = list(zones.items())[:2]
            raise DatasetError(f"{f2}: UTM zone {z2}, but {f1.name} lies in zone {z1}; all images of a split must "
                               "lie in one UTM zone (distances across zones are meaningless)")
    db_paths, db_loc, db_folder = per_kind["database"]
    q_paths, q_loc, q_folder = per_kind["queries"]
    return _radius_dataset(root, db_paths, db_loc, q_paths, q_loc, radius_m=radius_m, train_radius_m=train_radius_m,
                           max_heading_deg=max_heading_deg, db_source=db_folder, q_source=q_folder, meta_files=[],
                           check=check, name=name or f"{root.name}-{split}",
                           follow_symlinks_outside_root=follow_symlinks_outside_root)


# ----------------------------------------------------------------------------------------- MSLS official layout

# mapillary/mapillary_sls README.md "Package structure": <root>/train_val/<city>/{query,database}/
# {images/<key>.jpg, seq_info.csv, subtask_index.csv, raw.csv, postprocessed.csv}; test/<city> has no raw.csv or
# postprocessed.csv (no coordinates, so no positives can be computed here). msls.py reads both csv files with
# pandas.read_csv(index_col=0): the first column is an unnamed row index. It takes UTM from postprocessed.csv
# ('easting', 'northing'), drops panoramas (`exclude_panos = True`: rows whose raw.csv 'pano' is True), and finds
# positives with radius_neighbors (no heading rule). raw.csv also has 'ca', the compass angle in degrees, which
# becomes loc's heading here and feeds the optional heading rule (`max_heading_deg`, off by default because the
# official code has none). Rows of raw.csv are matched to postprocessed.csv by key.
MSLS_KINDS = ("database", "query")  # the split folders of a city
MSLS_POSTPROCESSED_COLUMNS = ("key", "easting", "northing")
MSLS_RAW_COLUMNS = ("key", "ca", "pano")


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: text}) for every data row of a CSV file with a header row; one DatasetError line
    naming the file for a missing file, undecodable bytes, malformed CSV, missing columns or ragged rows."""
    text = read_utf8(path, encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: empty file; expected a header row with the columns {', '.join(required)}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            shown = ", ".join(h or "''" for h in header)
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (the header has: {shown})")
        twice = sorted({c for c in required if header.count(c) > 1})
        if twice:
            raise DatasetError(f"{path}: column(s) {', '.join(twice)} appear more than once in the header")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise DatasetError(f"{path}: line {reader.line_num} has {len(row)} fields, the header has {len(header)}")
            rows.append((reader.line_num, dict(zip(header, (c.strip() for c in row)))))
    except csv.Error as exc:
        raise DatasetError(f"{path}: not valid CSV ({one_line(exc)} at line {reader.line_num})") from None
    return rows


def _msls_key(path: Path, line: int, key: str) -> str:
    """An image key that names a file in images/: non-empty, no path separators or control characters."""
    if not key or key in (".", "..") or any(c in key for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise DatasetError(f"{path}: line {line}: key {key!r} is not a usable image name (images/<key>.jpg)")
    return key


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _msls_bool(path: Path, line: int, column: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DatasetError(f"{path}: line {line}: {column} must be True or False, found {text!r}")


def _read_msls_split(split_dir: Path, exclude_panos: bool) -> tuple[list[str], np.ndarray, list[Path]]:
    """Keys (panoramas dropped when asked) and their [easting, northing, ca] rows for one city folder."""
    post_path, raw_path = split_dir / "postprocessed.csv", split_dir / "raw.csv"
    post = _read_csv(post_path, MSLS_POSTPROCESSED_COLUMNS)
    raw = _read_csv(raw_path, MSLS_RAW_COLUMNS)
    raw_by_key: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in raw:
        key = _msls_key(raw_path, line, row["key"])
        if key in raw_by_key:
            raise DatasetError(f"{raw_path}: key {key!r} appears twice (lines {raw_by_key[key][0]} and {line})")
        raw_by_key[key] = (line, row)
    keys, rows, seen = [], [], {}
    for line, row in post:
        key = _msls_key(post_path, line, row["key"])
        if key in seen:
            raise DatasetError(f"{post_path}: key {key!r} appears twice (lines {seen[key]} and {line})")
        seen[key] = line
        east = _finite(row["easting"], f"easting of key {key!r}", f"{post_path}: line {line}")
        north = _finite(row["northing"], f"northing of key {key!r}", f"{post_path}: line {line}")
        if key not in raw_by_key:
            raise DatasetError(f"{raw_path}: no row for key {key!r} (line {line} of {post_path.name})")
        raw_line, raw_row = raw_by_key[key]
        pano = _msls_bool(raw_path, raw_line, "pano", raw_row["pano"])
        heading = _finite(raw_row["ca"], f"ca (compass angle) of key {key!r}", f"{raw_path}: line {raw_line}") % 360.0
        if exclude_panos and pano:
            continue
        keys.append(key)
        rows.append([east, north, heading])
    return keys, np.asarray(rows, dtype=np.float64).reshape(-1, 3), [post_path, raw_path]


def msls_cities(root: str | Path, subdir: str = "train_val") -> list[str]:
    """The city folders under <root>/<subdir> (sorted)."""
    base = Path(root) / subdir
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


@LAYOUTS.register("msls_official")
def read_msls_official(
    root: str | Path,
    city: str | None = None,
    *,
    radius_m: float = DEFAULT_RADIUS_M,
    train_radius_m: float | None = TRAIN_RADIUS_M,
    max_heading_deg: float | None = None,
    exclude_panos: bool = True,
    check: str = "decode",
    name: str = "",
    follow_symlinks_outside_root: bool = False,
) -> RetrievalDataset:
    """Read one city of the official MSLS layout: <root>/train_val/<city>/{database,query}/postprocessed.csv
    + raw.csv, images in images/<key>.jpg (`city=None`: the only city there).

    Positives, as mapillary_sls defines them: database images within `radius_m` metres (inclusive) of the query
    in UTM (easting, northing of postprocessed.csv); 25 m is the evaluation threshold (evaluate.py), 10 m the
    training one (msls.py posDistThr). Panoramas (raw.csv pano=True) are left out, as msls.py does, unless
    `exclude_panos=False`. `max_heading_deg` adds a rule the official code does not have: |ca_q - ca_db| <= it
    (compass angles from raw.csv). loc = [easting, northing, ca]; fov = sim as float.
    """
    _check_radius(radius_m, max_heading_deg)
    root = existing_root(root)
    cities = msls_cities(root)
    if city is None:
        if len(cities) != 1:
            found = f"cities: {', '.join(cities)}" if cities else f"no city folders in {root / 'train_val'}"
            raise DatasetError(f"{root}: name the MSLS city to read ({found})")
        city = cities[0]
    if not city or any(c in city for c in "/\\") or city in (".", ".."):
        raise DatasetError(f"{root}: {city!r} is not a city folder name")
    city_dir = root / "train_val" / city
    if not city_dir.is_dir():
        if (root / "test" / city).is_dir():
            raise DatasetError(f"{root / 'test' / city}: MSLS test cities have no coordinates (no postprocessed.csv); "
                               "their positives cannot be computed, use a train_val city")
        have = f" (cities: {', '.join(cities)})" if cities else ""
        raise DatasetError(f"{city_dir}: city folder not found; the MSLS layout is <root>/train_val/<city>/"
                           f"{{database,query}}/postprocessed.csv{have}")
    loaded = {}
    for folder in MSLS_KINDS:
        split_dir = city_dir / folder
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: folder not found (an MSLS city has database/ and query/)")
        keys, loc, meta = _read_msls_split(split_dir, exclude_panos)
        if not keys:
            what = "the database is empty" if folder == "database" else "there are no queries"
            raise DatasetError(f"{split_dir / 'postprocessed.csv'}: {what}"
                               f"{' (after leaving out panoramas)' if exclude_panos else ''}")
        paths = [f"train_val/{city}/{folder}/images/{k}.jpg" for k in keys]
        loaded[folder] = (paths, loc, meta)
    db_paths, db_loc, db_meta = loaded["database"]
    q_paths, q_loc, q_meta = loaded["query"]
    return _radius_dataset(root, db_paths, db_loc, q_paths, q_loc, radius_m=radius_m, train_radius_m=train_radius_m,
                           max_heading_deg=max_heading_deg, db_source=db_meta[0], q_source=q_meta[0],
                           meta_files=db_meta + q_meta, check=check, name=name or city,
                           follow_symlinks_outside_root=follow_symlinks_outside_root)


def read_layout(layout: str, root: str | Path, **options) -> RetrievalDataset:
    """The registered layout reader `layout` (data.layout) applied to `root` with its options."""
    return LAYOUTS.get(layout, key="data.layout")(root, **options)


COMMON_READER_OPTIONS = ("check", "name", "follow_symlinks_outside_root")  # passed by the datamodule itself


def check_layout_options(layout: str, options: Any) -> None:
    """data.layout_options: a mapping whose every key the layout's reader takes (one ConfigError line naming the
    key, the reader's options and the nearest one)."""
    import difflib
    import inspect

    if not isinstance(options, Mapping):
        raise ConfigError(f"data.layout_options={options!r}: must be a mapping of the {layout} layout's options")
    params = inspect.signature(LAYOUTS.get(layout, key="data.layout")).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n in list(params)[1:] if n not in COMMON_READER_OPTIONS]
    for key in options:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"data.layout_options.{key}: not an option of the {layout} layout (its options: "
                              f"{', '.join(known) or 'none'})" + (f"; did you mean {near[0]}?" if near else ""))
