"""The GSV-Cities layout (Ali-bey et al. 2022), the training set of today's VPR methods, read as it is on disk.

    <root>/Dataframes/<City>.csv    place_id,year,month,northdeg,city_id,lat,lon,panoid   (one row per image)
    <root>/Images/<City>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg

(the names amaralibey/gsv-cities builds in GSVCitiesDataset.get_img_name: pandas reads lat and lon as floats and
str() writes them, so a csv's 51.5100 names a file ..._51.51_...).
A place is every image of one (city, place_id): the same spot photographed in different years and headings.

Mapped onto the project's contract so that places feed the P x K place batches directly: each place's oldest
image is its query, the others its database images, and a database image is relevant to exactly the query of
its own place (sim = fov = 1; no radius: GSV-Cities defines places by identity). Coordinates become local
metres per city (equirectangular about the city's mean), each city shifted 1000 km east of the previous one so
that no place cell of the split (`data.split.cell_size_m`) ever holds two cities; heading = northdeg.

Chosen with `data=gsv_cities data.root=PATH`; `layout_options.cities` picks cities (null: every csv found),
`layout_options.min_images_per_place` (default 4, as gsv-cities) drops smaller places with one warning. A
missing image, a malformed row, an unknown city or a place of one image is one DatasetError line.
`python -m siamese_retrieval.data.convert --to gsv_cities` writes a dataset of the project's format (the
synthetic city) in this layout.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.ground_truth import SparseRelevance
from siamese_retrieval.data.layouts import finish_dataset
from siamese_retrieval.errors import DatasetError
from siamese_retrieval.registry import LAYOUTS

log = logging.getLogger(__name__)

COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
EARTH_RADIUS_M = 6_371_000.0
CITY_OFFSET_M = 1_000_000.0  # east shift between cities' local frames


def image_name(row: dict[str, str]) -> str:
    """The image file name of one csv row (gsv-cities' naming; coordinates as Python prints the float)."""
    return (f"{row['city_id']}_{int(row['place_id']):07d}_{int(row['year']):04d}_{int(row['month']):02d}_"
            f"{int(float(row['northdeg'])):03d}_{float(row['lat'])}_{float(row['lon'])}_{row['panoid']}.jpg")


def read_city(path: Path) -> list[dict[str, str]]:
    """The rows of one Dataframes/<City>.csv, every field present and numeric where it must be."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}; GSV-Cities csv files have {', '.join(COLUMNS)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    for key in ("place_id", "year", "month"):
                        int(row[key])
                    for key in ("northdeg", "lat", "lon"):
                        if not math.isfinite(float(row[key])):
                            raise ValueError(f"{key} is not finite")
                    if not row["city_id"] or not row["panoid"] or "/" in row["city_id"] + row["panoid"]:
                        raise ValueError("empty city_id or panoid, or one with '/'")
                except (TypeError, ValueError) as exc:
                    raise DatasetError(f"{path}: line {line}: malformed row ({exc})") from None
                rows.append({k: row[k].strip() for k in COLUMNS})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable csv ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def local_metres(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(n, 2) east / north metres about the points' mean (equirectangular: exact enough within a city)."""
    lat0, lon0 = float(np.mean(lat)), float(np.mean(lon))
    east = np.radians(lon - lon0) * EARTH_RADIUS_M * math.cos(math.radians(lat0))
    north = np.radians(lat - lat0) * EARTH_RADIUS_M
    return np.stack([east, north], axis=1)


@LAYOUTS.register("gsv_cities")
def read_gsv_cities(
    root: str | Path,
    cities: Sequence[str] | None = None,
    min_images_per_place: int = 4,
    *,
    check: str = "decode",
    name: str = "",
    follow_symlinks_outside_root: bool = False,
) -> RetrievalDataset:
    """<root>/Dataframes/*.csv and <root>/Images/ as a validated dataset (one query per place, see above)."""
    root = Path(root).expanduser().resolve()
    frames = root / "Dataframes"
    if not frames.is_dir():
        raise DatasetError(f"{root}: no Dataframes/ folder (the GSV-Cities layout is Dataframes/<City>.csv + Images/<City>/)")
    found = sorted(p.stem for p in frames.glob("*.csv"))
    if isinstance(min_images_per_place, bool) or not isinstance(min_images_per_place, int) or min_images_per_place < 2:
        raise DatasetError(f"min_images_per_place={min_images_per_place!r}: must be an integer >= 2 (a query and a "
                           f"database image)")
    chosen = list(cities) if cities else found
    unknown = [c for c in chosen if c not in found]
    if unknown or not chosen:
        raise DatasetError(f"{frames}: no csv for {unknown or 'any city'}; found {found or 'none'}")
    db_paths, db_loc, q_paths, q_loc, pairs = [], [], [], [], []
    dropped: list[str] = []
    for c, city in enumerate(chosen):
        rows = read_city(frames / f"{city}.csv")
        xy = local_metres(np.array([float(r["lat"]) for r in rows]), np.array([float(r["lon"]) for r in rows]))
        xy[:, 0] += c * CITY_OFFSET_M
        places: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            places[r["place_id"]].append(i)
        for place_id, members in places.items():
            if len(members) < 2:
                raise DatasetError(f"{frames / f'{city}.csv'}: place {place_id} has 1 image (a place needs a query "
                                   f"and a database image)")
            if len(members) < min_images_per_place:
                dropped.append(f"{city}/{place_id}")
                continue
            members.sort(key=lambda i: (int(rows[i]["year"]), int(rows[i]["month"]), i))  # the oldest: the query
            for k, i in enumerate(members):
                rel = f"Images/{city}/{image_name(rows[i])}"
                loc = [xy[i, 0], xy[i, 1], float(rows[i]["northdeg"]) % 360.0]
                if k == 0:
                    q_paths.append(rel), q_loc.append(loc)
                else:
                    pairs.append((len(q_paths) - 1, len(db_paths)))
                    db_paths.append(rel), db_loc.append(loc)
    if dropped:
        log.warning("gsv_cities: %d place(s) with fewer than %d images left out (min_images_per_place), e.g. %s",
                    len(dropped), min_images_per_place, dropped[0])
    if not q_paths:
        raise DatasetError(f"{root}: no place with at least {min_images_per_place} images")
    qi, di = (np.array(x, np.int64) for x in zip(*pairs))
    relevance = SparseRelevance.from_pairs(len(q_paths), len(db_paths), qi, di)
    return finish_dataset(root, db_paths, np.asarray(db_loc, np.float64), q_paths, np.asarray(q_loc, np.float64),
                          relevance, db_source=frames, q_source=frames,
                          meta_files=[frames / f"{city}.csv" for city in chosen], check=check,
                          name=name or root.name, follow_symlinks_outside_root=follow_symlinks_outside_root)
