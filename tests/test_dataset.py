"""The dataset contract: a valid root reads back; each fault is one DatasetError naming file and problem."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from siamese_retrieval.data.dataset import DatasetFiles, read_dataset, write_gt
from siamese_retrieval.errors import DatasetError
from tests.helpers import make_dataset


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_dataset(tmp_path / "city", n_streets=2, per_street=4, queries_per_street=2)
    return tmp_path / "city"


def _edit_json(path: Path, **changes: object) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_valid_root_reads_back(root: Path) -> None:
    ds = read_dataset(root)
    assert (ds.n_db, ds.n_query) == (8, 4)
    assert ds.sim.shape == ds.fov.shape == (4, 8)
    assert ds.sim.dtype == bool and ds.fov.dtype == np.float32
    assert ds.db_loc.shape == (8, 3)
    assert all(p.is_file() for p in ds.all_files())
    assert len(ds.fingerprint) == 16


def test_fingerprint_changes_with_ground_truth(root: Path) -> None:
    before = read_dataset(root).fingerprint
    ds = read_dataset(root)
    write_gt(root / "gt.h5", ds.sim, np.clip(ds.fov * 0.9, 0, 1))
    assert read_dataset(root).fingerprint != before


def test_study_file_names_and_prefix(tmp_path: Path) -> None:
    files = DatasetFiles("database/database_lite.json", "query/query_lite.json", "london_lite_gt.h5")
    make_dataset(tmp_path / "london", n_streets=2, per_street=3, files=files)
    ds = read_dataset(tmp_path / "london", files)
    assert ds.n_db == 6
    # gt_h5=None finds the single <name>_gt.h5
    assert read_dataset(tmp_path / "london", DatasetFiles(files.database_json, files.query_json)).n_db == 6
    # im_prefix is prepended to every path
    db_json = tmp_path / "london" / files.database_json
    meta = json.loads(db_json.read_text())
    first_dir, _, _ = meta["im_paths"][0].partition("/")
    _edit_json(db_json, im_prefix=first_dir + "/", im_paths=[p.partition("/")[2] for p in meta["im_paths"]])
    assert read_dataset(tmp_path / "london", files).db_paths == meta["im_paths"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere: dataset root not found"):
        read_dataset(tmp_path / "nowhere")


def test_missing_json(root: Path) -> None:
    (root / "query" / "query.json").unlink()
    with pytest.raises(DatasetError, match=r"query\.json: file not found"):
        read_dataset(root)


def test_json_not_json(root: Path) -> None:
    (root / "database" / "database.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"database\.json: not valid JSON"):
        read_dataset(root)


@pytest.mark.parametrize("key", ["im_paths", "loc"])
def test_json_missing_key(root: Path, key: str) -> None:
    path = root / "database" / "database.json"
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=rf"database\.json: missing key\(s\) {key}"):
        read_dataset(root)


def test_length_mismatch(root: Path) -> None:
    path = root / "query" / "query.json"
    meta = json.loads(path.read_text())
    _edit_json(path, loc=meta["loc"][:-1])
    with pytest.raises(DatasetError, match=r"query\.json: im_paths has 4 entries but loc has 3"):
        read_dataset(root)


def test_gt_shape_mismatch(root: Path) -> None:
    ds = read_dataset(root)
    write_gt(root / "gt.h5", ds.sim[:, :-1], ds.fov[:, :-1])
    with pytest.raises(DatasetError, match=r"gt\.h5: sim has shape \(4, 7\), expected .* \(4, 8\)"):
        read_dataset(root)


def test_gt_missing_dataset(root: Path) -> None:
    with h5py.File(root / "gt.h5", "a") as f:
        del f["fov"]
    with pytest.raises(DatasetError, match=r"gt\.h5: missing dataset\(s\) fov"):
        read_dataset(root)


@pytest.mark.parametrize("bad, message", [(1.5, r"fov must lie in \[0, 1\]"), (-0.1, r"fov must lie in \[0, 1\]"),
                                          (np.nan, "fov contains NaN")])
def test_fov_out_of_range(root: Path, bad: float, message: str) -> None:
    ds = read_dataset(root)
    fov = ds.fov.copy()
    fov[0, 0] = bad
    write_gt(root / "gt.h5", ds.sim, fov)
    with pytest.raises(DatasetError, match=message):
        read_dataset(root)


@pytest.mark.parametrize("evil", ["../../etc/passwd", "/etc/passwd", "database/../../outside.jpg"])
def test_path_escaping_root_is_refused(root: Path, evil: str) -> None:
    path = root / "database" / "database.json"
    meta = json.loads(path.read_text())
    meta["im_paths"][2] = evil
    path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"database\.json: im_paths\[2\] (escapes the dataset root|is absolute)"):
        read_dataset(root, check="none")  # refused on the path alone, the file is never opened


def test_missing_image(root: Path) -> None:
    ds = read_dataset(root)
    ds.db_file(1).unlink()
    with pytest.raises(DatasetError, match=rf"{ds.db_paths[1]}: image not found"):
        read_dataset(root)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "image file is empty"), (b"this is a text file", "not a decodable image")],
)
def test_corrupt_image(root: Path, content: bytes, message: str) -> None:
    ds = read_dataset(root)
    ds.query_file(0).write_bytes(content)
    with pytest.raises(DatasetError, match=rf"{ds.q_paths[0]}: {message}"):
        read_dataset(root)


def test_truncated_jpeg(root: Path) -> None:
    ds = read_dataset(root)
    data = ds.db_file(0).read_bytes()
    ds.db_file(0).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"{ds.db_paths[0]}: (truncated JPEG|not a decodable image)"):
        read_dataset(root)


def test_query_without_positive_is_allowed(root: Path) -> None:
    ds = read_dataset(root)
    sim, fov = ds.sim.copy(), ds.fov.copy()
    sim[0], fov[0] = False, 0.0
    write_gt(root / "gt.h5", sim, fov)
    assert not read_dataset(root).sim[0].any()
