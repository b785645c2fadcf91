"""Write the package's tiny synthetic city in the csv_places layout:  python make_csv_city.py OUT

OUT/images/{database,queries}/*.jpg, OUT/database.csv and OUT/queries.csv (path,east,north,heading).
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.synth import SynthConfig, generate_city


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        city = read_dataset(generate_city(Path(tmp) / "city", SynthConfig.from_preset("tiny"), workers=1), check="none")
        for csv_name, folder, paths, loc in (("database.csv", "database", city.db_paths, city.db_loc),
                                             ("queries.csv", "queries", city.q_paths, city.q_loc)):
            (out / "images" / folder).mkdir(parents=True, exist_ok=True)
            with open(out / csv_name, "w", newline="", encoding="utf-8") as f:
                rows = csv.writer(f)
                rows.writerow(["path", "east", "north", "heading"])
                for path, (east, north, heading) in zip(paths, loc):
                    rel = f"images/{folder}/{Path(path).name}"
                    shutil.copyfile(city.root / path, out / rel)
                    rows.writerow([rel, f"{east:.3f}", f"{north:.3f}", f"{heading:.1f}"])
    print(f"{out}: {city.n_db} database images, {city.n_query} queries")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_csv_city.py OUT")
    main(Path(sys.argv[1]))
