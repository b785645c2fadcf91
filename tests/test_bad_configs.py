"""Typed configs (siamese_retrieval.configs): one table of (task, overrides, expected error line).

Each case composes the task's config in-process, as the entry point would see it, and runs
`check_config`: None expects no error and no warning, a string the exact one-line ConfigError message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from siamese_retrieval.configs import SCHEMAS, check_config, task_rules
from siamese_retrieval.errors import ConfigError
from tests.conftest import ROOT, compose_config

CONFIG_NAME = {"train": "train", "eval": "eval", "retrieve": "retrieve"}
HEAVY = ("torch", "numpy", "pytorch_lightning", "lightning_fabric", "cv2", "faiss")

CASES: list[tuple[str, list[str], str | None]] = [
    # ------------------------------------------------------------ valid: README defaults and presets
    ("train", [], None),
    ("train", ["model=cnn_snn"], None),
    ("train", ["debug=fast"], None),
    ("train", ["experiment=keypoint_vs_cnn"], None),
    ("train", ["experiment=keypoint_count"], None),
    ("train", ["experiment=large_city"], None),
    ("train", ["experiment=large_city", "model=keypoint_snn"], None),
    ("train", ["hparams_search=optuna_cnn"], None),
    ("train", ["data=msls_city", "data.root=/x"], None),
    ("train", ["index=ivfpq"], None),
    ("train", ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], None),
    ("train", ["trainer=ddp_spawn", "logger=none"], None),
    ("train", ["trainer=gpu", "trainer.precision=bf16-mixed", "trainer.devices=[0,1]"], None),
    ("train", ["trainer.precision=16", "trainer.devices=auto"], None),
    ("train", ["trainer.max_epochs=0", "train=false"], None),
    ("train", ["debug=fast", "trainer.limit_train_batches=0.25", "+trainer.limit_val_batches=0"], None),
    ("train", ["model.module.optimizer.lr=1"], None),  # an int where a number is expected
    ("train", ["model=cnn_snn", "model.inputs.augment=null", "model.module.scheduler.T_max=20"], None),
    ("train", ["model=keypoint_snn", "model.module.scheduler=null", "data.split.seed=null"], None),
    ("train", ["ckpt_path=last", "tags=[a,b]"], None),
    ("train", ["logger.wandb.log_model=all", "trainer.max_epochs=-1", "train=false"], None),
    ("eval", [], None),
    ("eval", ["rerank=orb_ransac"], None),
    ("eval", ["ckpt_path=x.ckpt", "rerank=orb_ransac", "rerank.top_n=20", "model=cnn_snn", "index=ivfpq"], None),
    ("eval", ["method=orb_ransac", "split=all", "device=cpu", "top_ks=[1]"], None),
    ("eval", ["data=vpr_folder", "data.root=/x", "data.layout_options.split=val"], None),
    ("eval", ["data=msls_official", "data.root=/x", "data.layout_options.city=london"], None),
    ("eval", ["data=vpr_folder", "data.root=/x", "data.layout_options.radius_m=0"],
     "data.layout_options.radius_m=0: must be a number > 0"),
    ("eval", ["data=msls_official", "data.root=/x", "data.layout=tiles"],
     "data.layout='tiles': must be one of contract, vpr_folder, msls_official, gsv_cities; a component registered "
     "by your own module loads with imports=[your_module]"),
    ("eval", ["data=msls_city", "data.root=/x", "split=val"], None),
    ("retrieve", [], None),
    ("retrieve", ["ckpt_path=x.ckpt", "query=photo.jpg", "top_k=10", "output=json", "cache=false"], None),
    ("retrieve", ["query=2024", "data=msls_city", "data.root=/x", "index=ivf"], None),  # a file named 2024
    # ------------------------------------------------------------ train: top level
    ("train", ["model.batch_size=abc"], "model.batch_size=abc: must be an integer >= 1"),
    ("train", ["model.batch_size=0"], "model.batch_size=0: must be an integer >= 1"),
    ("train", ["model=cnn_snn", "model.batch_size=1x"], "model.batch_size=1x: must be an integer >= 1"),
    ("train", ["model.batch_size=true"], "model.batch_size=true: must be an integer >= 1"),
    ("train", ["model.batch_size=2.5"], "model.batch_size=2.5: must be an integer >= 1"),
    ("train", ["seed=x"], "seed=x: must be an integer in [0, 4294967295]"),
    ("train", ["seed=-1"], "seed=-1: must be an integer in [0, 4294967295]"),
    ("train", ["train=yes"], "train=yes: must be true or false"),
    ("train", ["test=1"], "test=1: must be true or false"),
    ("train", ["tags=[1]"], "tags=[1]: every entry must be a string"),
    ("train", ["ckpt_path=[a]"], "ckpt_path=['a']: must be a path or null"),
    # ------------------------------------------------------------ train: trainer
    ("train", ["trainer.max_epochs=abc"], "trainer.max_epochs=abc: must be an integer >= -1"),
    ("train", ["trainer.max_epochs=-2"], "trainer.max_epochs=-2: must be an integer >= -1"),
    ("train", ["model.max_epochs=abc"], "model.max_epochs=abc: must be an integer >= -1"),
    ("train", ["trainer.max_epochs=null"], "trainer.max_epochs=null: must be an integer >= -1"),
    ("train", ["+trainer.min_epochs=-1"], "trainer.min_epochs=-1: must be an integer >= 0 or null"),
    ("train", ["+trainer.limit_val_batches=1.5"],
     "trainer.limit_val_batches=1.5: must be an integer >= 0 (batches) or a number in [0, 1] (a fraction)"),
    ("train", ["debug=fast", "trainer.limit_train_batches=-1"],
     "trainer.limit_train_batches=-1: must be an integer >= 0 (batches) or a number in [0, 1] (a fraction)"),
    ("train", ["trainer.accelerator=tpuu"],
     "trainer.accelerator='tpuu': must be one of cpu, gpu, cuda, mps, tpu, auto"),
    ("train", ["trainer.precision=8"],
     "trainer.precision=8: must be one of 64, 32, 16, bf16, 64-true, 32-true, 16-true, 16-mixed, bf16-true, "
     "bf16-mixed, transformer-engine, transformer-engine-float16"),
    ("train", ["trainer.devices=0"],
     "trainer.devices=0: must be auto, -1 (all), an integer >= 1 or a list of device indices such as [0, 1]"),
    ("train", ["trainer=ddp", "trainer.num_nodes=0"], "trainer.num_nodes=0: must be an integer >= 1"),
    ("train", ["logger.wandb.log_model=some"], "logger.wandb.log_model='some': must be one of false, true, best, all"),
    # ------------------------------------------------------------ train: model
    ("train", ["model.module.optimizer.lr=abc"], "model.module.optimizer.lr=abc: must be a number > 0"),
    ("train", ["model=cnn_snn", "model.module.optimizer.lr=abc"],
     "model.module.optimizer.lr=abc: must be a number > 0"),
    ("train", ["model.module.optimizer.lr=0"], "model.module.optimizer.lr=0: must be a number > 0"),
    ("train", ["model.module.optimizer.lr=nan"], "model.module.optimizer.lr=nan: must be a number > 0"),
    ("train", ["model=cnn_snn", "model.module.optimizer.weight_decay=-0.1"],
     "model.module.optimizer.weight_decay=-0.1: must be a number >= 0"),
    ("train", ["model.module.distance=manhattan"],
     "model.module.distance='manhattan': must be one of euclidean, cosine"),
    ("train", ["model.module.range_margin=0"], "model.module.range_margin=0: must be a number > 0"),
    ("train", ["model.inputs.n_keypoints=0"], "model.inputs.n_keypoints=0: must be an integer >= 1"),
    ("train", ["model=cnn_snn", "model.inputs.height=4"], "model.inputs.height=4: must be an integer >= 8"),
    ("train", ["model.inputs.workers=0"], "model.inputs.workers=0: must be an integer >= 1"),
    ("train", ["model=cnn_snn", "model.inputs.augment.noise_p=2"],
     "model.inputs.augment.noise_p=2: must be a number in [0, 1]"),
    ("train", ["model=cnn_snn", "model.module.scheduler.T_max=0"],
     "model.module.scheduler.T_max=0: must be an integer >= 1 or null"),
    ("train", ["model.module.encoder.dropout=1"], "model.module.encoder.dropout=1: must be a number in [0, 1)"),
    ("train", ["model=backbone_snn", "model.stages=2", "model.freeze_stages=4"],
     "model.module.encoder.freeze_stages=4: must be <= 3 (the stem + model.module.encoder.stages=2)"),
    # ------------------------------------------------------------ train: data
    ("train", ["data.pairs.preset=x"], "data.pairs.preset='x': must be one of study, default, light"),
    ("train", ["data.pairs.target=rank"], "data.pairs.target='rank': must be one of sim, fov"),
    ("train", ["data.image_check=full"], "data.image_check='full': must be one of decode, exists, none"),
    ("train", ["data.split.fractions=[0.5,0.5,0.5]"],
     "data.split.fractions=[0.5, 0.5, 0.5]: must sum to 1 (train, val, test; they sum to 1.5)"),
    ("train", ["data.split.fractions=[0.5,0.5]"], "data.split.fractions=[0.5, 0.5]: must be a list of 3 numbers >= 0"),
    ("train", ["data.split.fractions=[0,0.5,0.5]"],
     "data.split.fractions=[0, 0.5, 0.5]: train and test need a fraction > 0"),
    ("train", ["data.split.fractions=[0.5,-0.25,0.75]"],
     "data.split.fractions=[0.5, -0.25, 0.75]: every entry must be a number >= 0"),
    ("train", ["data.split.cell_size_m=0"], "data.split.cell_size_m=0: must be a number > 0"),
    ("train", ["data.split.seed=abc"], "data.split.seed=abc: must be an integer in [0, 4294967295] or null"),
    ("train", ["data.synth.preset=huge"], "data.synth.preset='huge': must be one of default, tiny, large"),
    ("train", ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    ("train", ["data.eval_batch_size=0"], "data.eval_batch_size=0: must be an integer >= 1"),
    # ------------------------------------------------------------ train: index, callbacks
    ("train", ["callbacks.retrieval_metrics.search_k=50"],
     "callbacks.model_checkpoint.monitor='val/mAP': with callbacks.retrieval_metrics.search_k=50 the metric is "
     "val/mAP@50; set callbacks.model_checkpoint.monitor=val/mAP@50 (or val/recall@1)"),
    ("train", ["callbacks.retrieval_metrics.search_k=50", "callbacks.model_checkpoint.monitor=val/mAP@50"], None),
    ("train", ["callbacks.retrieval_metrics.search_k=2", "callbacks.model_checkpoint.monitor=val/recall@1"],
     "callbacks.retrieval_metrics.search_k=2: must be >= 10, the largest of its top_ks and ndcg_k (streaming metrics "
     "are read from each query's top search_k)"),
    ("eval", ["ckpt_path=x.ckpt", "search_k=5", "top_ks=[1,20]"],
     "search_k=5: must be >= 20, the largest of its top_ks and ndcg_k (streaming metrics are read from each "
     "query's top search_k)"),
    ("train", ["index.kind=hnsw"], "index.kind='hnsw': must be one of flat, ivf, ivfpq, factory"),
    ("train", ["index=ivf", "index.nlist=0"], "index.nlist=0: must be an integer >= 1 or null"),
    ("train", ["index=ivfpq", "index.pq_bits=0"], "index.pq_bits=0: must be an integer >= 1"),
    ("train", ["callbacks.retrieval_metrics.top_ks=[]"],
     "callbacks.retrieval_metrics.top_ks=[]: must be a non-empty list of integers >= 1"),
    ("train", ["callbacks.retrieval_metrics.ndcg_k=0"],
     "callbacks.retrieval_metrics.ndcg_k=0: must be an integer >= 1"),
    ("train", ["callbacks.model_checkpoint.mode=best"],
     "callbacks.model_checkpoint.mode='best': must be one of min, max"),
    # ------------------------------------------------------------ eval
    ("eval", ["top_ks=[0]"], "top_ks=[0]: every entry must be an integer >= 1"),
    ("eval", ["top_ks=[]"], "top_ks=[]: must be a non-empty list of integers >= 1"),
    ("eval", ["top_ks=5"], "top_ks=5: must be a non-empty list of integers >= 1"),
    ("eval", ["ndcg_k=0"], "ndcg_k=0: must be an integer >= 1"),
    ("eval", ["embed_batch=abc"], "embed_batch=abc: must be an integer >= 1"),
    ("eval", ["split=everything"], "split='everything': must be one of test, val, train, all"),
    ("eval", ["method=sift"], "method='sift': must be one of model, orb_ransac, orb_bow"),
    ("eval", ["device=tpu"], "device='tpu': must be one of auto, cpu, cuda"),
    ("eval", ["rerank=orb_ransac", "rerank.top_n=0"], "rerank.top_n=0: must be an integer >= 1"),
    ("eval", ["rerank=learned_matches", "rerank.network.pool=mean"],
     "rerank.network.pool='mean': must be one of inliers, learned"),
    ("eval", ["rerank=learned_matches", "rerank.matching.ratio=0"],
     "rerank.matching.ratio=0: must be a number in (0, 1]"),
    ("eval", ["orb_ransac.ratio=1.5"], "orb_ransac.ratio=1.5: must be a number in (0, 1]"),
    ("eval", ["orb_ransac.ransac_threshold=0"], "orb_ransac.ransac_threshold=0: must be a number > 0"),
    ("eval", ["orb_ransac.ransac_method=lmeds"],
     "orb_ransac.ransac_method='lmeds': must be one of usac, ransac, rho"),
    ("eval", ["orb_ransac.min_matches=3"], "orb_ransac.min_matches=3: must be an integer >= 4"),
    ("eval", ["orb_ransac.min_side=700"], "orb_ransac.min_side=700: must be <= orb_ransac.max_side (640)"),
    ("eval", ["grid.top_k=abc"], "grid.top_k=abc: must be an integer >= 1"),
    ("eval", ["index=ivf", "index.nprobe=-1"], "index.nprobe=-1: must be an integer >= 1"),
    ("eval", ["model=cnn_snn", "model.module.optimizer.lr=abc"], "model.module.optimizer.lr=abc: must be a number > 0"),
    # ------------------------------------------------------------ retrieve
    ("retrieve", ["top_k=abc"], "top_k=abc: must be an integer >= 1"),
    ("retrieve", ["top_k=0"], "top_k=0: must be an integer >= 1"),
    ("retrieve", ["output=csv"], "output='csv': must be one of table, json"),
    ("retrieve", ["cache=maybe"], "cache=maybe: must be true or false"),
    ("retrieve", ["device=gpu"], "device='gpu': must be one of auto, cpu, cuda"),
    ("retrieve", ["grid.max_queries=0"], "grid.max_queries=0: must be an integer >= 1"),
    ("retrieve", ["query=[a,b]"], "query=['a', 'b']: must be a path or null"),
]


def _compose(task: str, overrides: list[str], tmp_path: Path, cache_dir: Path):
    return compose_config(CONFIG_NAME[task], overrides, tmp_path / "run", cache_dir)


IDS = [f"{task}:{' '.join(overrides) or 'defaults'}" for task, overrides, _ in CASES]


@pytest.mark.parametrize(("task", "overrides", "expected"), CASES, ids=IDS)
def test_config_table(task: str, overrides: list[str], expected: str | None, tmp_path: Path, cache_dir: Path) -> None:
    cfg = _compose(task, overrides, tmp_path, cache_dir)
    if expected is None:
        assert check_config(cfg, task) == []
        assert check_config(cfg) == []  # the task from cfg.task_name
    else:
        with pytest.raises(ConfigError) as info:
            check_config(cfg, task)
        assert str(info.value) == expected
        assert "\n" not in str(info.value)


def test_endless_training_warns_once(tmp_path: Path, cache_dir: Path) -> None:
    cfg = _compose("train", ["trainer.max_epochs=-1"], tmp_path, cache_dir)
    assert check_config(cfg, "train") == [
        "trainer.max_epochs=-1: training never ends by itself (endless); stop it with Ctrl-C or set trainer.max_epochs"
    ]
    # bounded by steps: no warning
    cfg = _compose("train", ["trainer.max_epochs=-1", "+trainer.max_steps=100"], tmp_path, cache_dir)
    assert check_config(cfg, "train") == []


def test_other_warnings(tmp_path: Path, cache_dir: Path) -> None:
    # cnn_snn's cosine schedule takes T_max from max_epochs: endless also says what happens to it
    cfg = _compose("train", ["model=cnn_snn", "model.max_epochs=-1"], tmp_path, cache_dir)
    warnings = check_config(cfg, "train")
    assert len(warnings) == 2 and warnings[0].startswith("trainer.max_epochs=-1: ")
    assert warnings[1].startswith("model.module.scheduler.T_max=null: ")
    cfg = _compose("train", ["trainer.max_epochs=0"], tmp_path, cache_dir)
    assert check_config(cfg, "train") == [
        "trainer.max_epochs=0: no training; validation and test score the untrained model "
        "(train=false says so explicitly)"
    ]


def test_unknown_key_is_hydras(tmp_path: Path, cache_dir: Path) -> None:
    """eval has no top_k (retrieve does): Hydra's struct mode refuses it before the schema runs."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="top_k"):
        _compose("eval", ["top_k=abc"], tmp_path, cache_dir)


def test_unknown_task() -> None:
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="task must be one of"):
        check_config(OmegaConf.create({"task_name": "predict"}))


def test_rules_are_well_formed() -> None:
    for task in SCHEMAS:
        rules = task_rules(task)
        keys = [r.key for r in rules]
        assert len(keys) == len(set(keys)), "a key has two rules"
        for r in rules:
            spec = r.spec
            assert not (spec.ge is not None and spec.gt is not None), r.key
            assert not (spec.le is not None and spec.lt is not None), r.key
            assert (r.kind == "choice") == bool(spec.choices or spec.choices_from), r.key


def test_schemas_are_hydra_structured_configs() -> None:
    """Every task root and group node is a valid structured config in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from siamese_retrieval.configs import register_schemas

    register_schemas()
    stored = ConfigStore.instance().repo["schema"]
    assert {"train.yaml", "eval.yaml", "retrieve.yaml", "model.yaml", "data.yaml", "index.yaml"} <= set(stored)
    train = OmegaConf.structured(SCHEMAS["train"])
    assert train.model is None and OmegaConf.is_missing(train, "seed")  # a schema: the yaml gives the values
    with pytest.raises(ValidationError, match="batch_size"):
        OmegaConf.merge(stored["model.yaml"].node, {"batch_size": "abc"})  # typed at composition where extended


# Every shipped config, composed: the typed schema must hold each of its keys, with a type OmegaConf accepts.
SHIPPED: dict[str, list[list[str]]] = {
    "train": [["model=keypoint_snn"], ["model=cnn_snn", "trainer=ddp"], ["model=cnn_snn_pairs"], ["model=keypoint_set"],
              ["model=backbone_snn"], ["data=synth_views"], ["data=synth_large"], ["data=synth_tiny"], ["logger=many"],
              ["logger=csv"], ["logger=tensorboard"], ["callbacks=with_early_stopping"], ["index=opq_ivfpq_refine"],
              ["index=ivfpq"], ["trainer=gpu"], ["trainer=ddp_spawn"], ["trainer=cpu"],
              ["experiment=beat_verification"], ["experiment=keypoint_count"], ["experiment=keypoint_representation"],
              ["experiment=keypoint_vs_cnn"], ["experiment=large_city"], ["experiment=gpu_recipe"],
              ["hparams_search=optuna"], ["hparams_search=optuna_cnn"],
              *[["debug=" + d] for d in ("default", "fast", "fdr", "limit", "overfit", "profiler")],
              *[["experiment=beat_verification", "+ablation=" + a] for a in
                ("boq", "convap", "default", "dim512", "fixed_norm", "images_192", "mixvpr", "netvlad", "no_views",
                 "pairs", "salad", "whiten64")]],
    "eval": [["rerank=orb_ransac", "model=cnn_snn"], ["rerank=fused"], ["rerank=learned_matches"], ["model=keypoint_snn"],
             ["data=vpr_folder", "data.root=/x"], ["data=msls_official", "data.root=/x"],
             ["data=gsv_cities", "data.root=/x"], ["data=msls_city", "data.root=/x"], ["logger=none"]],
    "retrieve": [["model=cnn_snn"], ["rerank=fused"], ["model=keypoint_set"]],
}


# Rules for knobs the shipped configs leave out (set with +key=... or only in some configs).
OPTIONAL = {
    "trainer.min_epochs", "trainer.max_steps", "trainer.min_steps", "trainer.limit_val_batches",
    "trainer.limit_test_batches", "trainer.limit_predict_batches", "model.module.loss.margin",
    "model.module.loss.terms.embedding.margin", "model.train_views.seed", "data.train_views.seed",
    # fields of the runtime dataclasses (IndexConfig, OrbRansacConfig, PlaceConfig, PairRecipe, OrbConfig...) that
    # the shipped configs leave at their defaults: the schema checks them when a user sets them
    "index.metric", "index.num_threads", "orb_ransac.ransac_max_iters", "orb_ransac.fast_threshold",
    "model.places.scan", "data.places.scan", "model.inputs.edge_threshold", "model.inputs.patch_size",
    "model.inputs.max_side", "data.pairs.soft_max_fov", "data.pairs.balance",
}


def test_the_schema_and_the_shipped_configs_match(tmp_path: Path, cache_dir: Path) -> None:
    """Both ways, composing each shipped config once: every key of conf/ has a typed field that accepts its value
    (the dataclasses are the whole schema), and every field is found in some shipped config (a renamed key
    cannot leave a rule that silently never fires)."""
    from omegaconf import OmegaConf

    seen: set[str] = set()
    for task, variants in SHIPPED.items():
        rules = task_rules(task)
        for overrides in variants:
            cfg = _compose(task, overrides, tmp_path, cache_dir)
            OmegaConf.set_struct(cfg, False)
            try:
                OmegaConf.merge(OmegaConf.structured(SCHEMAS[task]), cfg)
            except Exception as exc:  # noqa: BLE001 - name the config that does not fit
                raise AssertionError(f"{task} {overrides}: {exc}") from None
            seen |= {r.key for r in rules
                     if OmegaConf.select(cfg, r.key, default="<absent>", throw_on_resolution_failure=False) != "<absent>"}
    for task in SHIPPED:
        for r in task_rules(task):
            if r.key.removeprefix("callbacks.retrieval_metrics.") not in OPTIONAL:  # its index node: index.*
                assert r.key in seen, f"{task}: rule {r.key} matches nothing in the shipped configs"


def test_synth_presets_are_read_from_the_generator(tmp_path: Path, cache_dir: Path) -> None:
    """No mirror list: the preset choices are data/synth/config.py's PRESETS, read after the cheap checks."""
    from siamese_retrieval.data.synth.config import PRESETS

    cfg = _compose("train", ["data.synth.preset=x"], tmp_path, cache_dir)
    with pytest.raises(ConfigError) as info:
        check_config(cfg, "train")
    assert str(info.value) == f"data.synth.preset='x': must be one of {', '.join(PRESETS)}"


def test_schema_is_light(cache_dir: Path, tmp_path: Path) -> None:
    """Importing the schema, composing a config and checking it pull in no heavy library."""
    code = f"""
import sys, time
t = time.perf_counter()
import siamese_retrieval.configs
assert not [m for m in {HEAVY!r} if m in sys.modules], sorted(m for m in {HEAVY!r} if m in sys.modules)
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import compose_config
from siamese_retrieval.configs import check_config
from siamese_retrieval.errors import ConfigError
cfg = compose_config("train", ["model=cnn_snn", "model.batch_size=abc"], {str(tmp_path)!r}, {str(cache_dir)!r})
try:
    check_config(cfg, "train")
except ConfigError as exc:
    print(exc)
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
assert not heavy, heavy
print(f"{{time.perf_counter() - t:.2f}} s")
"""
    import siamese_retrieval.configs  # noqa: F401 - fail here first with a readable traceback

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "model.batch_size=abc: must be an integer >= 1"
    bare = "import siamese_retrieval.configs, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", bare], check=True, cwd=ROOT, timeout=60)


# ---------------------------------------------------------------------------- typos on the real command lines
# (script, overrides, the one stderr line): Hydra refuses an unknown key or group option; the entry point says
# so in one line with the nearest valid name, exit code 2, before torch is imported.
TYPO_CASES: list[tuple[str, list[str], str]] = [
    ("train.py", ["trainer.max_epoch=3"],
     "error: Could not override 'trainer.max_epoch': key 'max_epoch' is not in struct "
     "(did you mean trainer.max_epochs?)"),
    ("train.py", ["sed=3"], "error: Could not override 'sed': key 'sed' is not in struct (did you mean seed?)"),
    ("train.py", ["trainr.max_epochs=3"],  # a typo in the parent: the full dotted path
     "error: Could not override 'trainr.max_epochs': key 'trainr' is not in struct (did you mean trainer.max_epochs?)"),
    ("train.py", ["devices=2"],  # the right key under another parent
     "error: Could not override 'devices': key 'devices' is not in struct (did you mean trainer.devices?)"),
    ("train.py", ["model=cnn_snn", "model.inputs.heigth=64"],
     "error: Could not override 'model.inputs.heigth': key 'heigth' is not in struct "
     "(did you mean model.inputs.height?)"),
    ("evaluate.py", ["rerank=null"],  # Hydra's ValueError deep in its defaults list, one line here
     "error: rerank=null: a config group takes an option name, not null; leave the override out for the default, "
     "or remove the group with ~rerank"),
    ("train.py", ["model=cnn_sn"],
     "error: In 'train': Could not find 'model/cnn_sn'; available options in 'model': backbone_snn, cnn_snn, cnn_snn_pairs, "
     "keypoint_set, keypoint_snn (did you mean model=cnn_snn?)"),
    ("evaluate.py", ["top_k=3"],  # retrieve's key; eval has top_ks
     "error: Could not override 'top_k': key 'top_k' is not in struct (did you mean top_ks?)"),
    ("retrieve.py", ["topk=3"], "error: Could not override 'topk': key 'topk' is not in struct (did you mean top_k?)"),
    # nothing close: Hydra's own advice, no guess
    ("train.py", ["foo=1"],
     "error: Could not override 'foo': key 'foo' is not in struct; to append to your config use +foo=1"),
    ("train.py", ["model.inputs.heigth=64"],  # keypoint_snn's inputs have no height
     "error: Could not override 'model.inputs.heigth': key 'heigth' is not in struct; "
     "to append to your config use +model.inputs.heigth=64"),
    ("train.py", ["trainer.max_epochs=3="],
     "error: Error parsing override 'trainer.max_epochs=3=': extraneous input '=' expecting <EOF>; "
     "see https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details"),
    ("retrieve.py", ["query=/photos/Zürich (1).jpg"],  # a file name Hydra's grammar wants quoted: how to quote it
     "error: LexerNoViableAltException: query=/photos/Zürich (1).jpg: ^; "
     "see https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details; "
     "quote such a value: 'query=\"/photos/Zürich (1).jpg\"'"),
]

# Runs the script as `python script args`, then prints which heavy modules were imported by the time it exited.
RUN_AND_LIST_HEAVY = f"""
import atexit, runpy, sys
atexit.register(lambda: print(sorted(m for m in {HEAVY!r} if m in sys.modules)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_script(script: str, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "WANDB_MODE": "offline", **env}
    if "HYDRA_FULL_ERROR" not in env:
        environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", RUN_AND_LIST_HEAVY, str(ROOT / script), *args,
                           f"paths.log_dir={tmp_path / 'outputs'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=environ, timeout=120)


@pytest.mark.parametrize(("script", "overrides", "expected"), TYPO_CASES,
                         ids=[f"{s}:{' '.join(o)}" for s, o, _ in TYPO_CASES])
def test_typo_is_one_line_with_the_nearest_name(script: str, overrides: list[str], expected: str,
                                                tmp_path: Path) -> None:
    proc = _run_script(script, overrides, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [expected]
    assert proc.stdout.splitlines() == ["[]"]  # no heavy import: it failed before torch
    assert not (tmp_path / "outputs").exists()  # nor made a run directory


def test_the_quoting_hint_parses_to_the_file_name() -> None:
    """What the hint tells the user to type (inside the shell's single quotes) is the value they meant."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    suggestion = TYPO_CASES[-1][2].rsplit("quote such a value: ", 1)[1]
    assert suggestion.startswith("'") and suggestion.endswith("'")
    assert OverridesParser.create().parse_override(suggestion[1:-1]).value() == "/photos/Zürich (1).jpg"


def test_hydra_full_error_keeps_hydras_traceback(tmp_path: Path) -> None:
    """The user's own HYDRA_FULL_ERROR=1 asks for the whole traceback: Hydra's exception, Python's exit 1."""
    proc = _run_script("train.py", ["sed=3"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigCompositionException: Could not override 'sed'" in proc.stderr


def test_hydra_full_error_is_set_only_until_the_task_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            cache_dir: Path) -> None:
    """run_entry_point sets HYDRA_FULL_ERROR=1 so Hydra raises its composition errors; the task (and what it
    starts) sees the user's value again, so a crash inside it is reported by Hydra as before."""
    from siamese_retrieval import cli

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(cli, "_task_started", False)
    cfg = _compose("retrieve", [], tmp_path, cache_dir)
    seen: dict[str, str | None] = {}

    @cli.report_user_errors
    def task(cfg) -> None:
        seen["task"] = os.environ.get("HYDRA_FULL_ERROR")

    def main() -> None:
        seen["composing"] = os.environ.get("HYDRA_FULL_ERROR")
        task(cfg)

    cli.run_entry_point(main)
    assert seen == {"composing": "1", "task": "0"}
    assert os.environ["HYDRA_FULL_ERROR"] == "0"


def test_a_config_extending_a_registered_schema_is_typed_at_composition(tmp_path: Path) -> None:
    """The dataclasses are in Hydra's ConfigStore (schema/<name>): a user's model config that extends one gets
    Hydra's merge-time typing, reported in one line like every composition error."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typed_cnn.yaml").write_text("defaults:\n  - /schema/model@_here_\n  - cnn_snn\n  - _self_\n")
    done = subprocess.run([sys.executable, "train.py", "--config-dir", str(tmp_path), "model=typed_cnn",
                           "model.batch_size=abc"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("error: Error merging override model.batch_size=abc: value 'abc' of type 'str' "
                                   "could not be converted to Integer")
