"""A dataset layout of your own, outside the package: `csv_places`.

    <root>/database.csv   path,east,north[,heading]   (paths relative to <root>; metres, e.g. UTM; degrees)
    <root>/queries.csv    the same columns

A database image is a positive of a query when it lies within `radius_m` metres of it (and, with
`max_heading_deg`, its heading differs by at most that many degrees). Importing this module registers the
reader; `imports=[csv_layout] data.layout=csv_places` chooses it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from siamese_retrieval.data.dataset import RetrievalDataset
from siamese_retrieval.data.ground_truth import SparseRelevance
from siamese_retrieval.data.layouts import finish_dataset
from siamese_retrieval.errors import DatasetError
from siamese_retrieval.registry import LAYOUTS


def read_places(path: Path) -> tuple[list[str], np.ndarray]:
    """(image paths, loc rows [east, north, heading]) of one CSV file; a bad file is one DatasetError line."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found (the csv_places layout is <root>/database.csv and queries.csv)")
    paths, loc = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                loc.append([float(row["east"]), float(row["north"]), float(row.get("heading") or 0.0) % 360.0])
                paths.append(row["path"].strip())
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise DatasetError(f"{path}: line {line}: expected path,east,north[,heading] ({exc!r})") from None
    loc = np.asarray(loc, dtype=np.float64).reshape(-1, 3)
    if not paths or not np.isfinite(loc).all():
        raise DatasetError(f"{path}: {'no rows' if not paths else 'a coordinate is not a finite number'}")
    return paths, loc


@LAYOUTS.register("csv_places")
def read_csv_places(root: str | Path, *, radius_m: float = 25.0, max_heading_deg: float | None = None,
                    check: str = "decode", name: str = "",
                    follow_symlinks_outside_root: bool = False) -> RetrievalDataset:
    """<root>/database.csv and <root>/queries.csv as a validated dataset (loc = [east, north, heading])."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    db_paths, db_loc = read_places(root / "database.csv")
    q_paths, q_loc = read_places(root / "queries.csv")
    relevance = SparseRelevance.from_coordinates(db_loc[:, :2], q_loc[:, :2], radius_m, q_heading=q_loc[:, 2],
                                                 db_heading=db_loc[:, 2], max_heading_deg=max_heading_deg)
    # the package's own last step: image paths kept inside root, images checked, fingerprint (cache key) computed
    return finish_dataset(root, db_paths, db_loc, q_paths, q_loc, relevance, db_source=root / "database.csv",
                          q_source=root / "queries.csv", meta_files=[root / "database.csv", root / "queries.csv"],
                          check=check, name=name or root.name,
                          follow_symlinks_outside_root=follow_symlinks_outside_root)
