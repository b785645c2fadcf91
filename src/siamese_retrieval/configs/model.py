"""The `model` group's schema (conf/model/*.yaml): one dataclass per node, the union of every shipped model's
knobs (a knob a model does not have is simply absent from its config and not checked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from siamese_retrieval.configs.fields import Built, Getter, is_int, knob, node
from siamese_retrieval.errors import ConfigError

SEED_RANGE = dict(ge=0, le=2**32 - 1)  # numpy's and Lightning's seed range
SYNTH_PRESETS = "siamese_retrieval.data.synth.config:PRESETS"  # read there, after the cheap checks
PAIR_PRESETS = ("study", "default", "light")
BATCHES = ("pairs", "places")
ACTIVATIONS = "siamese_retrieval.models.keypoint_mlp:ACTIVATIONS"  # read there, after the cheap checks
AUG_STRENGTH = dict(ge=0, lt=1)  # a jitter of +- this fraction
PROB = dict(ge=0, le=1)


@dataclass
class PlaceBatches:
    """P x K place batches (data/place_batches.py)."""

    P: int = knob("places per P x K batch", ge=2)
    K: int = knob("views per place, the anchor query included", ge=2)
    min_fov: float = knob("a database image is a view of the place at fov >= this", gt=0, le=1)
    lookalike: Optional[str] = knob("null: random places", choices=("embedding",))
    scan: int = knob("how many places (x P) a batch looks at before it is closed as it is", ge=1)


@dataclass
class TrainViews:
    """The training-only city (data/train_views.py, conf/data/synth_views.yaml)."""

    preset: str = knob("the street and camera layout of its streets", choices_from=SYNTH_PRESETS)
    n_streets: int = knob("streets of the training-only city", ge=1)
    queries_per_street: int = knob("query views per street", ge=1)
    first_street: Optional[int] = knob("null: right after the evaluation city's streets", ge=0)
    seed: int = knob("absent: the evaluation city's seed", **SEED_RANGE)


TRAIN_VIEWS_NOTE = "the training city's settings (preset, n_streets, queries_per_street, first_street)"


@dataclass
class Augment:
    """Training-time image augmentation (data/inputs.py ImageAugment); the node null disables it all."""

    enabled: bool = knob()
    brightness: float = knob(**AUG_STRENGTH)
    contrast: float = knob(**AUG_STRENGTH)
    saturation: float = knob(**AUG_STRENGTH)
    color_cast: float = knob(**AUG_STRENGTH)
    gamma: float = knob(ge=0)
    photometric_p: float = knob(**PROB)
    grayscale_p: float = knob(**PROB)
    noise_std: float = knob(ge=0)
    noise_p: float = knob(**PROB)
    translate: float = knob(ge=0)
    scale: float = knob(**AUG_STRENGTH)
    geometric_p: float = knob(**PROB)


@dataclass
class Inputs(Built):
    """What the model reads (data/inputs.py): keypoints, images or keypoint sets."""

    n_keypoints: int = knob("keypoint models: ORB keypoints per image", ge=1)
    height: int = knob("image models: image height", ge=8)
    width: int = knob("image models: image width", ge=8)
    workers: int = knob("decoding / extraction threads", ge=1)
    augment: Optional[Augment] = node()
    n_features: int = knob("keypoint_set: ORB candidates, >= n_keypoints", ge=1)
    image_scale: float = knob("keypoint_set: resize before detection", gt=0)
    scale_factor: float = knob("ORB pyramid scale between levels", gt=1)
    n_levels: int = knob("ORB pyramid levels", ge=1)
    fast_threshold: int = knob(ge=0)
    edge_threshold: int = knob("ORB's border without features (px)", ge=0)
    patch_size: int = knob("ORB's descriptor patch (px)", ge=2)
    max_side: int = knob("larger images are downscaled to this side first", ge=8)
    keypoint_dropout: float = knob("train-time keypoint dropout", ge=0, lt=1)
    xy_jitter: float = knob(ge=0)

    @staticmethod
    def check(get: Getter, at: str) -> None:
        n_features, n_keypoints = get("n_features"), get("n_keypoints")
        if is_int(n_features) and is_int(n_keypoints) and n_features < n_keypoints:
            raise ConfigError(f"{at}n_features={n_features}: must be >= {at}n_keypoints ({n_keypoints}), "
                              f"the keypoints kept of those detected")


@dataclass
class Aggregation:
    """An image encoder's aggregation head (models/aggregation.py, models/vpr_heads.py)."""

    name: str = knob("gem | netvlad | convap | mixvpr | boq | salad (registry AGGREGATIONS)")
    project: bool = knob("false: no projection to embedding_dim")
    clusters: int = knob("netvlad: K clusters", ge=1)
    channels: int = knob("convap: 1x1 conv output channels", ge=1)
    pool: List[int] = knob("convap: s1 x s2 cells; mixvpr: its grid", ge=1, length=2)
    rows: int = knob("mixvpr / boq: output rows", ge=1)
    depth: int = knob("mixvpr: Feature-Mixer blocks", ge=1)
    mlp_ratio: float = knob("mixvpr: mixer hidden / positions", gt=0)
    queries: int = knob("boq: learned queries per block", ge=1)
    layers: int = knob("boq: blocks", ge=1)
    cluster_dim: int = knob("salad: feature size per cluster", ge=1)
    token_dim: int = knob("salad: global token size", ge=1)


@dataclass
class KeypointPooling:
    """keypoint_set's pooling of its tokens (models/keypoint_set.py)."""

    name: str = knob("registry KEYPOINT_POOLINGS")
    queries: int = knob("attention: learned queries", ge=1)
    clusters: int = knob("netvlad: K clusters", ge=1)
    gem_p: float = knob(gt=0)
    gem_learnable: bool = knob()
    dim: Optional[int] = knob("gem: feature width; null: d_model", ge=1)


@dataclass
class BackboneKnobs:
    """backbone_snn's knobs, set at the top of its yaml (model.*) and interpolated into its encoder."""

    backbone: str = knob("backbone_snn: resnet18|34|50|101 (models/backbone.py) or timm:<name>")
    weights: Optional[str] = knob("backbone_snn: a local state dict; null: random init", kind="path")
    stages: int = knob("backbone_snn: residual stages kept", ge=1, le=4)
    freeze_stages: int = knob("backbone_snn: stem + N-1 stages frozen", ge=0, le=5)


@dataclass
class Encoder(BackboneKnobs, Built):
    """The encoder of any shipped model: keypoint MLP, plain CNN / backbone, keypoint set."""

    n_keypoints: int = knob(ge=1)
    hidden: List[int] = knob("keypoint MLP layer widths", ge=1)
    embedding_dim: int = knob(ge=1)
    activation_name: str = knob(choices_from=ACTIVATIONS)
    final_activation: Optional[str] = knob(choices_from=ACTIVATIONS)
    dropout: float = knob(ge=0, lt=1)
    l2: float = knob(ge=0)
    descriptor_encoding: str = knob(choices=("bytes", "bits"))
    use_geometry: bool = knob()
    in_channels: int = knob(ge=1)
    widths: List[int] = knob("CNN channels per stage", ge=1, non_empty=True)
    blocks_per_stage: int = knob(ge=1)
    gem_p: float = knob(gt=0)
    gem_learnable: bool = knob()
    normalize: bool = knob()
    input_norm: str = knob("models/cnn.py: ImageNet constants or per-image statistics", choices=("fixed", "per_image"))
    channels_last: bool = knob("NHWC convolutions: a speed choice, same numbers")
    aggregation: Optional[Aggregation] = node(registry="AGGREGATIONS")
    whiten_dim: Optional[int] = knob("PCA-whitening dims, <= embedding_dim; null: off", ge=1)
    d_model: int = knob("keypoint_set: token width", ge=1)
    token_hidden: Optional[int] = knob("null: 2 * d_model", ge=1)
    pos_frequencies: int = knob("0: keypoint position unused", ge=0)
    n_layers: int = knob("masked self-attention blocks", ge=0, le=8)
    n_heads: int = knob("divides d_model", ge=1)
    ff_mult: int = knob(ge=1)
    pooling: Optional[KeypointPooling] = node(registry="KEYPOINT_POOLINGS")
    inference_chunk: Optional[int] = knob("sets per pass without gradients", ge=1)

    @staticmethod
    def check(get: Getter, at: str) -> None:
        agg, whiten, dim = get("aggregation"), get("whiten_dim"), get("embedding_dim")
        projected = not (isinstance(agg, dict) and agg.get("project") is False)
        if projected and is_int(whiten) and is_int(dim) and whiten > dim:
            raise ConfigError(f"{at}whiten_dim={whiten}: must be <= {at}embedding_dim ({dim}), the size it whitens")
        stages, frozen = get("stages"), get("freeze_stages")
        if is_int(stages) and is_int(frozen) and frozen > stages + 1:
            raise ConfigError(f"{at}freeze_stages={frozen}: must be <= {stages + 1} (the stem + {at}stages={stages})")
        d_model, heads = get("d_model"), get("n_heads")
        if is_int(d_model) and is_int(heads) and heads >= 1 and d_model % heads:
            raise ConfigError(f"{at}n_heads={heads}: must divide {at}d_model ({d_model})")


@dataclass
class PairHead:
    init_weight: float = knob()
    init_bias: float = knob()


@dataclass
class BaseLoss(Built):
    margin: float = knob(gt=0)


@dataclass
class EmbeddingTerm(Built):
    margin: Optional[float] = knob(gt=0)
    base_loss: Optional[BaseLoss] = node()
    k: int = knob("hardest in-batch negatives per query", ge=1)
    weight: float = knob(ge=0)


@dataclass
class HeadTerm(Built):
    detach_distance: bool = knob()


@dataclass
class MultiSimilarityTerm(Built):
    """models/metric_losses.py."""

    alpha: float = knob(gt=0)
    beta: float = knob(gt=0)
    base: float = knob()
    miner_epsilon: Optional[float] = knob("null: no mining", ge=0)


@dataclass
class LossTerms:
    embedding: Optional[EmbeddingTerm] = node()
    head: Optional[HeadTerm] = node()
    ms: Optional[MultiSimilarityTerm] = node()


@dataclass
class LossWeights:
    embedding: float = knob(ge=0)
    head: float = knob(ge=0)
    ms: float = knob(ge=0)


@dataclass
class Loss(Built):
    margin: float = knob(gt=0)
    terms: Optional[LossTerms] = node()
    weights: Optional[LossWeights] = node()


@dataclass
class Optimizer(Built):
    _partial_: bool = knob("true: the SiameseModule passes the parameters")
    lr: float = knob(gt=0)
    weight_decay: float = knob(ge=0)


@dataclass
class Scheduler(Built):
    T_max: Optional[int] = knob("null: trainer.max_epochs", ge=1)
    interval: str = knob(choices=("epoch", "step"))


@dataclass
class Module(Built):
    """The SiameseModule's arguments (models/siamese.py)."""

    model_name: str = knob("the model's name, saved in the checkpoint")
    inputs: Optional[Dict[str, Any]] = knob("the model's inputs node, saved in the checkpoint")
    encoder: Optional[Encoder] = node()
    distance: str = knob(choices=("euclidean", "cosine"))
    head: Optional[PairHead] = node()
    loss: Optional[Loss] = node()
    optimizer: Optional[Optimizer] = node()
    scheduler: Optional[Scheduler] = node()
    range_margin: float = knob(gt=0)


@dataclass
class Model(BackboneKnobs):
    """conf/model/<name>.yaml."""

    name: str = knob()
    batch_size: int = knob("pairs per batch", ge=1)
    max_epochs: int = knob("the model's recipe; trainer.max_epochs defaults to it", ge=-1)
    pairs_preset: str = knob("data.pairs.preset defaults to it", choices=PAIR_PRESETS)
    batches: str = knob("data.batches defaults to it", choices=BATCHES)
    places: Optional[PlaceBatches] = node()
    train_views: Optional[TrainViews] = node(TRAIN_VIEWS_NOTE)
    inputs: Optional[Inputs] = node()
    module: Optional[Module] = node()

