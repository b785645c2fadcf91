"""The synthetic city: geometry of fov, the contract format, determinism, caching, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.synth import Camera, SynthConfig, ensure_city, fov_matrix, generate_city
from siamese_retrieval.data.synth import generate as generate_mod

TINY = SynthConfig.from_preset("tiny")


# ----------------------------------------------------------------------------------------- fov


def test_fov_identical_camera_is_one():
    cams = [Camera(0, 20.0, -2.0, 0.0), Camera(1, 30.0, 1.5, 170.0)]
    fov = fov_matrix(cams, cams, TINY)
    assert np.allclose(np.diag(fov), 1.0)


def test_fov_zero_across_streets():
    fov = fov_matrix([Camera(0, 20.0, -2.0, 0.0)], [Camera(1, 20.0, -2.0, 0.0)], TINY)
    assert fov[0, 0] == 0.0


def test_fov_opposite_heading_is_about_zero():
    fov = fov_matrix([Camera(0, 30.0, 0.0, 0.0)], [Camera(0, 30.0, 0.0, 180.0)], TINY)
    assert fov[0, 0] < 0.01


def test_fov_symmetric_and_in_range():
    rng = np.random.default_rng(0)
    a = [Camera(int(rng.integers(2)), float(rng.uniform(0, 60)), float(rng.uniform(-3, 3)), float(rng.choice([0, 180]) + rng.uniform(-15, 15))) for _ in range(30)]
    b = [Camera(int(rng.integers(2)), float(rng.uniform(0, 60)), float(rng.uniform(-3, 3)), float(rng.choice([0, 180]) + rng.uniform(-15, 15))) for _ in range(20)]
    ab, ba = fov_matrix(a, b, TINY), fov_matrix(b, a, TINY)
    assert ab.shape == (30, 20)
    np.testing.assert_allclose(ab, ba.T, atol=1e-6)
    assert ab.min() >= 0 and ab.max() <= 1


def test_fov_decreases_along_the_street():
    ref = [Camera(0, 10.0, -2.0, 0.0)]
    moved = [Camera(0, 10.0 + d, -2.0, 0.0) for d in np.arange(0, 40, 2.0)]
    fov = fov_matrix(ref, moved, TINY)[0]
    assert fov[0] == pytest.approx(1.0)
    assert np.all(np.diff(fov) <= 1e-6) and fov[-1] == 0.0
    assert (fov >= 0.5).sum() >= 2  # a few metres away is still a positive


# ----------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_city(tmp_path_factory) -> Path:
    return generate_city(tmp_path_factory.mktemp("city") / "root", TINY, workers=2)


def test_generated_city_passes_the_validator(tiny_city):
    ds = read_dataset(tiny_city)  # decodes every image
    assert ds.n_db == TINY.n_database and ds.n_query == TINY.n_query
    assert ds.sim.shape == ds.fov.shape == (ds.n_query, ds.n_db)
    np.testing.assert_array_equal(ds.sim, ds.fov >= TINY.sim_threshold)
    img = cv2.imread(str(ds.query_file(0)))
    assert img.shape == (TINY.image_height, TINY.image_width, 3)
    assert all(p.endswith(".jpg") and not Path(p).is_absolute() for p in ds.db_paths + ds.q_paths)
    n_pos = ds.sim.sum(1)
    assert 1.0 <= n_pos.mean() <= 10.0
    # one street per 1000 m cell; heading is a compass bearing
    streets = np.floor(ds.db_loc[:, 1] / TINY.street_spacing_m)
    assert len(np.unique(streets)) == TINY.n_streets
    assert ds.db_loc[:, 2].min() >= 0 and ds.db_loc[:, 2].max() < 360
    cfg = json.loads((tiny_city / "synth_config.json").read_text())
    assert cfg["seed"] == TINY.seed and cfg["n_streets"] == TINY.n_streets


def test_generation_is_deterministic(tiny_city, tmp_path):
    again = generate_city(tmp_path / "again", TINY, workers=1)  # another work split, same bytes
    for rel in ("database/database.json", "query/query.json", "synth_config.json"):
        assert (tiny_city / rel).read_bytes() == (again / rel).read_bytes()
    with h5py.File(tiny_city / "gt.h5") as f1, h5py.File(again / "gt.h5") as f2:
        for key in ("sim", "fov"):
            np.testing.assert_array_equal(f1[key][()], f2[key][()])
    for sub in ("database/images", "query/images"):
        names = sorted(p.name for p in (tiny_city / sub).iterdir())
        assert names == sorted(p.name for p in (again / sub).iterdir())
        for name in names[::7]:
            assert (tiny_city / sub / name).read_bytes() == (again / sub / name).read_bytes()


def test_another_seed_gives_another_city(tiny_city, tmp_path):
    other = generate_city(tmp_path / "other", replace(TINY, seed=1), workers=1)
    a = read_dataset(tiny_city, check="none")
    b = read_dataset(other, check="none")
    assert not np.array_equal(a.q_loc, b.q_loc)
    assert (tiny_city / a.db_paths[0]).read_bytes() != (other / b.db_paths[0]).read_bytes()


# ----------------------------------------------------------------------------------------- caching


def test_ensure_city_reuses_and_keys_on_parameters(tmp_path, monkeypatch):
    cfg = replace(TINY, n_streets=2, queries_per_street=4)
    root = ensure_city(tmp_path, cfg)
    assert root.parent == tmp_path and root.name.startswith("synth-")
    read_dataset(root, check="exists")
    mtime = (root / "gt.h5").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("regenerated an existing city")

    monkeypatch.setattr(generate_mod, "generate_city", boom)
    assert ensure_city(tmp_path, cfg) == root
    assert (root / "gt.h5").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    other = ensure_city(tmp_path, replace(cfg, seed=5))
    assert other != root and (other / "gt.h5").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_interrupted_generation_is_not_reused(tmp_path, monkeypatch):
    cfg = replace(TINY, n_streets=1, queries_per_street=3)
    final = generate_mod.city_dir(tmp_path, cfg)
    # a crash mid-generation: a stale temporary, and a half-written directory under the final name
    stale = tmp_path / f".{final.name}.tmp-999999999"
    (stale / "database").mkdir(parents=True)
    (stale / "gt.h5").write_bytes(b"")
    (final / "database" / "images").mkdir(parents=True)

    def interrupted(out, cfg, workers=2):
        (Path(out) / "database").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_mod, "generate_city", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_city(tmp_path, cfg)
    assert not (final / "gt.h5").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    root = ensure_city(tmp_path, cfg)
    assert root == final
    read_dataset(root)


# ----------------------------------------------------------------------------------------- presets, CLI


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="default.*tiny|tiny.*default"):
        SynthConfig.from_preset("huge")


def test_preset_overrides():
    cfg = SynthConfig.from_preset("tiny", seed=3)
    assert cfg.seed == 3 and cfg.n_streets == TINY.n_streets
    with pytest.raises(ValueError, match="n_street"):
        SynthConfig.from_preset("tiny", n_street=3)


def test_cli_writes_city_and_contact_sheet(tmp_path):
    sheet = tmp_path / "sheet.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "siamese_retrieval.data.synth", "--out", str(tmp_path / "city"), "--preset", "tiny", "--preview", str(sheet)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "database: 120" in proc.stdout and "queries: 40" in proc.stdout
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    read_dataset(tmp_path / "city", check="exists")
