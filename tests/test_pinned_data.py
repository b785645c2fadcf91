"""Pinned data behaviour: split seed vs training seed, train-only database images, the default
recipe's positive cap, ORB padding of few-keypoint images, and fov = 1.0 as valid input.

Each test states the bug it would catch. Assertions are exact (equalities, known counts, orders).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import h5py
import numpy as np
import pytest

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.datamodule import RetrievalDataModule
from siamese_retrieval.data.inputs import KeypointInputs
from siamese_retrieval.data.keypoints import OrbConfig, extract_orb
from siamese_retrieval.data.pairs import PairRecipe, PairSampler
from siamese_retrieval.data.splits import split_by_place
from siamese_retrieval.errors import DatasetError
from tests.helpers import make_dataset

SPLIT_FIELDS = ("train_q", "val_q", "test_q", "train_db", "split_of_db")
TINY = dict(height=48, width=48)  # below ORB's 2 x 31 px border: extraction is instant (all padded)


def _datamodule(root: Path, seed: int, split: dict, pairs: dict | None = None) -> RetrievalDataModule:
    dm = RetrievalDataModule(KeypointInputs(n_keypoints=10), root=str(root), split=split,
                             pairs=pairs or {"preset": "default"}, batch_size=8, seed=seed)
    dm.setup("fit")
    return dm


def _assert_same_splits(a, b) -> None:
    for name in SPLIT_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# ------------------------------------------------------------------ 1. split seed, not training seed


@pytest.fixture(scope="module")
def ten_streets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ten_streets") / "city"
    make_dataset(root, n_streets=10, per_street=5, queries_per_street=3, **TINY)
    return root


def test_split_depends_only_on_split_seed_not_training_seed(ten_streets: Path) -> None:
    """Catches: the datamodule passing its training `seed` to split_by_place even when
    `split.seed` is set (test places would move with every training seed), or ignoring
    `split.seed` altogether, or popping it out of the caller's split config (a second
    datamodule built from the same dict would then fall back to its training seed)."""
    ds = read_dataset(ten_streets, check="none")
    frac = (0.6, 0.2, 0.2)
    by_seed = {s: split_by_place(ds, fractions=frac, seed=s, cell_size_m=1000.0) for s in range(3)}
    # preconditions: on this dataset the three seeds give three different test splits
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(by_seed[a].test_q, by_seed[b].test_q), (a, b)

    split = {"seed": 0, "fractions": list(frac), "cell_size_m": 1000.0}
    dm1 = _datamodule(ten_streets, seed=1, split=split)
    dm2 = _datamodule(ten_streets, seed=2, split=split)
    assert split == {"seed": 0, "fractions": list(frac), "cell_size_m": 1000.0}  # not mutated
    _assert_same_splits(dm1.splits, dm2.splits)
    _assert_same_splits(dm1.splits, by_seed[0])
    # the training seed still drives the pairs (only the split is pinned)
    q1, d1, _ = dm1.sampler.sample(0)
    q2, d2, _ = dm2.sampler.sample(0)
    assert set(zip(q1.tolist(), d1.tolist())) != set(zip(q2.tolist(), d2.tolist()))

    # another split seed moves the test places
    dm_other = _datamodule(ten_streets, seed=1, split={**split, "seed": 2})
    _assert_same_splits(dm_other.splits, by_seed[2])
    assert not np.array_equal(dm_other.splits.test_q, dm1.splits.test_q)


def test_split_falls_back_to_training_seed_only_without_split_seed(ten_streets: Path) -> None:
    """Catches: a fallback that ignores the training seed (always seed 0) or treats an absent
    split seed differently from `split.seed: null`."""
    ds = read_dataset(ten_streets, check="none")
    expected = split_by_place(ds, fractions=(0.6, 0.2, 0.2), seed=2, cell_size_m=1000.0)
    base = {"fractions": [0.6, 0.2, 0.2], "cell_size_m": 1000.0}
    _assert_same_splits(_datamodule(ten_streets, seed=2, split=dict(base)).splits, expected)
    _assert_same_splits(_datamodule(ten_streets, seed=2, split={**base, "seed": None}).splits, expected)


@pytest.mark.parametrize("data", ["synth", "synth_tiny", "msls_city"])
def test_shipped_data_configs_fix_the_split_seed(data: str, tmp_path: Path) -> None:
    """Catches: a data config that sets `split.seed: ${seed}` or drops it (the datamodule then
    falls back to the training seed), so a seed sweep would test every seed on other places."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    overrides = [f"data={data}", "seed=7"] + (["data.root=/nonexistent"] if data == "msls_city" else [])
    cfg = compose_config("train", overrides, tmp_path / "out", tmp_path / "cache")
    split = OmegaConf.to_container(cfg.data.split, resolve=True)
    assert split["seed"] == 0
    assert OmegaConf.to_container(cfg.data, resolve=True)["seed"] == 7


# ------------------------------------------------------------------ 2. training db = train places only


@pytest.fixture(scope="module")
def far_db_city(tmp_path_factory) -> Path:
    # per street: queries at 5, 15, 25 m, database images at 0, 10, ..., 110 m, view 30 m:
    # database images at >= 60 m overlap NO query (fov 0 and sim 0 with every query in the dataset)
    root = tmp_path_factory.mktemp("far_db") / "city"
    make_dataset(root, n_streets=6, per_street=12, queries_per_street=3, step_m=10.0, view_m=30.0, **TINY)
    return root


def test_training_database_comes_only_from_train_places(far_db_city: Path) -> None:
    """Catches: train_db built as "every database image not overlapping an eval query" (the far
    images of val/test streets overlap nothing and would slip in), split_of_db mapping places to
    the wrong split, and hard negatives drawn from the full database instead of train_db."""
    dm = _datamodule(far_db_city, seed=0, split={"seed": 0, "fractions": [0.5, 0.25, 0.25], "cell_size_m": 1000.0})
    ds, s = dm.dataset, dm.splits
    assert dm.recipe == PairRecipe.default()  # its hard negatives are what could leak
    street_of_db = (ds.db_loc[:, 0] // 2000).astype(int)
    street_of_q = (ds.q_loc[:, 0] // 2000).astype(int)
    train_streets = set(street_of_q[s.train_q].tolist())
    eval_streets = set(street_of_q[np.concatenate([s.val_q, s.test_q])].tolist())
    assert train_streets and eval_streets and not train_streets & eval_streets
    far = np.flatnonzero(~(ds.fov > 0).any(axis=0) & ~ds.sim.any(axis=0))
    far_eval = far[np.isin(street_of_db[far], sorted(eval_streets))]
    assert len(far_eval) == 6 * len(eval_streets)  # precondition: the fixture has what it claims

    expected_train_db = np.flatnonzero(np.isin(street_of_db, sorted(train_streets)))
    np.testing.assert_array_equal(s.train_db, expected_train_db)
    assert not np.isin(far_eval, s.train_db).any()
    np.testing.assert_array_equal(s.split_of_db == 0, np.isin(street_of_db, sorted(train_streets)))

    allowed = set(expected_train_db.tolist())
    used = set()
    for epoch in range(4):
        q, d, _ = dm.sampler.sample(epoch)
        assert set(d.tolist()) <= allowed, f"epoch {epoch}: non-train database image in a training pair"
        assert set(q.tolist()) <= set(s.train_q.tolist())
        used |= set(d.tolist())
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=epoch)
        for batch in dm.train_dataloader():
            assert set(batch["d_idx"].tolist()) <= allowed
    dm.trainer = None
    # the far train-street images do serve as hard negatives (they are not excluded wholesale)
    far_train = far[np.isin(street_of_db[far], sorted(train_streets))]
    assert used & set(far_train.tolist())


# ------------------------------------------------------------------ 3. default recipe caps positives


@pytest.fixture(scope="module")
def many_positives(tmp_path_factory):
    # geometric fov; query j of every street gets the j database images of its street with the
    # highest fov as positives: 0, 1, ..., 9 positives per query
    n_streets, per_street, n_q = 4, 12, 10
    root = tmp_path_factory.mktemp("many_pos") / "city"
    ds = make_dataset(root, n_streets=n_streets, per_street=per_street, queries_per_street=n_q,
                      view_m=60.0, **TINY)
    sim = np.zeros_like(ds.sim)
    for s in range(n_streets):
        for j in range(n_q):
            q = s * n_q + j
            cols = s * per_street + np.argsort(-ds.fov[q, s * per_street : (s + 1) * per_street], kind="stable")[:j]
            sim[q, cols] = True
    ds = make_dataset(root, n_streets=n_streets, per_street=per_street, queries_per_street=n_q, view_m=60.0,
                      sim=sim, fov=ds.fov, **TINY)
    splits = split_by_place(ds, fractions=(0.5, 0.25, 0.25), seed=0, cell_size_m=1000.0)
    return ds, splits


def _positives_per_query(sampler: PairSampler, sim: np.ndarray, epoch: int) -> dict[int, list[int]]:
    q, d, target = sampler.sample(epoch)
    out: dict[int, list[int]] = {int(i): [] for i in sampler.query_idx}
    for qi, di in zip(q.tolist(), d.tolist()):
        if sim[qi, di]:
            out[qi].append(di)
    return out


def test_default_recipe_takes_min_4_positives_per_query(many_positives) -> None:
    """Catches: the default preset not capping positives (taking all), capping at a different
    number, drawing positives with replacement (duplicates), taking fewer than available when
    n_pos < 4, or always taking the same first 4 (no per-epoch resampling)."""
    ds, s = many_positives
    assert PairRecipe.default().positives_per_query == 4
    sampler = PairSampler(ds, s.train_q, s.train_db, PairRecipe.default(), seed=0)
    n_pos = {int(q): int(ds.sim[q, s.train_db].sum()) for q in s.train_q}
    assert max(n_pos.values()) >= 6 and min(n_pos.values()) == 0 and 2 in n_pos.values()  # precondition
    seen: dict[int, set[int]] = {q: set() for q in n_pos}
    for epoch in range(6):
        got = _positives_per_query(sampler, ds.sim, epoch)
        for q, pos in got.items():
            assert len(pos) == min(4, n_pos[q]), (epoch, q, n_pos[q], pos)
            assert len(set(pos)) == len(pos)
            assert set(pos) <= set(np.flatnonzero(ds.sim[q]).tolist())
            seen[q] |= set(pos)
    for q, n in n_pos.items():
        if n > 4:
            assert len(seen[q]) > 4, f"query {q} always got the same 4 of its {n} positives"


def test_study_recipe_takes_every_positive(many_positives) -> None:
    """Catches: the study preset inheriting the default cap of 4 (or any cap), and an unbalanced
    number of random negatives per query."""
    ds, s = many_positives
    sampler = PairSampler(ds, s.train_q, s.train_db, PairRecipe.study(), seed=0)
    q_all, d_all, _ = sampler.sample(0)
    got = _positives_per_query(sampler, ds.sim, 0)
    for q, pos in got.items():
        truth = s.train_db[ds.sim[q, s.train_db]]
        assert sorted(pos) == truth.tolist(), q
        n_neg = int(((q_all == q) & ~ds.sim[q_all, d_all]).sum())
        assert n_neg == len(truth), (q, n_neg, len(truth))


# ------------------------------------------------------------------ 4. ORB padding and masks


def _few_corner_image(squares: int, size: int = 6, contrast: int = 128) -> np.ndarray:
    """Flat grey 128 x 160 with `squares` small bright squares well inside the 31 px border."""
    img = np.full((128, 160), 100, np.uint8)
    for i in range(squares):
        x, y = 50 + 30 * i, 52 + 12 * (i % 2)
        cv2.rectangle(img, (x, y), (x + size, y + size), min(255, 100 + contrast), -1)
    return img


def _reference_orb(gray: np.ndarray, cfg: OrbConfig):
    """What cv2's ORB itself returns, strongest first, ties by (y, x), as the module documents."""
    kps, d = cfg.create().detectAndCompute(gray, None)
    order = sorted(range(len(kps)), key=lambda i: (-kps[i].response, kps[i].pt[1], kps[i].pt[0]))
    return kps, d, order


@pytest.mark.parametrize("squares, size, n_keypoints", [(1, 6, 10), (1, 8, 16), (2, 12, 32)])
def test_few_keypoints_are_padded_and_masked(squares: int, size: int, n_keypoints: int) -> None:
    """Catches: padding with garbage or repeated keypoints instead of zeros, a mask that marks all
    n (or none) as present, keypoints not front-packed, and a wrong order (not strongest first,
    ties by (y, x)) or wrong geometry for the k that exist."""
    cfg = OrbConfig(n_keypoints=n_keypoints)
    gray = _few_corner_image(squares, size)
    kps, d, order = _reference_orb(gray, cfg)
    k = len(kps)
    assert 0 < k < n_keypoints, k  # precondition: some, but fewer than n
    h, w = gray.shape
    for image in (gray, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)):
        desc, geom, mask = extract_orb(image, cfg)
        assert desc.shape == (n_keypoints, 32) and geom.shape == (n_keypoints, 4) and mask.shape == (n_keypoints,)
        np.testing.assert_array_equal(mask, np.arange(n_keypoints) < k)
        assert not desc[k:].any() and not geom[k:].any()
        np.testing.assert_array_equal(desc[:k], d[order])
        ref_geom = np.array([[kps[i].pt[0] / w, kps[i].pt[1] / h, kps[i].size / max(h, w),
                              (kps[i].angle % 360.0) / 360.0] for i in order], np.float32)
        np.testing.assert_allclose(geom[:k], ref_geom, rtol=0, atol=1e-6)
        assert (geom[:k, 0] > 0).all() and (geom[:k, 1] > 0).all()


class _FakeOrb:
    """An ORB stand-in returning fixed keypoints: pins the documented order (response desc, then y, x)."""

    def __init__(self, kps, desc):
        self.kps, self.desc = kps, desc

    def detectAndCompute(self, gray, mask):  # noqa: N802 - cv2's name
        return list(self.kps), self.desc.copy()


def test_tied_responses_are_ordered_by_y_then_x() -> None:
    """Catches: ordering by response alone (a stable sort keeps detection order, an unstable one
    is arbitrary), ties broken by (x, y) instead of (y, x), or the weakest kept first."""
    # (x, y, response) in detection order; expected order: 3 (0.9), then the 0.5 ties by y then x
    pts = [(80.0, 70.0, 0.5), (60.0, 70.0, 0.5), (90.0, 40.0, 0.5), (50.0, 50.0, 0.9), (40.0, 60.0, 0.1)]
    kps = [cv2.KeyPoint(x, y, 31.0, 10.0 * i, r) for i, (x, y, r) in enumerate(pts)]
    d = np.arange(len(pts), dtype=np.uint8)[:, None].repeat(32, axis=1) + 1  # row i holds i + 1
    gray = np.full((128, 128), 100, np.uint8)
    desc, geom, mask = extract_orb(gray, OrbConfig(n_keypoints=8), orb=_FakeOrb(kps, d))
    np.testing.assert_array_equal(desc[:, 0], [4, 3, 2, 1, 5, 0, 0, 0])
    np.testing.assert_array_equal(mask, [True] * 5 + [False] * 3)
    np.testing.assert_allclose(geom[:5, 0] * 128, [50, 90, 60, 80, 40], atol=1e-4)
    # n smaller than k: the strongest n in that order
    desc3, _, mask3 = extract_orb(gray, OrbConfig(n_keypoints=3), orb=_FakeOrb(kps, d))
    np.testing.assert_array_equal(desc3[:, 0], [4, 3, 2])
    assert mask3.all()


@pytest.mark.parametrize("n_keypoints", [10, 32])
def test_image_without_keypoints_is_all_zero(n_keypoints: int) -> None:
    """Catches: crashing on ORB's None descriptors, or leaving uninitialised (np.empty) rows."""
    gray = _few_corner_image(0)
    assert len(OrbConfig(n_keypoints=n_keypoints).create().detect(gray, None)) == 0  # precondition
    desc, geom, mask = extract_orb(gray, OrbConfig(n_keypoints=n_keypoints))
    assert desc.shape == (n_keypoints, 32) and desc.dtype == np.uint8 and not desc.any()
    assert geom.shape == (n_keypoints, 4) and geom.dtype == np.float32 and not geom.any()
    assert mask.shape == (n_keypoints,) and mask.dtype == bool and not mask.any()


# ------------------------------------------------------------------ 5. fov = 1.0 is valid input


@pytest.fixture()
def small_root(tmp_path: Path) -> Path:
    root = tmp_path / "city"
    make_dataset(root, n_streets=2, per_street=4, queries_per_street=3, **TINY)
    return root


def _write_gt_raw(root: Path, sim: np.ndarray, fov: np.ndarray) -> Path:
    """gt.h5 written with h5py directly (float64 fov, exactly the values given)."""
    path = root / "gt.h5"
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("sim", data=np.asarray(sim, np.uint8))
        f.create_dataset("fov", data=np.asarray(fov, np.float64))
    return path


def test_fov_exactly_one_is_valid(small_root: Path) -> None:
    """Catches: an off-by-one range check (fov < 1 or fov >= 1 refused) or a cast that turns
    1.0 into something else; identical views have fov exactly 1."""
    ds = read_dataset(small_root, check="none")
    fov = ds.fov.astype(np.float64)
    sim = ds.sim.copy()
    fov[0, :] = 1.0
    fov[1, 0] = 0.0
    sim[0, :] = True
    _write_gt_raw(small_root, sim, fov)
    back = read_dataset(small_root)  # full image check too
    assert back.fov.dtype == np.float32
    assert (back.fov[0] == 1.0).all() and back.fov[1, 0] == 0.0
    np.testing.assert_array_equal(back.fov, fov.astype(np.float32))
    np.testing.assert_array_equal(back.sim, sim)


@pytest.mark.parametrize("bad", [1.0000001, -0.1, 1.5])
def test_fov_just_outside_unit_range_is_refused_naming_the_file(small_root: Path, bad: float) -> None:
    """Catches: a tolerant check (np.isclose / rounding) letting 1.0000001 through, a check of
    only one side, or an error message that does not say which file is wrong."""
    ds = read_dataset(small_root, check="none")
    fov = ds.fov.astype(np.float64)
    fov[1, 2] = bad
    path = _write_gt_raw(small_root, ds.sim, fov)
    with pytest.raises(DatasetError) as info:
        read_dataset(small_root, check="none")
    msg = str(info.value)
    assert str(path.resolve()) in msg
    assert re.search(r"fov must lie in \[0, 1\]", msg), msg
