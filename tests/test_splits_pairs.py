"""Place-disjoint query splits and per-epoch pair sampling."""

from __future__ import annotations

import numpy as np
import pytest

from siamese_retrieval.data.ground_truth import DenseRelevance
from siamese_retrieval.data.pairs import PairRecipe, PairSampler, eval_pairs
from siamese_retrieval.data.splits import place_ids, split_by_place
from siamese_retrieval.errors import ConfigError
from tests.helpers import make_dataset


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    # 12 streets 2 km apart: 12 places at cell_size 1000 m; neighbouring cameras 10 m apart
    return make_dataset(tmp_path_factory.mktemp("city"), n_streets=12, per_street=8, height=64, width=64)


@pytest.fixture(scope="module")
def splits(city):
    return split_by_place(city, (0.6, 0.2, 0.2), cell_size_m=1000.0, seed=0)


# ----------------------------------------------------------------------------------------- splits


def test_place_ids_are_grid_cells():
    loc = np.array([[0, 0, 0], [999, 999, 90], [1000, 0, 0], [-1, 0, 0], [0, -1, 0], [5e6, 5e6, 0]])
    ids = place_ids(loc, 1000.0)
    assert ids.dtype == np.int64
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 5
    with pytest.raises(ConfigError, match="cell_size_m"):
        place_ids(loc, 0)


def test_every_query_in_exactly_one_split(city, splits):
    all_q = np.concatenate([splits.train_q, splits.val_q, splits.test_q])
    np.testing.assert_array_equal(np.sort(all_q), np.arange(city.n_query))
    for arr in (splits.train_q, splits.val_q, splits.test_q, splits.train_db):
        assert arr.dtype == np.int64 and np.all(np.diff(arr) > 0)
    s = splits.summary()
    assert s["n_train_queries"] + s["n_val_queries"] + s["n_test_queries"] == city.n_query
    assert s["n_train_queries"] > s["n_test_queries"] > 0 and s["n_val_queries"] > 0


def test_no_eval_place_in_training(city, splits):
    train_places = set(splits.place_of_query[splits.train_q]) | set(splits.place_of_db[splits.train_db])
    for eval_q in (splits.val_q, splits.test_q):
        assert not set(splits.place_of_query[eval_q]) & train_places
    assert not set(splits.place_of_query[splits.val_q]) & set(splits.place_of_query[splits.test_q])
    # no training database image overlaps (fov > 0) with an evaluation query
    eval_q = np.concatenate([splits.val_q, splits.test_q])
    assert not city.fov[np.ix_(eval_q, splits.train_db)].any()


def test_border_overlap_is_excluded_from_train_db(city):
    # cells of 40 m cut every street into places; cameras near a border see across it
    s = split_by_place(city, cell_size_m=40.0, seed=3)
    eval_q = np.concatenate([s.val_q, s.test_q])
    assert not city.fov[np.ix_(eval_q, s.train_db)].any()
    assert s.summary()["n_train_db_excluded_overlap"] > 0
    loose = split_by_place(city, cell_size_m=40.0, seed=3, exclude_eval_overlap=False)
    assert len(loose.train_db) > len(s.train_db)


def test_split_is_deterministic_per_seed(city, splits):
    again = split_by_place(city, (0.6, 0.2, 0.2), cell_size_m=1000.0, seed=0)
    for name in ("train_q", "val_q", "test_q", "train_db"):
        np.testing.assert_array_equal(getattr(splits, name), getattr(again, name))
    others = [split_by_place(city, (0.6, 0.2, 0.2), 1000.0, seed=s).test_q for s in range(1, 6)]
    assert any(not np.array_equal(o, splits.test_q) for o in others)


def test_empty_split_names_the_split(tmp_path, city):
    two_places = make_dataset(tmp_path / "two", n_streets=2, per_street=3, height=64, width=64)
    with pytest.raises(ConfigError, match="split 'test' is empty.*2 place"):
        split_by_place(two_places)
    with pytest.raises(ConfigError, match="split 'val' is empty"):
        split_by_place(city, cell_size_m=1e6)  # one place for the whole city
    s = split_by_place(two_places, fractions=(0.5, 0.0, 0.5))  # val may be empty when asked
    assert len(s.val_q) == 0 and len(s.train_q) and len(s.test_q)
    with pytest.raises(ConfigError, match="fractions"):
        split_by_place(city, fractions=(0.5, 0.5))


# ----------------------------------------------------------------------------------------- pairs


def pair_set(q, d):
    return set(zip(q.tolist(), d.tolist()))


def test_study_recipe_is_balanced_and_complete(city, splits):
    sampler = PairSampler(city, splits.train_q, splits.train_db, PairRecipe.study(), seed=0)
    q, d, t = sampler.sample(0)
    assert q.dtype == d.dtype == np.int64 and t.dtype == np.float32
    assert np.isin(q, splits.train_q).all() and np.isin(d, splits.train_db).all()
    np.testing.assert_array_equal(t, city.sim[q, d].astype(np.float32))
    assert (t == 1).sum() == (t == 0).sum() > 0
    sub = city.sim[np.ix_(splits.train_q, splits.train_db)]
    qi, di = np.nonzero(sub)
    assert pair_set(q[t == 1], d[t == 1]) == pair_set(splits.train_q[qi], splits.train_db[di])
    assert len(pair_set(q, d)) == len(q)  # no duplicate pair
    for qq in np.unique(q):  # 1:1 per query, too
        assert (t[q == qq] == 1).sum() == (t[q == qq] == 0).sum()


def test_sampling_is_deterministic_per_epoch_and_varies(city, splits):
    make = lambda seed: PairSampler(city, splits.train_q, splits.train_db, PairRecipe.default(), seed)
    a, b = make(0), make(0)
    for x, y in zip(a.sample(1), b.sample(1)):
        np.testing.assert_array_equal(x, y)
    assert pair_set(*a.sample(1)[:2]) != pair_set(*a.sample(2)[:2])
    assert pair_set(*a.sample(1)[:2]) != pair_set(*make(1).sample(1)[:2])


def test_soft_and_hard_negatives_respect_fov(city, splits):
    soft = PairSampler(city, splits.train_q, splits.train_db, PairRecipe(0, 3, 0, target="fov"))
    q, d, t = soft.sample(0)
    assert len(q) and ((t > 0) & (t < 0.5)).all() and not city.sim[q, d].any()
    assert np.bincount(q).max() <= 3
    np.testing.assert_array_equal(t, city.fov[q, d])
    hard = PairSampler(city, splits.train_q, splits.train_db, PairRecipe(0, 0, 5, target="fov"))
    q, d, t = hard.sample(0)
    assert np.bincount(q)[splits.train_q].tolist() == [5] * len(splits.train_q)
    assert (t == 0).all() and not city.sim[q, d].any()
    mixed = PairSampler(city, splits.train_q, splits.train_db, PairRecipe.default(target="fov"))
    q, d, t = mixed.sample(0)
    pos = city.sim[q, d]
    assert (t[pos] >= 0.5).all() and (t[~pos] < 0.5).all()
    assert 0 < pos.sum() <= 4 * len(splits.train_q)


def test_impossible_recipes_raise(city, splits):
    no_pos = np.zeros_like(city.sim)
    with pytest.raises(ConfigError, match="impossible pair recipe"):
        PairSampler(DenseRelevance(no_pos, np.zeros_like(city.fov)), splits.train_q, splits.train_db, PairRecipe.study())
    all_pos = np.ones_like(city.sim)
    with pytest.raises(ConfigError, match="impossible pair recipe: no negative"):
        PairSampler(DenseRelevance(all_pos, np.ones_like(city.fov)), splits.train_q, splits.train_db, PairRecipe.default())
    with pytest.raises(ConfigError, match=r"^data.pairs.positives_per_query=0: the recipe asks for no pairs at all$"):
        PairRecipe(0, 0, 0)
    with pytest.raises(ConfigError, match=r"^data.pairs.target='distance': must be one of sim, fov$"):
        PairRecipe(target="distance")
    # a recipe with only soft negatives is possible on this city, one with only hard ones too
    PairSampler(city, splits.train_q, splits.train_db, PairRecipe(0, 1, 0))


def test_eval_pairs_fixed_and_balanced_over_full_database(city, splits):
    q, d, t = eval_pairs(city, splits.test_q, seed=0)
    q2, d2, t2 = eval_pairs(city, splits.test_q, seed=0)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(d, d2)
    assert np.isin(q, splits.test_q).all()
    assert (t == 1).sum() == (t == 0).sum() == city.sim[splits.test_q].sum()
    empty = eval_pairs(DenseRelevance(np.zeros_like(city.sim), city.fov), splits.test_q)
    assert all(len(a) == 0 for a in empty)


def test_presets_take_overrides(city, splits):
    assert PairRecipe.study(target="fov") == PairRecipe(-1, 0, 0, target="fov", balance=True)
    assert PairRecipe.default(hard_negatives_per_query=1).hard_negatives_per_query == 1
    assert PairRecipe.from_config({"preset": "study"}) == PairRecipe.study()
    # cnn_snn's recipe: what its 3-seed numbers were measured with (default + 2/1/2 per query)
    assert PairRecipe.from_config({"preset": "light"}) == PairRecipe.default(
        positives_per_query=2, soft_negatives_per_query=1, hard_negatives_per_query=2)
    with pytest.raises(ConfigError, match="balance"):
        PairRecipe.study(soft_negatives_per_query=2)
    with pytest.raises(ConfigError, match="preset"):
        PairRecipe.from_config({"preset": "nope"})
    q, d, t = eval_pairs(city, splits.val_q, PairRecipe.study(target="fov"), seed=1,
                         db_idx=splits.train_db)
    assert np.isin(d, splits.train_db).all()
    np.testing.assert_array_equal(t, city.fov[q, d])
    assert eval_pairs(city, np.zeros(0, np.int64))[0].shape == (0,)
