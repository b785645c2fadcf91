"""Training views from the generator (data.train_views): a training-only city of the same seed on other
streets. No val/test place can be rendered into it, its pairs join training, evaluation is unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.splits import place_ids
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.data.synth.generate import city_dir
from siamese_retrieval.data.train_views import check_no_shared_places, views_config
from siamese_retrieval.errors import ConfigError
from tests.conftest import compose_config

TINY = SynthConfig.from_preset("tiny")
VIEWS = {"preset": "tiny", "n_streets": 2, "queries_per_street": 6}


def test_the_training_city_starts_after_the_evaluation_city() -> None:
    city = views_config(VIEWS, TINY)
    assert list(city.streets) == [4, 5] and city.seed == TINY.seed
    assert list(views_config({**VIEWS, "first_street": 9}, TINY).streets) == [9, 10]
    other_seed = views_config({**VIEWS, "seed": 7, "first_street": 0}, TINY)  # another city: nothing shared
    assert list(other_seed.streets) == [0, 1]


def test_a_training_city_on_an_evaluation_street_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"streets 3\.\.4 of seed 0 include the evaluation city's streets 0\.\.3 "
                                          r"\(1 shared\).*first_street >= 4"):
        views_config({**VIEWS, "first_street": 3}, TINY)
    check_no_shared_places(TINY, SynthConfig.from_preset("tiny", first_street=4))  # adjacent: fine


def test_existing_city_caches_keep_their_folder() -> None:
    # first_street was added later; cities that do not set it keep the folder (and the rendering) they had
    assert city_dir(".", TINY).name == "synth-ff27e47361e3c91f"


def _image_digests(root: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*/images/*.jpg"))}


def test_no_evaluation_place_is_rendered_into_the_training_city(cache_dir: Path) -> None:
    eval_root = ensure_city(cache_dir, TINY, workers=1)
    views_root = ensure_city(cache_dir, views_config(VIEWS, TINY), workers=1)
    assert views_root != eval_root
    cams = json.loads((views_root / "synth_config.json").read_text())
    streets = {int(c[0]) for c in cams["database_cameras"] + cams["query_cameras"]}
    assert streets == {4, 5} and not streets & set(TINY.streets)
    eval_ds, views_ds = read_dataset(eval_root, check="none"), read_dataset(views_root, check="none")
    eval_places = set(place_ids(np.vstack([eval_ds.db_loc, eval_ds.q_loc]), 1000.0).tolist())
    views_places = set(place_ids(np.vstack([views_ds.db_loc, views_ds.q_loc]), 1000.0).tolist())
    assert not eval_places & views_places  # every training-city image lies in a place of its own
    assert not _image_digests(eval_root) & _image_digests(views_root)
    # the same seed: the same architecture (facade archetypes), so look-alikes still span both cities
    assert json.loads((eval_root / "synth_config.json").read_text())["seed"] == cams["seed"]


def test_training_pairs_use_the_training_city_and_only_train_places(cache_dir: Path) -> None:
    from siamese_retrieval.data.datamodule import RetrievalDataModule
    from siamese_retrieval.data.inputs import KeypointInputs

    dm = RetrievalDataModule(KeypointInputs(n_keypoints=10), synth={"preset": "tiny"}, image_check="none",
                             batch_size=16, cache_dir=str(cache_dir), train_views=VIEWS,
                             split={"fractions": [0.5, 0.25, 0.25], "seed": 0})
    dm.prepare_data()
    dm.setup()
    n_q, n_db = dm.dataset.n_query, dm.dataset.n_db
    q, d, _ = dm.sampler.sample(0)
    views_q, views_db = q[q >= n_q] - n_q, d[d >= n_db] - n_db
    assert len(views_q) and len(views_db)  # the training city contributes pairs
    assert set(q[q < n_q]) <= set(dm.splits.train_q.tolist())  # never a val/test query of the evaluation city
    assert set(d[d < n_db]) <= set(dm.splits.train_db.tolist())
    sim, _ = dm.train_source.truth.lookup(q, d[:, None])
    assert not (sim[:, 0] & ((q < n_q) != (d < n_db))).any()  # no positive across the two cities
    batch = next(iter(dm.train_dataloader()))
    assert batch["q"]["desc"].shape[0] == batch["d"]["desc"].shape[0] == batch["cross_fov"].shape[0]
    # evaluation is untouched: the evaluation city's tensors and split only
    assert len(dm.q_inputs["desc"]) == n_q and len(dm.db_inputs["desc"]) == n_db
    assert dm.train_source.q_inputs["desc"].shape[0] == dm.train_source.truth.n_query == n_q + 2 * 6


def test_train_py_with_training_views(tmp_path: Path, cache_dir: Path) -> None:
    from siamese_retrieval.train import train

    cfg = compose_config("train", ["data=synth_tiny", "data.train_views={preset: tiny, n_streets: 2, "
                                   "queries_per_street: 6}", "trainer=cpu", "trainer.max_epochs=1",
                                   "+trainer.limit_train_batches=3", "logger=none"], tmp_path, cache_dir)
    result = train(cfg)
    assert 0.0 <= result["metrics"]["test/recall@1"] <= 1.0
    assert Path(result["checkpoint"]).is_file()


def test_an_empty_data_synth_is_the_default_city_whose_streets_stay_out_of_training() -> None:
    """`data.synth={}` renders the default city (resolve_root): the training city must start after its streets
    too, not at street 0 of the same seed, where the val/test places are."""
    from siamese_retrieval.data.datamodule import RetrievalDataModule
    from siamese_retrieval.data.inputs import NoInputs

    default = SynthConfig.from_preset("default")
    dm = RetrievalDataModule(NoInputs(), synth={}, train_views=VIEWS)
    assert dm._eval_city() == default
    views = views_config(dm.train_views, dm._eval_city())
    assert views.first_street == default.first_street + default.n_streets and views.seed == default.seed
