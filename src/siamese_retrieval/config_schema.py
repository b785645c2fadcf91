"""Typed configs: every user-facing knob of train / eval / retrieve, checked right after composition.

`check_config(cfg, task)` walks one declarative table (`RULES`) over the composed config and raises
`ConfigError` with ONE line for the first bad value, e.g.

    model.batch_size=abc: must be an integer >= 1
    top_ks=[0]: every entry must be an integer >= 1
    data.pairs.preset='x': must be one of study, default, light

It returns the warnings (strings) of the values that work but probably are not meant, e.g.

    trainer.max_epochs=-1: training never ends by itself (endless); stop it with Ctrl-C or set trainer.max_epochs

The message is `<dotted key>=<value>: <what it must be>`. The value is shown as typed: bare for
numeric, bool and list rules (`abc`, `1x`, `[0]`), Python-quoted for string / choice / path rules
(`'x'`), `null` for None, `true` / `false` for booleans.

Semantics of the table:
  * A key that is absent, or whose interpolation cannot be resolved (e.g. `data.batch_size:
    ${model.batch_size}` in evaluate.py without model=NAME), or whose parent is null / not chosen
    (`logger=none`, no `rerank=`, `data.synth: null`), is skipped: only values that exist are checked.
  * bool is not an integer; an integer is accepted where a number (float) is expected; a string that
    looks like a number is still a string (Hydra already turned `1e-3` into a float, so `abc`, `1x`
    stay strings and are wrong types). NaN and +-inf are not numbers here.
  * null is accepted only where the config documents it (`nullable=True`).
  * Unknown keys are not this module's business: Hydra's struct mode rejects them.

Decisions:
  * trainer.max_epochs (and model.max_epochs, its default) is an integer >= -1: -1 is Lightning's
    "no epoch limit" and warns (unless trainer.max_steps or trainer.max_time bounds the run);
    0 is allowed (Lightning fits nothing: validation/test score the untrained model) and warns when
    `train=true`.
  * seed / data.synth.seed are in [0, 2**32 - 1] (numpy's and Lightning's seed range).

Only the standard library, omegaconf and `siamese_retrieval.errors` are imported: the check runs in
well under a second, before torch is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from siamese_retrieval.errors import ConfigError

__all__ = ["RULES", "CROSS_CHECKS", "WARNINGS", "Rule", "SYNTH_PRESETS", "TASKS", "check_config"]

TASKS: tuple[str, ...] = ("train", "eval", "retrieve")
ALL = frozenset(TASKS)
TRAIN = frozenset({"train"})
EVAL = frozenset({"eval"})
RETRIEVE = frozenset({"retrieve"})
EVAL_RETRIEVE = frozenset({"eval", "retrieve"})

# Read from src/siamese_retrieval/data/synth/config.py (PRESETS), not imported: the synth package pulls
# in numpy / cv2. tests/test_bad_configs.py compares this with the real PRESETS.
SYNTH_PRESETS: tuple[str, ...] = ("default", "tiny", "large")
# Lightning 2.x's _PRECISION_INPUT (lightning_fabric/plugins/precision/precision.py): ints and strings.
PRECISIONS: tuple[Any, ...] = (
    64, 32, 16, "64", "32", "16", "bf16",
    "64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "transformer-engine", "transformer-engine-float16",
)


# Kinds of value.
INT, FLOAT, BOOL, STR, CHOICE, PATH = "int", "float", "bool", "str", "choice", "path"
INTS, FLOATS, STRS = "list-of-int", "list-of-float", "list-of-str"
DEVICES = "devices"  # Lightning's Trainer(devices=): 'auto', -1, an int >= 1, "0,1", or a list of indices
BATCHES = "batches"  # Lightning's limit_*_batches: an int >= 0 (batches) or a float in [0, 1] (a fraction)


@dataclass(frozen=True)
class Rule:
    """One knob: its dotted key, its kind of value and range, the tasks whose config holds it."""

    key: str
    kind: str
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    choices: tuple[Any, ...] = ()  # CHOICE: the allowed values (type-exact: 32 and "32" differ)
    nullable: bool = False  # null documented as meaningful
    non_empty: bool = False  # lists: at least one entry
    length: int | None = None  # lists: exactly this many entries
    tasks: frozenset[str] = ALL
    note: str = ""


R = Rule
AUG_STRENGTH = dict(kind=FLOAT, ge=0, lt=1)  # a jitter of +- this fraction
PROB = dict(kind=FLOAT, ge=0, le=1)


def train_views_rules(node: str) -> tuple[Rule, ...]:
    """The training-only city's knobs (data/train_views.py, conf/data/synth_views.yaml) under `<node>.train_views`
    (null: no such city, nothing checked); train_views.py refuses the same values that reach it another way."""
    key = f"{node}.train_views"
    return (
        R(f"{key}.preset", CHOICE, choices=SYNTH_PRESETS, note="the street and camera layout of its streets"),
        R(f"{key}.n_streets", INT, ge=1, note="streets of the training-only city"),
        R(f"{key}.queries_per_street", INT, ge=1, note="query views per street"),
        R(f"{key}.first_street", INT, ge=0, nullable=True, note="null: right after the evaluation city's streets"),
        R(f"{key}.seed", INT, ge=0, le=2**32 - 1, note="absent: the evaluation city's seed"),
    )


# The order is the order of the checks: a value is reported before the ones interpolated from it
# (model.batch_size before data.batch_size, model.max_epochs before trainer.max_epochs).
RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- top level
    R("seed", INT, ge=0, le=2**32 - 1, note="python/numpy/torch seed (numpy's range)"),
    R("train", BOOL, tasks=TRAIN, note="fit before testing"),
    R("test", BOOL, tasks=TRAIN, note="test the best checkpoint after training"),
    R("ckpt_path", PATH, nullable=True, note="train: resume from it ('last': last.ckpt); eval/retrieve: required"),
    R("experiment_name", STR, nullable=True, tasks=TRAIN, note="W&B group of a study"),
    R("tags", STRS, tasks=TRAIN, note="extra W&B tags (quote numbers: tags=['2024'])"),
    R("optimized_metric", STR, tasks=TRAIN, note="returned to sweepers"),
    R("imports", STRS, note="the user's modules to import first (their components register themselves)"),
    R("trust.allow", STRS, note="classes a checkpoint may name beyond the registered components (trust.py)"),
    # ---------------------------------------------------------------- model (train; eval/retrieve with model=NAME)
    R("model.name", STR),
    R("model.batch_size", INT, ge=1, note="pairs per batch"),
    R("model.max_epochs", INT, ge=-1, note="the model's recipe; trainer.max_epochs defaults to it"),
    R("model.pairs_preset", CHOICE, choices=("study", "default", "light"), note="data.pairs.preset defaults to it"),
    R("model.batches", CHOICE, choices=("pairs", "places"), note="data.batches defaults to it"),
    R("model.places.P", INT, ge=2, note="places per P x K batch; data.places.P defaults to it"),
    R("model.places.K", INT, ge=2, note="views per place, the anchor query included"),
    R("model.places.min_fov", FLOAT, gt=0, le=1, note="a database image is a view of the place at fov >= this"),
    R("model.places.lookalike", CHOICE, choices=("embedding",), nullable=True, note="null: random places"),
    *train_views_rules("model"),  # the model's training-only city; data.train_views defaults to it (data=synth)
    R("model.backbone", STR, note="backbone_snn: resnet18|34|50|101 (models/backbone.py) or timm:<name>"),
    R("model.weights", PATH, nullable=True, note="backbone_snn: a local state dict; null: random init"),
    R("model.stages", INT, ge=1, le=4, note="backbone_snn: residual stages kept"),
    R("model.freeze_stages", INT, ge=0, le=5, note="backbone_snn: stem + N-1 stages frozen"),
    R("model.inputs.n_keypoints", INT, ge=1, note="keypoint_snn: ORB keypoints per image"),
    R("model.inputs.height", INT, ge=8, note="cnn_snn: image height (5 pooling stages)"),
    R("model.inputs.width", INT, ge=8, note="cnn_snn: image width"),
    R("model.inputs.workers", INT, ge=1, note="decoding / extraction threads"),
    R("model.inputs.augment.enabled", BOOL, note="augment: null disables it all"),
    R("model.inputs.augment.brightness", **AUG_STRENGTH),
    R("model.inputs.augment.contrast", **AUG_STRENGTH),
    R("model.inputs.augment.saturation", **AUG_STRENGTH),
    R("model.inputs.augment.color_cast", **AUG_STRENGTH),
    R("model.inputs.augment.gamma", FLOAT, ge=0),
    R("model.inputs.augment.photometric_p", **PROB),
    R("model.inputs.augment.grayscale_p", **PROB),
    R("model.inputs.augment.noise_std", FLOAT, ge=0),
    R("model.inputs.augment.noise_p", **PROB),
    R("model.inputs.augment.translate", FLOAT, ge=0),
    R("model.inputs.augment.scale", **AUG_STRENGTH),
    R("model.inputs.augment.geometric_p", **PROB),
    R("model.module.encoder.n_keypoints", INT, ge=1),
    R("model.module.encoder.hidden", INTS, ge=1, note="keypoint MLP layer widths"),
    R("model.module.encoder.embedding_dim", INT, ge=1),
    R("model.module.encoder.activation_name", CHOICE, choices=("sigmoid", "relu", "tanh", "gelu")),
    R("model.module.encoder.final_activation", CHOICE, choices=("sigmoid", "relu", "tanh", "gelu"), nullable=True),
    R("model.module.encoder.dropout", FLOAT, ge=0, lt=1),
    R("model.module.encoder.l2", FLOAT, ge=0),
    R("model.module.encoder.descriptor_encoding", CHOICE, choices=("bytes", "bits")),
    R("model.module.encoder.use_geometry", BOOL),
    R("model.module.encoder.in_channels", INT, ge=1),
    R("model.module.encoder.widths", INTS, ge=1, non_empty=True, note="CNN channels per stage"),
    R("model.module.encoder.blocks_per_stage", INT, ge=1),
    R("model.module.encoder.gem_p", FLOAT, gt=0),
    R("model.module.encoder.gem_learnable", BOOL),
    R("model.module.encoder.normalize", BOOL),
    R("model.module.encoder.input_norm", CHOICE, choices=("fixed", "per_image"), note="models/cnn.py INPUT_NORMS"),
    R("model.module.encoder.channels_last", BOOL, note="NHWC convolutions: a speed choice, same numbers"),
    R("model.module.encoder.aggregation.project", BOOL, note="false: no projection to embedding_dim"),
    R("model.module.encoder.aggregation.clusters", INT, ge=1, note="netvlad: K clusters"),
    R("model.module.encoder.aggregation.channels", INT, ge=1, note="convap: 1x1 conv output channels"),
    R("model.module.encoder.aggregation.pool", INTS, ge=1, length=2, note="convap: s1 x s2 cells; mixvpr: its grid"),
    R("model.module.encoder.aggregation.rows", INT, ge=1, note="mixvpr / boq: output rows"),
    R("model.module.encoder.aggregation.depth", INT, ge=1, note="mixvpr: Feature-Mixer blocks"),
    R("model.module.encoder.aggregation.mlp_ratio", FLOAT, gt=0, note="mixvpr: mixer hidden / positions"),
    R("model.module.encoder.aggregation.queries", INT, ge=1, note="boq: learned queries per block"),
    R("model.module.encoder.aggregation.layers", INT, ge=1, note="boq: blocks"),
    R("model.module.encoder.aggregation.cluster_dim", INT, ge=1, note="salad: feature size per cluster"),
    R("model.module.encoder.aggregation.token_dim", INT, ge=1, note="salad: global token size"),
    R("model.module.encoder.whiten_dim", INT, ge=1, nullable=True, note="PCA-whitening dims; null: off"),
    # keypoint_set (models/keypoint_set.py, data/inputs.py KeypointSetInputs)
    R("model.inputs.n_features", INT, ge=1, note="keypoint_set: ORB candidates, >= n_keypoints (CROSS_CHECKS)"),
    R("model.inputs.image_scale", FLOAT, gt=0, note="keypoint_set: resize before detection"),
    R("model.inputs.scale_factor", FLOAT, gt=1, note="ORB pyramid scale between levels"),
    R("model.inputs.n_levels", INT, ge=1, note="ORB pyramid levels"),
    R("model.inputs.fast_threshold", INT, ge=0),
    R("model.inputs.keypoint_dropout", FLOAT, ge=0, lt=1, note="train-time keypoint dropout"),
    R("model.inputs.xy_jitter", FLOAT, ge=0),
    R("model.module.encoder.d_model", INT, ge=1, note="keypoint_set: token width"),
    R("model.module.encoder.token_hidden", INT, ge=1, nullable=True, note="null: 2 * d_model"),
    R("model.module.encoder.pos_frequencies", INT, ge=0, note="0: keypoint position unused"),
    R("model.module.encoder.n_layers", INT, ge=0, le=8, note="masked self-attention blocks"),
    R("model.module.encoder.n_heads", INT, ge=1, note="divides d_model (CROSS_CHECKS)"),
    R("model.module.encoder.ff_mult", INT, ge=1),
    R("model.module.encoder.pooling.queries", INT, ge=1, note="attention: learned queries"),
    R("model.module.encoder.pooling.clusters", INT, ge=1, note="netvlad: K clusters"),
    R("model.module.encoder.pooling.gem_p", FLOAT, gt=0),
    R("model.module.encoder.pooling.gem_learnable", BOOL),
    R("model.module.encoder.pooling.dim", INT, ge=1, nullable=True, note="gem: feature width; null: d_model"),
    R("model.module.encoder.inference_chunk", INT, ge=1, nullable=True, note="sets per pass without gradients"),
    R("model.module.distance", CHOICE, choices=("euclidean", "cosine")),
    R("model.module.head.init_weight", FLOAT),
    R("model.module.head.init_bias", FLOAT),
    R("model.module.loss.margin", FLOAT, gt=0),
    R("model.module.loss.terms.embedding.margin", FLOAT, gt=0, nullable=True),
    R("model.module.loss.terms.embedding.base_loss.margin", FLOAT, gt=0),
    R("model.module.loss.terms.embedding.k", INT, ge=1, note="hardest in-batch negatives per query"),
    R("model.module.loss.terms.embedding.weight", FLOAT, ge=0),
    R("model.module.loss.terms.head.detach_distance", BOOL),
    R("model.module.loss.weights.embedding", FLOAT, ge=0),
    R("model.module.loss.weights.head", FLOAT, ge=0),
    R("model.module.loss.terms.ms.alpha", FLOAT, gt=0, note="multi-similarity (models/metric_losses.py)"),
    R("model.module.loss.terms.ms.beta", FLOAT, gt=0),
    R("model.module.loss.terms.ms.base", FLOAT),
    R("model.module.loss.terms.ms.miner_epsilon", FLOAT, ge=0, nullable=True, note="null: no mining"),
    R("model.module.loss.weights.ms", FLOAT, ge=0),
    R("model.module.optimizer.lr", FLOAT, gt=0),
    R("model.module.optimizer.weight_decay", FLOAT, ge=0),
    R("model.module.scheduler.T_max", INT, ge=1, nullable=True, note="null: trainer.max_epochs"),
    R("model.module.scheduler.interval", CHOICE, choices=("epoch", "step")),
    R("model.module.range_margin", FLOAT, gt=0),
    # ---------------------------------------------------------------- data
    R("data.name", STR),
    R("data.root", PATH, nullable=True, note="null: the synthetic city"),
    R("data.synth.preset", CHOICE, choices=SYNTH_PRESETS),
    R("data.synth.seed", INT, ge=0, le=2**32 - 1),
    *train_views_rules("data"),
    R("data.files.database_json", PATH),
    R("data.files.query_json", PATH),
    R("data.files.gt_h5", PATH, nullable=True, note="null: gt.h5 or the single <name>_gt.h5"),
    R("data.image_check", CHOICE, choices=("decode", "exists", "none")),
    R("data.max_image_pixels", INT, ge=1, note="width x height above which an image is refused, never decoded"),
    R("data.follow_symlinks_outside_root", BOOL),
    R("data.layout_options.split", CHOICE, choices=("train", "val", "test"), note="vpr_folder: images/<split>/"),
    R("data.layout_options.radius_m", FLOAT, gt=0, note="positives within this many metres"),
    R("data.layout_options.train_radius_m", FLOAT, gt=0, nullable=True, note="training positives (null: radius_m)"),
    R("data.layout_options.max_heading_deg", FLOAT, ge=0, le=180, nullable=True, note="null: heading ignored"),
    R("data.layout_options.city", STR, nullable=True, note="msls_official: null = the only city"),
    R("data.layout_options.exclude_panos", BOOL),
    R("data.layout_options.cities", STRS, nullable=True, note="gsv_cities: null = every Dataframes/<City>.csv"),
    R("data.layout_options.min_images_per_place", INT, ge=2, note="gsv_cities: smaller places left out"),
    R("data.split.fractions", FLOATS, ge=0, length=3, note="train / val / test; they sum to 1 (CROSS_CHECKS)"),
    R("data.split.cell_size_m", FLOAT, gt=0),
    R("data.split.seed", INT, ge=0, le=2**32 - 1, nullable=True, note="null: the run's seed"),
    R("data.pairs.preset", CHOICE, choices=("study", "default", "light")),
    R("data.pairs.target", CHOICE, choices=("sim", "fov")),
    R("data.batches", CHOICE, choices=("pairs", "places"), note="training batches (data/place_batches.py)"),
    R("data.places.P", INT, ge=2),
    R("data.places.K", INT, ge=2),
    R("data.places.min_fov", FLOAT, gt=0, le=1),
    R("data.places.lookalike", CHOICE, choices=("embedding",), nullable=True),
    R("data.batch_size", INT, ge=1),
    R("data.eval_batch_size", INT, ge=1),
    R("data.seed", INT, ge=0, le=2**32 - 1),
    # ---------------------------------------------------------------- trainer (train)
    R("trainer.max_epochs", INT, ge=-1, tasks=TRAIN, note="-1: endless (warns); 0: no training (warns)"),
    R("trainer.min_epochs", INT, ge=0, nullable=True, tasks=TRAIN),
    R("trainer.max_steps", INT, ge=-1, tasks=TRAIN),
    R("trainer.min_steps", INT, ge=0, nullable=True, tasks=TRAIN),
    R("trainer.limit_train_batches", BATCHES, tasks=TRAIN),
    R("trainer.limit_val_batches", BATCHES, tasks=TRAIN),
    R("trainer.limit_test_batches", BATCHES, tasks=TRAIN),
    R("trainer.limit_predict_batches", BATCHES, tasks=TRAIN),
    R("trainer.accelerator", CHOICE, choices=("cpu", "gpu", "cuda", "mps", "tpu", "auto"), tasks=TRAIN),
    R("trainer.devices", DEVICES, tasks=TRAIN),
    R("trainer.num_nodes", INT, ge=1, tasks=TRAIN),
    R("trainer.strategy", STR, tasks=TRAIN, note="auto | ddp | ddp_spawn | ... (Lightning's registry)"),
    R("trainer.sync_batchnorm", BOOL, tasks=TRAIN),
    R("trainer.precision", CHOICE, choices=PRECISIONS, tasks=TRAIN),
    R("trainer.check_val_every_n_epoch", INT, ge=1, tasks=TRAIN),
    R("trainer.log_every_n_steps", INT, ge=0, tasks=TRAIN, note="0: no step logging"),
    R("trainer.num_sanity_val_steps", INT, ge=-1, tasks=TRAIN, note="-1: the whole val set"),
    R("trainer.deterministic", BOOL, tasks=TRAIN),
    R("trainer.enable_model_summary", BOOL, tasks=TRAIN),
    R("trainer.default_root_dir", PATH, tasks=TRAIN),
    # ---------------------------------------------------------------- callbacks (train)
    R("callbacks.retrieval_metrics.top_ks", INTS, ge=1, non_empty=True, tasks=TRAIN),
    R("callbacks.retrieval_metrics.ndcg_k", INT, ge=1, tasks=TRAIN),
    R("callbacks.retrieval_metrics.keep_top", INT, ge=1, tasks=TRAIN),
    R("callbacks.retrieval_metrics.query_chunk", INT, ge=1, tasks=TRAIN),
    R("callbacks.retrieval_metrics.search_k", INT, ge=1, nullable=True, tasks=TRAIN, note="null: full ranking"),
    R("callbacks.retrieval_metrics.embed_batch", INT, ge=1, tasks=TRAIN),
    R("callbacks.retrieval_examples.n_queries", INT, ge=1, tasks=TRAIN),
    R("callbacks.retrieval_examples.top_k", INT, ge=1, tasks=TRAIN),
    R("callbacks.retrieval_examples.seed", INT, ge=0, le=2**32 - 1, tasks=TRAIN),
    R("callbacks.model_checkpoint.monitor", STR, nullable=True, tasks=TRAIN),
    R("callbacks.model_checkpoint.mode", CHOICE, choices=("min", "max"), tasks=TRAIN),
    R("callbacks.model_checkpoint.save_last", BOOL, tasks=TRAIN),
    R("callbacks.model_checkpoint.save_top_k", INT, ge=-1, tasks=TRAIN, note="-1: every epoch"),
    # ---------------------------------------------------------------- logger (train; absent with logger=none)
    R("logger.wandb.project", STR, tasks=TRAIN),
    R("logger.wandb.name", STR, nullable=True, tasks=TRAIN),
    R("logger.wandb.group", STR, nullable=True, tasks=TRAIN),
    R("logger.wandb.log_model", CHOICE, choices=(False, True, "best", "all"), tasks=TRAIN,
      note="best: the kept checkpoints at the end of training; all: every checkpoint"),
    # ---------------------------------------------------------------- index (all three)
    R("index.kind", CHOICE, choices=("flat", "ivf", "ivfpq", "factory"), note="factory: set by index.factory"),
    R("index.nlist", INT, ge=1, nullable=True, note="null: ~4 sqrt(n)"),
    R("index.nprobe", INT, ge=1),
    R("index.pq_m", INT, ge=1),
    R("index.pq_bits", INT, ge=1),
    R("index.use_gpu", BOOL),
    R("index.factory", STR, nullable=True, note="a faiss.index_factory string; null: `kind` decides"),
    R("index.k_factor", INT, ge=1, note="Refine shortlist: k x k_factor candidates re-ranked exactly"),
    R("index.tune", BOOL),
    R("index.target_recall", FLOAT, gt=0, le=1, note="recall@10 agreement with exact search that tune aims for"),
    # ---------------------------------------------------------------- evaluate.py
    R("method", CHOICE, choices=("model", "orb_ransac", "orb_bow"), tasks=EVAL),
    R("fit_only", BOOL, tasks=EVAL, note="fit the rerank= re-ranker and stop"),
    R("benchmarks", STRS, tasks=frozenset({"train", "eval"}), note="NAME:ROOT entries, each evaluated with split=all"),
    R("benchmark_monitor", STR, nullable=True, tasks=TRAIN, note="a benchmark validated on every epoch"),
    R("split", CHOICE, choices=("test", "val", "train", "all"), tasks=EVAL),
    R("device", CHOICE, choices=("auto", "cpu", "cuda"), tasks=EVAL_RETRIEVE),
    R("top_ks", INTS, ge=1, non_empty=True, tasks=EVAL, note="precision@k / recall@k"),
    R("ndcg_k", INT, ge=1, tasks=EVAL),
    R("search_k", INT, ge=1, nullable=True, tasks=EVAL, note="null: full ranking; K: streaming top-K metrics"),
    R("embed_batch", INT, ge=1, tasks=EVAL_RETRIEVE),
    R("rerank.top_n", INT, ge=1, tasks=EVAL, note="candidates verified geometrically"),
    R("rerank.min_inliers", INT, ge=1, tasks=EVAL, note="inliers for a verified candidate"),
    R("rerank.saturate", INT, ge=1, nullable=True, tasks=EVAL, note="null: = min_inliers"),
    R("rerank.outlier_z", FLOAT, ge=0, tasks=EVAL, note="robust spreads above the query's median inliers"),
    R("rerank.skip_margin", FLOAT, ge=0, nullable=True, tasks=EVAL, note="null: verify every query"),
    # rerank=learned_matches (retrieval/learned_matches.py; conf/rerank/learned_matches.yaml)
    R("rerank.combine", CHOICE, choices=("replace", "fused"), tasks=EVAL,
      note="replace: the verifier's order | fused: FusedReranker over soft inlier counts"),
    R("rerank.model_weight", FLOAT, ge=0, tasks=EVAL, note="verifier score + this x the model's relevance"),
    R("rerank.workers", INT, ge=1, tasks=EVAL),
    R("rerank.features.n_features", INT, ge=2, tasks=EVAL),
    R("rerank.features.fast_threshold", INT, ge=1, tasks=EVAL),
    R("rerank.features.min_side", INT, ge=1, tasks=EVAL, note="<= rerank.features.max_side"),
    R("rerank.features.max_side", INT, ge=1, tasks=EVAL),
    R("rerank.matching.ratio", FLOAT, gt=0, le=1, tasks=EVAL, note="Lowe's ratio test"),
    R("rerank.matching.mutual", BOOL, tasks=EVAL),
    R("rerank.matching.max_matches", INT, ge=1, tasks=EVAL),
    R("rerank.network.hidden", INT, ge=1, tasks=EVAL),
    R("rerank.network.blocks", INT, ge=0, tasks=EVAL),
    R("rerank.network.pool", CHOICE, choices=("inliers", "learned"), tasks=EVAL),
    R("rerank.train.seed", INT, ge=0, le=2**32 - 1, tasks=EVAL),
    R("rerank.train.positives", INT, ge=0, tasks=EVAL),
    R("rerank.train.partial", INT, ge=0, tasks=EVAL),
    R("rerank.train.lookalikes", INT, ge=0, tasks=EVAL),
    R("rerank.train.labels", CHOICE, choices=("ransac", "ransac_relevant"), tasks=EVAL),
    R("rerank.train.ransac_threshold", FLOAT, gt=0, tasks=EVAL),
    R("rerank.train.min_matches", INT, ge=4, tasks=EVAL, note="a homography needs 4"),
    R("rerank.train.epochs", INT, ge=1, tasks=EVAL),
    R("rerank.train.batch_pairs", INT, ge=1, tasks=EVAL),
    R("rerank.train.lr", FLOAT, gt=0, tasks=EVAL),
    R("rerank.train.weight_decay", FLOAT, ge=0, tasks=EVAL),
    R("rerank.train.match_loss", FLOAT, ge=0, tasks=EVAL),
    R("rerank.train.pair_loss", FLOAT, ge=0, tasks=EVAL),
    R("rerank.train.max_seconds", FLOAT, gt=0, tasks=EVAL),
    R("orb_ransac.n_features", INT, ge=1, tasks=EVAL),
    R("orb_ransac.ratio", FLOAT, gt=0, le=1, tasks=EVAL, note="Lowe's ratio test"),
    R("orb_ransac.ransac_threshold", FLOAT, gt=0, tasks=EVAL),
    R("orb_ransac.ransac_method", CHOICE, choices=("usac", "ransac", "rho"), tasks=EVAL),
    R("orb_ransac.min_matches", INT, ge=4, tasks=EVAL, note="a homography needs 4"),
    R("orb_ransac.min_side", INT, ge=1, tasks=EVAL, note="<= max_side (CROSS_CHECKS)"),
    R("orb_ransac.max_side", INT, ge=1, tasks=EVAL),
    R("orb_ransac.workers", INT, ge=1, tasks=EVAL),
    R("orb_bow.vocabulary_size", INT, ge=2, tasks=EVAL, note="K visual words"),
    R("orb_bow.kmeans_samples", INT, ge=1, tasks=EVAL, note=">= vocabulary_size (CROSS_CHECKS)"),
    R("orb_bow.kmeans_iters", INT, ge=1, tasks=EVAL),
    R("orb_bow.weighting", CHOICE, choices=("tfidf", "tf"), tasks=EVAL, note="retrieval/orb_bow.py WEIGHTINGS"),
    R("orb_bow.power", FLOAT, gt=0, le=1, tasks=EVAL, note="tf ** power; 1: plain tf"),
    R("orb_bow.seed", INT, ge=0, le=2**32 - 1, tasks=EVAL),
    R("grid.n_queries", INT, ge=1, tasks=EVAL),
    R("grid.top_k", INT, ge=1, tasks=EVAL),
    # ---------------------------------------------------------------- retrieve.py
    R("query", PATH, nullable=True, tasks=RETRIEVE, note="an image or a folder (required)"),
    R("top_k", INT, ge=1, tasks=RETRIEVE, note="capped at the database size"),
    R("output", CHOICE, choices=("table", "json"), tasks=RETRIEVE),
    R("cache", BOOL, tasks=RETRIEVE),
    R("grid.max_queries", INT, ge=1, tasks=RETRIEVE),
)

_ABSENT = object()


# ---------------------------------------------------------------------------- entry point
def check_config(cfg: DictConfig, task: str | None = None) -> list[str]:
    """Check the composed config of `task` (train | eval | retrieve; default: cfg.task_name).

    Raises ConfigError (one line) for the first bad value; returns the warnings (one line each).
    """
    task = task or str(OmegaConf.select(cfg, "task_name", default=""))
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    for rule in RULES:
        if task not in rule.tasks:
            continue
        value = _get(cfg, rule.key)
        if value is _ABSENT:
            continue
        problem = _problem(rule, value)
        if problem is not None:
            raise ConfigError(f"{rule.key}={_show(value, rule.kind)}: {problem}")
    for check in CROSS_CHECKS:
        check(cfg, task)
    _registered_choices(cfg)  # last: it imports the components (torch), after every cheap check passed
    return [w for warn in WARNINGS for w in warn(cfg, task)]


# ---------------------------------------------------------------------------- checks across keys
def _fractions_sum_to_one(cfg: DictConfig, task: str) -> None:
    fractions = _get(cfg, "data.split.fractions")
    if fractions is _ABSENT:
        return
    total = math.fsum(fractions)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"data.split.fractions={_show(fractions, FLOATS)}: must sum to 1 (train, val, test; "
                          f"they sum to {total:g})")


def _min_side_le_max_side(cfg: DictConfig, task: str) -> None:
    lo, hi = _get(cfg, "orb_ransac.min_side"), _get(cfg, "orb_ransac.max_side")
    if task == "eval" and lo is not _ABSENT and hi is not _ABSENT and lo > hi:
        raise ConfigError(f"orb_ransac.min_side={lo}: must be <= orb_ransac.max_side ({hi})")


def _kmeans_samples_ge_words(cfg: DictConfig, task: str) -> None:
    k, n = _get(cfg, "orb_bow.vocabulary_size"), _get(cfg, "orb_bow.kmeans_samples")
    if task == "eval" and _is_int(k) and _is_int(n) and n < k:
        raise ConfigError(f"orb_bow.kmeans_samples={n}: must be >= orb_bow.vocabulary_size ({k})")


def _monitor_exists_when_streaming(cfg: DictConfig, task: str) -> None:
    """Streaming evaluation logs mAP@<search_k>, not the full ranking's mAP: a monitor of val/mAP would fail
    after the first epoch, so say which name to monitor before anything runs."""
    search_k = _get(cfg, "callbacks.retrieval_metrics.search_k")
    if task != "train" or search_k in (_ABSENT, None):
        return
    for key in ("callbacks.model_checkpoint.monitor", "callbacks.early_stopping.monitor"):
        if _get(cfg, key) == "val/mAP":
            raise ConfigError(f"{key}='val/mAP': with callbacks.retrieval_metrics.search_k={search_k} the metric is "
                              f"val/mAP@{search_k}; set {key}=val/mAP@{search_k} (or val/recall@1)")



# key -> the registry (siamese_retrieval.registry) its name must be in; a key may hold a bare name or a node
# with `name:` (`aggregation=netvlad` on the command line replaces the node by a name).
REGISTERED_CHOICES = {
    "model.module.encoder.aggregation": "AGGREGATIONS",
    "model.module.encoder.pooling": "KEYPOINT_POOLINGS",
    "data.layout": "LAYOUTS",
    "rerank": "RERANKERS",
}


def _registered_choices(cfg: DictConfig) -> None:
    for key, registry_name in REGISTERED_CHOICES.items():
        value = _get(cfg, key)
        name = value.get("name", _ABSENT) if isinstance(value, dict) else value
        if name in (_ABSENT, None):
            continue
        from siamese_retrieval import registry

        names = getattr(registry, registry_name).names()
        if name not in names:
            shown = f"{key}.name" if isinstance(value, dict) else key
            raise ConfigError(registry.unknown_choice(shown, name, names))


def _encoder_aggregation(cfg: DictConfig, task: str) -> None:
    """whiten_dim <= the projected size."""
    agg = _get(cfg, "model.module.encoder.aggregation")
    whiten, dim = _get(cfg, "model.module.encoder.whiten_dim"), _get(cfg, "model.module.encoder.embedding_dim")
    projected = not (isinstance(agg, dict) and agg.get("project") is False)
    if projected and _is_int(whiten) and _is_int(dim) and whiten > dim:
        raise ConfigError(f"model.module.encoder.whiten_dim={whiten}: must be <= model.module.encoder.embedding_dim "
                          f"({dim}), the size it whitens")


def _keypoint_set(cfg: DictConfig, task: str) -> None:
    """keypoint_set: n_features >= n_keypoints; n_heads divides d_model."""
    n_features, n_keypoints = _get(cfg, "model.inputs.n_features"), _get(cfg, "model.inputs.n_keypoints")
    if _is_int(n_features) and _is_int(n_keypoints) and n_features < n_keypoints:
        raise ConfigError(f"model.inputs.n_features={n_features}: must be >= model.inputs.n_keypoints ({n_keypoints}), "
                          f"the keypoints kept of those detected")
    d_model, heads = _get(cfg, "model.module.encoder.d_model"), _get(cfg, "model.module.encoder.n_heads")
    if _is_int(d_model) and _is_int(heads) and heads >= 1 and d_model % heads:
        raise ConfigError(f"model.module.encoder.n_heads={heads}: must divide model.module.encoder.d_model ({d_model})")


def _train_views_is_a_mapping(cfg: DictConfig, task: str) -> None:
    """`data.train_views=abc`: the node replaced by a value that is no city at all (null: none)."""
    for key in ("model.train_views", "data.train_views"):
        value = _get(cfg, key)
        if value is not _ABSENT and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}={_show(value, STR)}: must be a mapping of the training city's settings "
                              f"(preset, n_streets, queries_per_street, first_street) or null")


CROSS_CHECKS: tuple[Callable[[DictConfig, str], None], ...] = (
    _train_views_is_a_mapping, _fractions_sum_to_one, _min_side_le_max_side, _monitor_exists_when_streaming,
    _encoder_aggregation, _keypoint_set, _kmeans_samples_ge_words,
)


# ---------------------------------------------------------------------------- warnings
def _endless(cfg: DictConfig, task: str) -> Iterable[str]:
    if task != "train" or _get(cfg, "trainer.max_epochs") != -1 or _get(cfg, "train") is False:
        return
    max_steps, max_time = _get(cfg, "trainer.max_steps"), _get(cfg, "trainer.max_time")
    if max_steps not in (_ABSENT, -1, None) or max_time not in (_ABSENT, None):
        return  # bounded by steps or time
    yield ("trainer.max_epochs=-1: training never ends by itself (endless); "
           "stop it with Ctrl-C or set trainer.max_epochs")
    if _get(cfg, "model.module.scheduler.T_max") is None:  # present and null
        yield ("model.module.scheduler.T_max=null: with trainer.max_epochs=-1 the cosine schedule spans "
               "1 epoch and then restarts; set model.module.scheduler.T_max")


def _no_epochs(cfg: DictConfig, task: str) -> Iterable[str]:
    if task == "train" and _get(cfg, "trainer.max_epochs") == 0 and _get(cfg, "train") is True:
        yield ("trainer.max_epochs=0: no training; validation and test score the untrained model "
               "(train=false says so explicitly)")


WARNINGS: tuple[Callable[[DictConfig, str], Iterable[str]], ...] = (_endless, _no_epochs)


# ---------------------------------------------------------------------------- one value
def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value (plain python), or _ABSENT when missing / unresolvable / under a null parent."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation (bad env var, missing node): not ours
        return _ABSENT
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _in_range(rule: Rule, v: float) -> bool:
    return ((rule.ge is None or v >= rule.ge) and (rule.gt is None or v > rule.gt)
            and (rule.le is None or v <= rule.le) and (rule.lt is None or v < rule.lt))


def _range_text(rule: Rule) -> str:
    """' >= 1', ' > 0', ' in [0, 1]', ' in (0, 1]', '' (no bound)."""
    low = ("[", rule.ge) if rule.ge is not None else ("(", rule.gt) if rule.gt is not None else None
    high = ("]", rule.le) if rule.le is not None else (")", rule.lt) if rule.lt is not None else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _scalar_ok(kind: str, rule: Rule, v: Any) -> bool:
    if kind in (INT, INTS):
        return _is_int(v) and _in_range(rule, v)
    if kind in (FLOAT, FLOATS):
        return _is_number(v) and _in_range(rule, v)
    if kind in (STR, STRS):
        return isinstance(v, str)
    raise AssertionError(kind)


_NOUN = {INTS: "integer", FLOATS: "number", STRS: "string"}
_DEVICE_STRING = re.compile(r"^\s*(auto|-1|\d+|\d+(\s*,\s*\d+)*\s*,?)\s*$")


def _problem(rule: Rule, v: Any) -> str | None:
    """None when `v` is a good value for `rule`, else what it must be."""
    if v is None:
        return None if rule.nullable else _must(rule)
    kind = rule.kind
    if kind in (INT, FLOAT, STR):
        return None if _scalar_ok(kind, rule, v) else _must(rule)
    if kind == BOOL:
        return None if isinstance(v, bool) else _must(rule)
    if kind == CHOICE:
        return None if any(type(v) is type(c) and v == c for c in rule.choices) else _must(rule)
    if kind == PATH:  # Hydra reads `query=2024` as an int: a file may be called that
        return None if isinstance(v, str) or (_is_number(v)) else _must(rule)
    if kind in (INTS, FLOATS, STRS):
        if not isinstance(v, list) or (rule.non_empty and not v) or (rule.length is not None and len(v) != rule.length):
            return _must(rule)
        if not all(_scalar_ok(kind, rule, x) for x in v):
            return f"every entry must be a{'n' if kind == INTS else ''} {_NOUN[kind]}{_range_text(rule)}"
        return None
    if kind == DEVICES:
        ok = ((_is_int(v) and (v == -1 or v >= 1))
              or (isinstance(v, str) and bool(_DEVICE_STRING.match(v)) and v.strip() != "0")
              or (isinstance(v, list) and bool(v) and all(_is_int(x) and x >= 0 for x in v)))
        return None if ok else _must(rule)
    if kind == BATCHES:
        ok = (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)
        return None if ok else _must(rule)
    raise AssertionError(f"unknown kind {kind!r} in rule {rule.key}")


def _must(rule: Rule) -> str:
    """'must be an integer >= 1', 'must be one of study, default', ... (+ ' or null' where allowed)."""
    null = " or null" if rule.nullable else ""
    kind, bounds = rule.kind, _range_text(rule)
    if kind == INT:
        return f"must be an integer{bounds}{null}"
    if kind == FLOAT:
        return f"must be a number{bounds}{null}"
    if kind == BOOL:
        return "must be true or false"
    if kind == STR:
        return f"must be a string{null}"
    if kind == PATH:
        return f"must be a path{null}"
    if kind == CHOICE:
        shown = dict.fromkeys(_show(c, INT) for c in rule.choices)  # 32 and "32" read the same when typed
        return f"must be one of {', '.join(shown)}{null}"
    if kind in (INTS, FLOATS, STRS):
        size = "a non-empty list" if rule.non_empty else f"a list of {rule.length}" if rule.length else "a list"
        noun = _NOUN[kind] + ("s" if rule.length != 1 else "")
        return f"must be {size}{'' if rule.length else ' of'} {noun}{bounds}{null}"
    if kind == DEVICES:
        return "must be auto, -1 (all), an integer >= 1 or a list of device indices such as [0, 1]"
    if kind == BATCHES:
        return "must be an integer >= 0 (batches) or a number in [0, 1] (a fraction)"
    raise AssertionError(kind)


def _show(v: Any, kind: str, quote: bool | None = None) -> str:
    """The value as the user would type it: bare where a number / list was expected, quoted otherwise."""
    if quote is None:
        quote = kind in (STR, CHOICE, PATH, DEVICES)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v) if quote or not v.isprintable() or not v else v
    if isinstance(v, list):
        text = "[" + ", ".join(_show(x, kind, quote=quote) for x in v) + "]"
    elif isinstance(v, dict):
        text = "{" + ", ".join(f"{k}: {_show(x, kind, quote=quote)}" for k, x in v.items()) + "}"
    else:
        text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
