"""The `data` group's schema (conf/data/*.yaml): the synthetic city and the on-disk layouts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from siamese_retrieval.configs.fields import ABSENT, FLOATS, Built, Getter, knob, node, show
from siamese_retrieval.configs.model import (
    BATCHES, PAIR_PRESETS, SEED_RANGE, SYNTH_PRESETS, TRAIN_VIEWS_NOTE, PlaceBatches, TrainViews,
)
from siamese_retrieval.errors import ConfigError


@dataclass
class Synth:
    """The embedded synthetic city (data/synth/config.py)."""

    preset: str = knob(choices_from=SYNTH_PRESETS)
    seed: int = knob(**SEED_RANGE)


@dataclass
class Files:
    """The contract layout's file names (data/dataset.py)."""

    database_json: str = knob(kind="path")
    query_json: str = knob(kind="path")
    gt_h5: Optional[str] = knob("null: gt.h5 or the single <name>_gt.h5", kind="path")


@dataclass
class LayoutOptions:
    """Options of the layout readers (data/layouts.py, data/gsv_cities.py)."""

    split: str = knob("vpr_folder: images/<split>/", choices=("train", "val", "test"))
    radius_m: float = knob("positives within this many metres", gt=0)
    train_radius_m: Optional[float] = knob("training positives (null: radius_m)", gt=0)
    max_heading_deg: Optional[float] = knob("null: heading ignored", ge=0, le=180)
    city: Optional[str] = knob("msls_official: null = the only city")
    exclude_panos: bool = knob()
    cities: Optional[List[str]] = knob("gsv_cities: null = every Dataframes/<City>.csv")
    min_images_per_place: int = knob("gsv_cities: smaller places left out", ge=2)


@dataclass
class Split:
    """The place split (data/splits.py)."""

    fractions: List[float] = knob("train / val / test; they sum to 1", ge=0, length=3)
    cell_size_m: float = knob(gt=0)
    seed: Optional[int] = knob("null: the run's seed", **SEED_RANGE)

    @staticmethod
    def check(get: Getter, at: str) -> None:
        fractions = get("fractions")
        if fractions is ABSENT:
            return
        total = math.fsum(fractions)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"{at}fractions={show(fractions, FLOATS)}: must sum to 1 (train, val, test; "
                              f"they sum to {total:g})")
        if fractions[0] == 0 or fractions[2] == 0:
            raise ConfigError(f"{at}fractions={show(fractions, FLOATS)}: train and test need a fraction > 0")


@dataclass
class Pairs:
    """Pair sampling (data/pairs.py)."""

    preset: str = knob(choices=PAIR_PRESETS)
    target: str = knob(choices=("sim", "fov"))
    positives_per_query: int = knob("the preset's count overridden; -1: all", ge=-1)
    soft_negatives_per_query: int = knob("overlapping views below soft_max_fov; -1: all", ge=-1)
    hard_negatives_per_query: int = knob("look-alike views (fov 0); -1: all", ge=-1)
    soft_max_fov: float = knob("a soft negative overlaps the query by less than this", gt=0, le=1)
    balance: bool = knob("one random negative per positive (the study's recipe)")

    @staticmethod
    def check(get: Getter, at: str) -> None:
        counts = [get(f"{kind}_per_query") for kind in ("positives", "soft_negatives", "hard_negatives")]
        if ABSENT in counts or get("balance") is ABSENT:
            return
        positives, soft, hard = counts
        if get("balance") and (soft or hard):
            raise ConfigError(f"{at}balance=true: it draws its own negatives; set {at}soft_negatives_per_query and "
                              f"{at}hard_negatives_per_query to 0")
        if not (positives or soft or hard or get("balance")):
            raise ConfigError(f"{at}positives_per_query=0: the recipe asks for no pairs at all")


@dataclass
class Data(Built):
    """conf/data/<name>.yaml: the LightningDataModule's arguments."""

    name: str = knob()
    root: Optional[str] = knob("null: the synthetic city", kind="path")
    cache_dir: str = knob("generated cities, features and indexes", kind="path")
    synth: Optional[Synth] = node()
    train_views: Optional[TrainViews] = node(TRAIN_VIEWS_NOTE)
    files: Optional[Files] = node()
    image_check: str = knob(choices=("decode", "exists", "none"))
    max_image_pixels: int = knob("width x height above which an image is refused, never decoded", ge=1)
    follow_symlinks_outside_root: bool = knob()
    layout: str = knob("how the folder is laid out", registry="LAYOUTS")
    layout_options: Optional[LayoutOptions] = node()
    split: Optional[Split] = node()
    pairs: Optional[Pairs] = node()
    batches: str = knob("training batches (data/place_batches.py)", choices=BATCHES)
    places: Optional[PlaceBatches] = node()
    batch_size: int = knob(ge=1)
    eval_batch_size: int = knob(ge=1)
    seed: int = knob(**SEED_RANGE)
