"""Write a dataset root in the project's format (e.g. a synthetic city) into other on-disk layouts, so the
layout readers (data/layouts.py) are tested on real files:

    export_vpr_folder(city_root, out, split="test")       out/images/<split>/{database,queries}/@...@.jpg
    export_msls_official(city_root, out, city="synthcity") out/train_val/<city>/{database,query}/...

Coordinates are fake but consistent: `loc` east/north are treated as metres in UTM zone 33T, shifted by
`origin` (so the numbers look like UTM); latitude/longitude come from a local equirectangular approximation
around the zone's central meridian (good to well under 1 %, and never read back: the readers use UTM).
Headings are loc[:, 2] (compass degrees); image keys and pano ids are the images' file-name stems. Image bytes
are copied unchanged. Each export is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path, PurePosixPath

import numpy as np

from siamese_retrieval.data.conditions import query_conditions
from siamese_retrieval.data.convert import staged_output_dir
from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.layouts import vpr_file_name

UTM_ZONE = (33, "T")
UTM_ORIGIN = (400000.0, 5000000.0)  # (easting, northing) added to loc's east/north
_M_PER_DEG_LAT = 110_946.0  # around 45 degrees north


def fake_utm(loc: np.ndarray, origin: tuple[float, float] = UTM_ORIGIN) -> np.ndarray:
    """(n, 2) UTM easting/northing: loc's east/north shifted by `origin`."""
    return np.asarray(loc, np.float64)[:, :2] + np.asarray(origin, np.float64)


def fake_latlon(utm: np.ndarray, zone_number: int = UTM_ZONE[0]) -> np.ndarray:
    """(n, 2) latitude/longitude for UTM metres (northern hemisphere), by a local equirectangular approximation."""
    utm = np.asarray(utm, np.float64)
    lat = utm[:, 1] / _M_PER_DEG_LAT
    central = -183.0 + 6.0 * zone_number
    lon = central + (utm[:, 0] - 500000.0) / (_M_PER_DEG_LAT * np.cos(np.deg2rad(lat)))
    return np.stack([lat, lon], axis=1)


def _stem(rel: str) -> str:
    return PurePosixPath(rel).stem


def _read_splits(city_root: str | Path) -> list[tuple[list[Path], list[str], np.ndarray, list[str]]]:
    """The database, then the queries of `city_root`: (image files, paths in the dataset, loc, notes) each, a
    note being a query's condition (night, fog, ...) and "" for a database image."""
    root = Path(city_root)
    ds = read_dataset(root, check="none")
    conditions = query_conditions(root, ds.n_query)
    return [
        ([ds.db_file(i) for i in range(ds.n_db)], ds.db_paths, ds.db_loc, [""] * ds.n_db),
        ([ds.query_file(i) for i in range(ds.n_query)], ds.q_paths, ds.q_loc,
         conditions if conditions is not None else [""] * ds.n_query),
    ]


def export_vpr_folder(city_root: str | Path, out: str | Path, *, split: str = "test",
                      origin: tuple[float, float] = UTM_ORIGIN, zone: tuple[int, str] = UTM_ZONE) -> Path:
    """`city_root` (the contract format) as the VPR downloader's folder layout: out/images/<split>/database and
    queries, file names @UTM_east@UTM_north@zone@letter@lat@lon@pano_id@tile@heading@...@note@.jpg with
    pano_id = the source file's stem (unique) and note = the query's condition (night, fog, ...). UTM is
    written with 4 decimals and the heading with 3 (the downloader writes 2 and whole degrees; the reader
    accepts either), so the coordinates read back are loc's to the 0.1 mm."""
    splits = _read_splits(city_root)
    with staged_output_dir(out) as tmp:
        for kind, (files, _, loc, notes) in zip(("database", "queries"), splits):
            folder = tmp / "images" / split / kind
            folder.mkdir(parents=True)
            utm = fake_utm(loc, origin)
            latlon = fake_latlon(utm, zone[0])
            for src, (east, north), (lat, lon), heading, note in zip(files, utm, latlon, loc[:, 2], notes):
                name = vpr_file_name({
                    "UTM_east": f"{east:012.4f}", "UTM_north": f"{north:012.4f}",
                    "UTM_zone_number": f"{zone[0]:02d}", "UTM_zone_letter": zone[1],
                    "latitude": f"{lat:.6f}", "longitude": f"{lon:.6f}", "pano_id": src.stem,
                    "heading": f"{heading % 360.0:07.3f}", "note": note,
                })
                shutil.copyfile(src, folder / name)
    return Path(out)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def export_msls_official(city_root: str | Path, out: str | Path, *, city: str = "synthcity",
                         origin: tuple[float, float] = UTM_ORIGIN, zone: tuple[int, str] = UTM_ZONE) -> Path:
    """`city_root` as one city of the official MSLS layout: out/train_val/<city>/{database,query}/ with
    images/<key>.jpg, postprocessed.csv (,key,easting,northing,night,view_direction), raw.csv
    (,key,lon,lat,ca,captured_at,pano), seq_info.csv (,key,sequence_key,frame_number) and subtask_index.csv
    (,all). Keys are "<database|query>_<file stem>"; ca = loc's heading; no panoramas; a query is night when
    its synthetic condition is night."""
    splits = _read_splits(city_root)
    with staged_output_dir(out) as tmp:
        for folder, (files, rels, loc, notes) in zip(("database", "query"), splits):
            t0 = 1_400_000_000_000 if folder == "database" else 1_500_000_000_000  # captured_at of the first, in ms
            split_dir = tmp / "train_val" / city / folder
            (split_dir / "images").mkdir(parents=True)
            utm = fake_utm(loc, origin)
            latlon = fake_latlon(utm, zone[0])
            post, raw, seq, subtask = [], [], [], []
            frames: dict[str, int] = {}
            for i, (src, rel) in enumerate(zip(files, rels)):
                key = f"{folder}_{_stem(rel)}"
                shutil.copyfile(src, split_dir / "images" / f"{key}.jpg")
                sequence = f"{folder}_{_stem(rel).split('_')[0]}"  # one sequence per street
                frames[sequence] = frames.get(sequence, -1) + 1
                post.append([i, key, f"{utm[i, 0]:.4f}", f"{utm[i, 1]:.4f}", notes[i] == "night", "Forward"])
                raw.append([i, key, f"{latlon[i, 1]:.7f}", f"{latlon[i, 0]:.7f}", f"{loc[i, 2] % 360.0:.4f}",
                            t0 + 1000 * i, False])
                seq.append([i, key, sequence, frames[sequence]])
                subtask.append([i, True])
            _write_csv(split_dir / "postprocessed.csv", ["", "key", "easting", "northing", "night", "view_direction"],
                       post)
            _write_csv(split_dir / "raw.csv", ["", "key", "lon", "lat", "ca", "captured_at", "pano"], raw)
            _write_csv(split_dir / "seq_info.csv", ["", "key", "sequence_key", "frame_number"], seq)
            _write_csv(split_dir / "subtask_index.csv", ["", "all"], subtask)
    return Path(out)


__all__ = ["UTM_ORIGIN", "UTM_ZONE", "export_msls_official", "export_vpr_folder", "fake_latlon", "fake_utm"]
