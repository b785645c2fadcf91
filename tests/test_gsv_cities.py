"""data=gsv_cities (data/gsv_cities.py) and `convert --to gsv_cities`: the layout read as GSV-Cities writes it,
places as query + database images relevant to each other only, and one line for every bad input."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from siamese_retrieval.data.convert import main as convert_main
from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.gsv_cities import COLUMNS, CITY_OFFSET_M, EARTH_RADIUS_M, image_name, read_gsv_cities
from siamese_retrieval.data.ground_truth import as_ground_truth
from siamese_retrieval.data.layouts import read_layout
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.errors import DatasetError
from tests.conftest import ROOT

# gsv-cities' GSVCitiesDataset.get_img_name: city_placeid(7)_year(4)_month(2)_northdeg(3)_lat_lon_panoid.jpg
NAME = re.compile(r"^[a-z]+_\d{7}_\d{4}_\d{2}_\d{3}_-?\d+\.\d+_-?\d+\.\d+_\w+\.jpg$")


def write_city(root: Path, city: str, rows: list[dict], images: bool = True) -> None:
    (root / "Dataframes").mkdir(parents=True, exist_ok=True)
    with open(root / "Dataframes" / f"{city}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    if images:
        (root / "Images" / city).mkdir(parents=True, exist_ok=True)
        for r in rows:
            img = np.full((48, 64, 3), 40 + 10 * int(r["place_id"]), np.uint8)
            cv2.imwrite(str(root / "Images" / city / image_name({k: str(v) for k, v in r.items()})), img)


def row(place: int, year: int, month: int, deg: int, lat: str, lon: str, city_id: str = "london",
        pano: str | None = None) -> dict:
    return {"place_id": place, "year": year, "month": month, "northdeg": deg, "city_id": city_id, "lat": lat,
            "lon": lon, "panoid": pano or f"pano{place}y{year}m{month}"}


@pytest.fixture()
def two_cities(tmp_path: Path) -> Path:
    root = tmp_path / "gsv"
    write_city(root, "London", [row(0, 2019, 5, 10, "51.5000", "-0.1200"), row(0, 2015, 3, 350, "51.5001", "-0.1200"),
                                row(0, 2017, 8, 0, "51.5000", "-0.1201"), row(1, 2020, 1, 90, "51.5100", "-0.1000"),
                                row(1, 2021, 1, 95, "51.5100", "-0.1001"), row(1, 2018, 6, 270, "51.5101", "-0.1000")])
    write_city(root, "Boston", [row(7, 2016, 1, 5, "42.3600", "-71.0600", "boston"),
                                row(7, 2014, 2, 15, "42.3601", "-71.0600", "boston"),
                                row(7, 2015, 2, 25, "42.3600", "-71.0601", "boston"),
                                row(9, 2013, 4, 120, "42.3700", "-71.0500", "boston")])  # 1 image: refused below
    return root


def test_places_become_a_query_and_its_database_images(two_cities: Path) -> None:
    with pytest.raises(DatasetError, match=r"Boston.csv: place 9 has 1 image"):
        read_gsv_cities(two_cities, min_images_per_place=3)
    ds = read_gsv_cities(two_cities, cities=["London"], min_images_per_place=3)
    assert ds.n_query == 2 and ds.n_db == 4  # two places of three images: the oldest of each is the query
    # named as gsv-cities' loader names them: pandas reads the csv's -0.1200 as a float, str() writes -0.12
    assert ds.q_paths == ["Images/London/london_0000000_2015_03_350_51.5001_-0.12_pano0y2015m3.jpg",
                          "Images/London/london_0000001_2018_06_270_51.5101_-0.1_pano1y2018m6.jpg"]
    sim, _ = as_ground_truth(ds).lookup(np.arange(2), np.tile(np.arange(4), (2, 1)))
    np.testing.assert_array_equal(sim, [[1, 1, 0, 0], [0, 0, 1, 1]])  # relevant to its own place only
    # local metres: place 1 lies 0.01 deg north (1112 m) and 0.02 deg east (cos 51.5 x 2224 m) of place 0
    d = ds.q_loc[1, :2] - ds.q_loc[0, :2]
    assert d[1] == pytest.approx(math.radians(0.01) * EARTH_RADIUS_M, rel=0.01)
    assert d[0] == pytest.approx(math.radians(0.02) * EARTH_RADIUS_M * math.cos(math.radians(51.5)), rel=0.01)
    assert ds.q_loc[0, 2] == 350.0  # heading = northdeg


def test_cities_never_share_a_frame_and_small_places_are_left_out(two_cities: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(two_cities / "Images" / "Boston")
    write_city(two_cities, "Boston", [row(7, 2016, 1, 5, "42.3600", "-71.0600", "boston"),
                                      row(7, 2014, 2, 15, "42.3601", "-71.0600", "boston"),
                                      row(9, 2013, 4, 120, "42.3700", "-71.0500", "boston"),
                                      row(9, 2014, 4, 120, "42.3700", "-71.0500", "boston"),
                                      row(9, 2015, 4, 120, "42.3700", "-71.0500", "boston")])
    with caplog.at_level(logging.WARNING, logger="siamese_retrieval.data.gsv_cities"):
        ds = read_gsv_cities(two_cities, min_images_per_place=3)  # every city found, sorted: Boston, London
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["gsv_cities: 1 place(s) with fewer than 3 images left out (min_images_per_place), e.g. Boston/7"]
    assert ds.n_query == 3 and ds.q_paths[0].startswith("Images/Boston/boston_0000009_2013")
    assert ds.q_loc[1, 0] - ds.q_loc[0, 0] > CITY_OFFSET_M / 2  # London's frame 1000 km east of Boston's


@pytest.mark.parametrize("damage,said", [
    (lambda r: (r / "Images" / "London" / image_name({k: str(v) for k, v in row(1, 2021, 1, 95, "51.5100",
                                                                               "-0.1001").items()})).unlink(),
     "london_0000001_2021_01_095_51.51_-0.1001_pano1y2021m1.jpg: image not found"),
    (lambda r: _rewrite(r, "51.5100,-0.1000", "north,-0.1000"), "London.csv: line 5: malformed row"),
    (lambda r: _rewrite(r, "place_id,", "place,"), "London.csv: missing column(s) ['place_id']"),
    (lambda r: _rewrite(r, "pano1y2020m1", "../../evil"), "London.csv: line 5: malformed row"),
    (lambda r: shutil.rmtree(r / "Dataframes"), "no Dataframes/ folder"),
    (lambda r: (r / "Dataframes" / "London.csv").write_bytes(b"\xff\xfe\x00bad"), "London.csv: unreadable csv"),
])
def test_bad_inputs_are_one_line(two_cities: Path, damage, said: str) -> None:
    damage(two_cities)
    with pytest.raises(DatasetError) as err:
        read_gsv_cities(two_cities, cities=["London"], min_images_per_place=3)
    assert said in str(err.value) and "\n" not in str(err.value)


def _rewrite(root: Path, old: str, new: str) -> None:
    path = root / "Dataframes" / "London.csv"
    path.write_text(path.read_text().replace(old, new, 1))


def test_unknown_city_and_bad_minimum(two_cities: Path) -> None:
    with pytest.raises(DatasetError, match=r"no csv for \['Paris'\]; found \['Boston', 'London'\]"):
        read_gsv_cities(two_cities, cities=["Paris"])
    with pytest.raises(DatasetError, match="min_images_per_place=1: must be an integer >= 2"):
        read_gsv_cities(two_cities, min_images_per_place=1)


def test_the_synthetic_city_exported_and_read_back(cache_dir: Path, tmp_path: Path) -> None:
    """convert --to gsv_cities: every place is a query with >= 3 of its positives (each database image in one
    place), named as GSV-Cities names them; read back, each query's positives are exactly its place's images
    and the images are the city's bytes."""
    city = read_dataset(ensure_city(cache_dir, SynthConfig.from_preset("tiny")), check="none")
    out = tmp_path / "gsv"
    assert convert_main(["--layout", "contract", "--root", str(city.root), "--out", str(out), "--to",
                         "gsv_cities"]) == 0
    names = sorted(p.name for p in (out / "Images" / "Synth").iterdir())
    assert names and all(NAME.match(n) for n in names), names[:3]
    with open(out / "Dataframes" / "Synth.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # the csv's coordinates are written as pandas reads and str() prints them, so gsv-cities' own loader
    # (GSVCitiesDataset.get_img_name) finds these very files
    assert all(str(float(r[k])) == r[k] for r in rows for k in ("lat", "lon")), rows[0]
    assert sorted(image_name(r) for r in rows) == names
    ds = read_layout("gsv_cities", out, check="decode")
    truth, city_truth = as_ground_truth(ds), as_ground_truth(city)
    n_pos = truth.n_positives(np.arange(ds.n_query))
    assert ds.n_query >= 10 and np.all(n_pos >= 3) and n_pos.sum() == ds.n_db
    by_bytes = {(city.root / p).read_bytes(): ("q", i) for i, p in enumerate(city.q_paths)}
    by_bytes.update({(city.root / p).read_bytes(): ("db", j) for j, p in enumerate(city.db_paths)})
    for q in range(ds.n_query):
        kind, cq = by_bytes[(ds.root / ds.q_paths[q]).read_bytes()]
        assert kind == "q"
        sim, _ = truth.lookup(np.array([q]), np.arange(ds.n_db)[None, :])
        for j in np.flatnonzero(sim[0]):  # each of the place's database images is a positive of its query
            kind, cj = by_bytes[(ds.root / ds.db_paths[j]).read_bytes()]
            assert kind == "db" and city_truth.lookup(np.array([cq]), np.array([[cj]]))[0][0, 0]
    # the source is untouched and a second export into the same folder is refused
    assert convert_main(["--layout", "contract", "--root", str(city.root), "--out", str(out), "--to",
                         "gsv_cities"]) == 2


@pytest.mark.slow
def test_train_one_epoch_on_the_gsv_cities_layout_then_a_benchmark(cache_dir: Path, tmp_path: Path) -> None:
    """Train on the GSV-Cities export, then (benchmarks=[...]) the best checkpoint on the city in the project's
    format: benchmarks.csv in the run, its row in metrics.json beside the training's own metrics."""
    city = ensure_city(cache_dir, SynthConfig.from_preset("tiny"))
    out = tmp_path / "gsv"
    assert convert_main(["--layout", "contract", "--root", str(city), "--out", str(out), "--to", "gsv_cities"]) == 0
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=cnn_snn", "data=gsv_cities",
                           f"data.root={out}", "trainer.max_epochs=1", "logger=none", "model.inputs.height=64",
                           "model.inputs.width=96", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={cache_dir}", f"benchmarks=[msls_city:{city}]"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["data"] == "gsv_cities" and "test/recall@1" in result["metrics"]
    (row,) = result["benchmarks"]
    assert row["benchmark"] == "msls_city" and row["queries"] == 40 and 0 <= row["recall@1"] <= 1
    assert (tmp_path / "run" / "benchmarks.csv").read_text().splitlines()[1].startswith("msls_city,contract,")
