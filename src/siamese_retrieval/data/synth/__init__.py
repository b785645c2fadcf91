"""The embedded default dataset: a deterministic synthetic street-level city.

Streets are corridors of procedurally painted facades (archetypes repeat across the city, so
look-alike places are the hard negatives), seen by forward-looking pinhole cameras; queries are
taken at other positions, headings and "times" than the database. `fov` is the IoU of the facade
stretches two cameras see; `sim = fov >= 0.5`. Output follows the dataset contract.

    cfg = SynthConfig.from_preset("default", seed=1)
    root = ensure_city("data_cache", cfg)      # cache_dir/synth-<hash>, generated once
"""

from siamese_retrieval.data.synth.config import PRESETS, SynthConfig
from siamese_retrieval.data.synth.generate import ensure_city, generate_city
from siamese_retrieval.data.synth.geometry import Camera, fov_matrix, visibility_masks, world_loc
from siamese_retrieval.data.synth.preview import write_contact_sheet

__all__ = [
    "PRESETS",
    "Camera",
    "SynthConfig",
    "ensure_city",
    "fov_matrix",
    "generate_city",
    "visibility_masks",
    "world_loc",
    "write_contact_sheet",
]
