"""Every parameter of the synthetic city, in one frozen dataclass (its hash names the cache)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the deterministic synthetic street-level city.

    Street frame: each street runs along its local x axis from 0 to `street_length_m`; the left
    wall stands at y = +width / 2, the right wall at y = -width / 2, z is up; each street has its
    own width (`street_width_m` +- `street_width_jitter_m`, see geometry.street_width).
    Street s is placed in world coordinates with its centre at (east, north) =
    (street_spacing_m / 2, s * street_spacing_m + street_spacing_m / 2), running east, so a
    location cell of `street_spacing_m` holds exactly one street.
    """

    seed: int = 0
    # ---- city layout
    n_streets: int = 16
    first_street: int = 0  # the city's streets are first_street .. first_street + n_streets - 1 (see `streets`)
    street_length_m: float = 120.0
    street_width_m: float = 12.0  # mean wall-to-wall width
    street_width_jitter_m: float = 3.0  # each street's width is mean +- this (uniform, per street)
    sidewalk_m: float = 2.0
    wall_height_m: float = 24.0  # height of the facade strips (tallest building + sky margin)
    street_spacing_m: float = 1000.0
    # ---- facades
    n_archetypes: int = 16
    archetype_zipf: float = 0.6  # archetype frequency ~ 1 / rank**zipf (some look-alikes are common)
    building_width_m: tuple[float, float] = (8.0, 25.0)
    pixels_per_m: float = 14.0
    ground_pixels_per_m: float = 10.0
    instance_variation: float = 1.0  # strength of per-building deviation from its archetype
    unique_sign_prob: float = 0.3  # signs with per-instance text (a weak unique cue)
    # ---- cameras
    camera_height_m: float = 1.6
    image_width: int = 256
    image_height: int = 192
    hfov_deg: float = 85.0
    near_m: float = 0.5
    max_depth_m: float = 30.0  # facade visible for `fov` up to this camera depth
    render_depth_m: float = 90.0  # facades are drawn up to this depth
    db_spacing_m: float = 4.0
    db_lane_m: float = 2.0  # database cars drive on the right: y = -lane heading +x, +lane heading -x
    db_lateral_jitter_m: float = 0.3
    db_yaw_jitter_deg: float = 3.0
    queries_per_street: int = 25
    query_lateral_max_m: float = 3.5  # never closer than 1 m to a wall either
    query_lane_jitter_m: float = 1.2  # lateral offset from the database's driving line
    query_other_lane_prob: float = 0.25
    query_yaw_jitter_deg: float = 15.0  # heading jitter ~ N(0, (this / 2)^2) clipped at +-this
    # ---- ground truth
    fov_grid_m: float = 0.25
    sim_threshold: float = 0.5
    # ---- appearance ("times")
    db_appearance: float = 0.25  # strength of the database's mild day-to-day variation
    query_appearance: float = 1.0  # strength of the query conditions below
    query_conditions: tuple[tuple[str, float], ...] = (
        ("sunny", 0.25),
        ("overcast", 0.25),
        ("dusk", 0.15),
        ("night", 0.15),
        ("fog", 0.1),
        ("rain", 0.1),
    )
    occluder_prob: float = 0.6
    blur_prob: float = 0.35
    noise_std: float = 4.0
    jpeg_quality: int = 90  # database
    query_jpeg_quality: tuple[int, int] = (45, 90)

    @classmethod
    def from_preset(cls, name: str = "default", **overrides) -> "SynthConfig":
        """A named preset, with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown synthetic-city preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown SynthConfig field(s): {', '.join(unknown)}")
        cfg = replace(cls(), **PRESETS[name])
        overrides = {k: tuple(map(tuple, v)) if k == "query_conditions" else (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}
        return replace(cfg, **overrides)

    @property
    def streets(self) -> range:
        """The street ids of this city. A street is painted from (seed, street id) alone and placed by its id, so
        two cities of one seed share streets exactly where these ranges meet: a city with first_street past
        another's last street (same seed) holds none of its places, only its architecture (the archetypes)."""
        return range(self.first_street, self.first_street + self.n_streets)

    @property
    def n_database(self) -> int:
        return 2 * len(db_positions(self)) * self.n_streets

    @property
    def n_query(self) -> int:
        return self.queries_per_street * self.n_streets


def db_positions(cfg: SynthConfig) -> list[float]:
    """Database positions along each street (both headings are shot at each)."""
    n = max(1, int(cfg.street_length_m // cfg.db_spacing_m))
    return [(i + 0.5) * cfg.db_spacing_m for i in range(n)]


PRESETS: dict[str, dict] = {
    # ~960 database images, 400 queries, 256x192
    "default": {},
    # ~120 database images, 40 queries, 128x96: for tests
    "tiny": {
        "n_streets": 4,
        "street_length_m": 60.0,
        "queries_per_street": 10,
        "image_width": 128,
        "image_height": 96,
        "n_archetypes": 6,
        "render_depth_m": 60.0,
    },
    # ~71k database images, ~29.6k queries (100,640 images), 256x192: real-size runs (sparse gt.h5, memory-
    # mapped caches). 296 streets of 480 m, rendered street by street in parallel worker processes.
    "large": {
        "n_streets": 296,
        "street_length_m": 480.0,
        "queries_per_street": 100,
    },
}
