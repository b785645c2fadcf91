"""Other on-disk layouts (the VPR benchmark folder layout, the official MSLS layout): the tiny synthetic city is
exported to each, read back with the layout readers and converted back with the CLI. Positives must equal the
radius rule (and, for MSLS, the optional heading rule) applied with numpy to the generator's own coordinates;
malformed inputs are one DatasetError line naming the file."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from siamese_retrieval.data.dataset import RetrievalDataset, read_dataset
from siamese_retrieval.data.layouts import heading_difference, parse_vpr_name, read_msls_official, read_vpr_folder
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.data.synth.export import UTM_ORIGIN, export_msls_official, export_vpr_folder
from siamese_retrieval.errors import DatasetError
from tests.conftest import ROOT

RADIUS = 25.0
CITY = "synthcity"


@pytest.fixture(scope="module")
def original(cache_dir: Path) -> RetrievalDataset:
    return read_dataset(ensure_city(cache_dir, SynthConfig.from_preset("tiny"), workers=1), check="none")


@pytest.fixture(scope="module")
def exported(original: RetrievalDataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("layouts")
    return {"vpr": export_vpr_folder(original.root, out / "vpr", split="test"),
            "msls": export_msls_official(original.root, out / "msls", city=CITY)}


def expected_sim(original: RetrievalDataset, radius: float, max_heading: float | None = None) -> np.ndarray:
    """The rule, computed independently: full pairwise distances of the generator's loc (tiny: 40 x 120)."""
    d = np.linalg.norm(original.q_loc[:, None, :2] - original.db_loc[None, :, :2], axis=2)
    assert np.abs(d - radius).min() > 1e-3, "a pair lies on the radius: the test would depend on rounding"
    sim = d <= radius
    if max_heading is not None:
        sim &= heading_difference(original.q_loc[:, None, 2], original.db_loc[None, :, 2]) <= max_heading
    return sim


def stems(paths: list[str]) -> list[str]:
    return [PurePosixPath(p).stem for p in paths]


def order_in(original_paths: list[str], keys: list[str]) -> np.ndarray:
    """For each read-back entry (named by the source's file stem), its index in the original split."""
    index = {s: i for i, s in enumerate(stems(original_paths))}
    return np.array([index[k] for k in keys])


def assert_same_entries(ds: RetrievalDataset, original: RetrievalDataset, db_order: np.ndarray,
                        q_order: np.ndarray) -> None:
    assert (ds.n_db, ds.n_query) == (original.n_db, original.n_query)
    assert sorted(db_order) == list(range(original.n_db)) and sorted(q_order) == list(range(original.n_query))
    for i, j in enumerate(db_order):
        assert ds.db_file(i).read_bytes() == original.db_file(j).read_bytes(), ds.db_paths[i]
    for i, j in enumerate(q_order):
        assert ds.query_file(i).read_bytes() == original.query_file(j).read_bytes(), ds.q_paths[i]


def vpr_keys(paths: list[str]) -> list[str]:
    return [parse_vpr_name(p).fields["pano_id"] for p in paths]


def msls_keys(paths: list[str]) -> list[str]:
    return [PurePosixPath(p).stem.split("_", 1)[1] for p in paths]  # "<database|query>_<stem>"


# ----------------------------------------------------------------------------------------- readers


def test_vpr_folder_reads_back_the_city(exported: dict[str, Path], original: RetrievalDataset) -> None:
    ds = read_vpr_folder(exported["vpr"], "test", check="decode")
    db_order = order_in(original.db_paths, vpr_keys(ds.db_paths))
    q_order = order_in(original.q_paths, vpr_keys(ds.q_paths))
    assert_same_entries(ds, original, db_order, q_order)
    assert np.allclose(ds.db_loc[:, :2], original.db_loc[db_order, :2] + UTM_ORIGIN, atol=1e-3)
    expected = expected_sim(original, RADIUS)[np.ix_(q_order, db_order)]
    assert expected.any() and not expected.all()
    assert np.array_equal(ds.sim, expected)  # heading ignored: cameras facing away within 25 m count
    assert np.array_equal(ds.fov, expected.astype(np.float32))
    tight = read_vpr_folder(exported["vpr"], "test", radius_m=10.0, check="none")
    assert np.array_equal(tight.sim, expected_sim(original, 10.0)[np.ix_(q_order, db_order)])


def test_msls_official_reads_back_the_city_with_both_rules(exported: dict[str, Path],
                                                           original: RetrievalDataset) -> None:
    ds = read_msls_official(exported["msls"], CITY, check="decode")
    db_order = order_in(original.db_paths, msls_keys(ds.db_paths))
    q_order = order_in(original.q_paths, msls_keys(ds.q_paths))
    assert_same_entries(ds, original, db_order, q_order)
    assert np.allclose(ds.q_loc[:, 2], original.q_loc[q_order, 2] % 360, atol=1e-3)
    distance_only = expected_sim(original, RADIUS)[np.ix_(q_order, db_order)]
    assert np.array_equal(ds.sim, distance_only)  # the official rule: no heading
    headed = read_msls_official(exported["msls"], None, max_heading_deg=40.0, check="none")  # the only city
    with_heading = expected_sim(original, RADIUS, max_heading=40.0)[np.ix_(q_order, db_order)]
    assert with_heading.any() and (with_heading != distance_only).any()  # the heading rule does remove pairs
    assert np.array_equal(headed.sim, with_heading)


def test_msls_panoramas_are_left_out_as_the_official_code_does(exported: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "msls"
    shutil.copytree(exported["msls"], root)
    raw = root / "train_val" / CITY / "database" / "raw.csv"
    rows = list(csv.reader(raw.open(newline="")))
    rows[1][-1] = "True"  # the first database image becomes a panorama
    with raw.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    kept = read_msls_official(root, CITY, check="none")
    assert f"train_val/{CITY}/database/images/{rows[1][1]}.jpg" not in kept.db_paths
    assert read_msls_official(root, CITY, exclude_panos=False, check="none").n_db == kept.n_db + 1


# ----------------------------------------------------------------------------------------- the CLI


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "siamese_retrieval.data.convert", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_convert_cli_writes_the_contract_format(exported: dict[str, Path], original: RetrievalDataset,
                                                tmp_path: Path) -> None:
    cases = [
        ("vpr_folder", exported["vpr"], ["--split", "test"], read_vpr_folder(exported["vpr"], "test", check="none")),
        ("msls_official", exported["msls"], ["--city", CITY], read_msls_official(exported["msls"], CITY, check="none")),
    ]
    for layout, src, extra, source in cases:
        out = tmp_path / layout
        proc = convert("--layout", layout, "--root", str(src), "--out", str(out), "--radius", "25", *extra)
        assert proc.returncode == 0, proc.stderr
        ds = read_dataset(out, check="decode")
        assert ds.n_db == source.n_db and ds.n_query == source.n_query
        assert np.array_equal(ds.sim, source.sim) and np.array_equal(ds.fov, source.fov)
        assert np.allclose(ds.db_loc, source.db_loc, atol=1e-3)
        assert all(ds.db_file(i).read_bytes() == source.db_file(i).read_bytes() for i in range(ds.n_db))
        assert all(ds.query_file(i).read_bytes() == source.query_file(i).read_bytes() for i in range(ds.n_query))
        assert not any(p.is_symlink() for p in ds.all_files())
    # --link: symbolic links out of the root, refused by default, read with follow_symlinks_outside_root
    out = tmp_path / "linked"
    proc = convert("--layout", "msls_official", "--root", str(exported["msls"]), "--out", str(out), "--link")
    assert proc.returncode == 0 and "follow_symlinks_outside_root=true" in proc.stdout, proc.stderr
    with pytest.raises(DatasetError, match="follow_symlinks_outside_root"):
        read_dataset(out, check="none")
    assert read_dataset(out, check="exists", follow_symlinks_outside_root=True).n_db == original.n_db
    # bad input: one line, exit code 2, nothing written
    for args in (["--layout", "vpr_folder", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "never")],
                 ["--layout", "msls_official", "--root", str(exported["msls"]), "--out", str(out)]):
        proc = convert(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "already exists" in proc.stderr and not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------- malformed inputs


def vpr_case(edit):
    def build(src: Path, root: Path) -> Path:
        shutil.copytree(src, root)
        return edit(root / "images" / "test")
    return build


def rename_first(kind: str, fn):
    def edit(split: Path) -> Path:
        first = sorted((split / kind).iterdir())[0]
        bad = first.with_name(fn(first.name))
        first.rename(bad)
        return bad
    return edit


def msls_case(kind: str, csv_name: str, fn):
    def build(src: Path, root: Path) -> Path:
        shutil.copytree(src, root)
        path = root / "train_val" / CITY / kind / csv_name
        rows = list(csv.reader(path.open(newline="")))
        fn(rows)
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        return path
    return build


def drop_column(name: str):
    def fn(rows: list[list[str]]) -> None:
        col = rows[0].index(name)
        for row in rows:
            del row[col]
    return fn


def set_cell(line: int, column: str, value: str):
    return lambda rows: rows[line - 1].__setitem__(rows[0].index(column), value)


MALFORMED = {
    "vpr: too few @ fields": ("vpr", vpr_case(rename_first("database", lambda n: "@" + "@".join(n.split("@")[3:]))),
                              "'@' separators"),
    "vpr: no leading @": ("vpr", vpr_case(rename_first("queries", lambda n: "x" + n)), "does not start with '@'"),
    "vpr: non-numeric UTM east": ("vpr", vpr_case(rename_first("queries", lambda n: "@4OO0OO.5" + n[n.index("@", 1):])),
                                  "UTM_east (field 1 of the file name) is not a number: '4OO0OO.5'"),
    "vpr: non-finite UTM north": ("vpr", vpr_case(rename_first("database", lambda n: "@1.0@nan@" + n.split("@", 3)[3])),
                                  "UTM_north (field 2 of the file name) is not a finite number"),
    "msls: missing postprocessed column": ("msls", msls_case("database", "postprocessed.csv", drop_column("northing")),
                                           "missing column(s) northing"),
    "msls: missing raw column": ("msls", msls_case("query", "raw.csv", drop_column("pano")), "missing column(s) pano"),
    "msls: duplicate key": ("msls", msls_case("query", "postprocessed.csv", set_cell(4, "key", "query_s000_00001")),
                            "key 'query_s000_00001' appears twice (lines 3 and 4)"),
    "msls: non-numeric easting": ("msls", msls_case("database", "postprocessed.csv", set_cell(5, "easting", "east")),
                                  "line 5: easting of key 'database_s000_00003' is not a number: 'east'"),
    "msls: key missing from raw.csv": ("msls", msls_case("database", "raw.csv", lambda rows: rows.pop(2)),
                                       "no row for key 'database_s000_00001'"),
    "msls: bad pano flag": ("msls", msls_case("query", "raw.csv", set_cell(2, "pano", "maybe")),
                            "line 2: pano must be True or False"),
    "msls: ragged row": ("msls", msls_case("query", "postprocessed.csv", lambda rows: rows[4].append("extra")),
                         "line 5 has 7 fields, the header has 6"),
    "msls: key that is a path": ("msls", msls_case("database", "postprocessed.csv", set_cell(2, "key", "../x")),
                                 "is not a usable image name"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_layouts_are_one_line_naming_the_file(case: str, exported: dict[str, Path], tmp_path: Path) -> None:
    kind, build, message = MALFORMED[case]
    bad_file = build(exported[kind], tmp_path / kind)
    read = read_vpr_folder if kind == "vpr" else read_msls_official
    with pytest.raises(DatasetError) as info:
        read(tmp_path / kind, check="none")
    text = str(info.value)
    assert "\n" not in text and message in text, text
    assert str(bad_file.resolve()) in text, text


def test_other_reader_errors(exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images/val/database: folder not found.*splits present: test"):
        read_vpr_folder(exported["vpr"], "val")
    with pytest.raises(DatasetError, match=r"city folder not found.*\(cities: synthcity\)"):
        read_msls_official(exported["msls"], "london")
    test_only = tmp_path / "msls"  # a city under test/ (the official test cities come without coordinates)
    (test_only / "train_val").mkdir(parents=True)
    shutil.copytree(exported["msls"] / "train_val" / CITY, test_only / "test" / "athens")
    with pytest.raises(DatasetError, match="test cities have no coordinates"):
        read_msls_official(test_only, "athens")
    shutil.copytree(exported["vpr"], tmp_path / "vpr")
    first = sorted((tmp_path / "vpr" / "images" / "test" / "queries").iterdir())[0]
    parts = first.name.split("@")
    parts[9] = ""  # no heading
    first.rename(first.with_name("@".join(parts)))
    assert read_vpr_folder(tmp_path / "vpr", check="none").n_query > 0  # fine while headings are ignored
    with pytest.raises(DatasetError, match="heading field"):
        read_vpr_folder(tmp_path / "vpr", max_heading_deg=40.0, check="none")


@pytest.mark.parametrize("layout,key,options", [pytest.param("vpr_folder", "vpr", [], marks=pytest.mark.slow),
                                                pytest.param("msls_official", "msls", [f"data.layout_options.city={CITY}"],
                                                             marks=pytest.mark.slow)])  # the reader: in-process tests
def test_evaluate_py_reads_the_layouts_directly(layout: str, key: str, options: list[str], exported: dict[str, Path],
                                                original: RetrievalDataset, tmp_path: Path, cache_dir: Path) -> None:
    """`data=<layout> data.root=...` through the real command line: the baseline sees the city's own positives."""
    import json
    import os
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "evaluate.py", "method=orb_ransac", f"data={layout}",
                           f"data.root={exported[key]}", *options, "split=all", "logger=none",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["n_queries"] == original.n_query and result["n_database"] == original.n_db
    has_positive = int(expected_sim(original, 25.0).any(axis=1).sum())
    assert result["metrics"]["all/n_queries_without_positive"] == original.n_query - has_positive


def test_training_positives_use_the_training_radius(tmp_path: Path) -> None:
    """Known answers at the boundaries: a database image 10.0 m from the query is a training positive (inclusive),
    10.5 m an overlap (neither positive nor negative in training), 25.0 m an evaluation positive, 25.5 m nothing."""
    folder = tmp_path / "vpr" / "images" / "test"
    east0, north0 = 500000.0, 4000000.0

    def name(e: float, n: float, i: int) -> str:
        return "@" + "@".join([f"{e:.2f}", f"{n:.2f}", "33", "T", "", "", f"p{i}", "", "0", "", "", "", "", ""]) + "@.jpg"

    for kind, offsets in (("queries", [0.0]), ("database", [10.0, 10.5, 25.0, 25.5])):
        (folder / kind).mkdir(parents=True)
        for i, d in enumerate(offsets):
            (folder / kind / name(east0 + d, north0, i)).write_bytes(b"jpeg")
    ds = read_vpr_folder(tmp_path / "vpr", "test", check="none")
    order = np.argsort(ds.db_loc[:, 0])  # database images by distance
    sim, _ = ds.relevance.lookup(np.array([0]), order[None, :])
    np.testing.assert_array_equal(sim[0], [True, True, True, False])  # evaluation: 25 m
    sim, fov = ds.train_relevance.lookup(np.array([0]), order[None, :])
    np.testing.assert_array_equal(sim[0], [True, False, False, False])  # training: 10 m
    np.testing.assert_array_equal(fov[0], [1.0, 0.5, 0.5, 0.0])  # 10-25 m: an overlap, never a negative
    assert read_vpr_folder(tmp_path / "vpr", "test", check="none", train_radius_m=None).train_relevance is None
