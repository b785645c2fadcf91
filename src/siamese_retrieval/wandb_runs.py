"""W&B runs that a dashboard can compare: names, groups, job types, one clean config, best-val summaries,
per-query tables with image cells, and the run of `evaluate.py`.

Every run gets (conf/logger/wandb.yaml; a value set there wins):

    name      <model>-<data>-s<seed>[-job<N> | -trial<N>][-<key>=<value> ...]
              job<N>: the Hydra multirun job number (the job's directory name); trial<N>: the Optuna trial
              number (it goes on when a study is continued). Then this job's other command-line overrides,
              keyed by their last component, except bookkeeping ones (paths, hydra, logger, callbacks,
              hardware; see `NAME_SKIPPED_*`):
                  python train.py model=cnn_snn                           cnn_snn-synth-s0
                  python train.py -m experiment=keypoint_count            keypoint_snn-synth-s1-job4-n_keypoints=50
                  python train.py hparams_search=optuna                   keypoint_snn-synth-s0-trial7-lr=0.00123-...
              evaluate.py: the training run's name + `-eval` (+ the data and split when they differ from
              training's test split); the ORB + RANSAC baseline: orb_ransac-<data>
    group     train.py: experiment_name, else the sweep (sweep-<date>-<time>), else the task (run_outputs.sweep_group);
              evaluate.py: the checkpoint's training group (recorded in the checkpoint), else `eval`;
              method=orb_ransac: `baselines`
    job_type  train | eval | baseline
    tags      `tags` + the model and data names

The config logged is the one resolved config of the run, its logger entries holding the actual name,
group, tags and job type (SiameseModule saves its hyperparameters with logger=False: nothing twice).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.data.ground_truth import as_ground_truth
from siamese_retrieval.errors import ConfigError, UserError, instantiate_config, load_failure
from siamese_retrieval.run_outputs import finish_loggers, hydra_mode, provenance, task_overrides

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ names

# Overrides left out of run names: the base name's (model, data, seed), where a run's files go, what is
# logged and how it is run. `trainer.*` keys other than NAME_KEPT_TRAINER are hardware / bookkeeping.
NAME_SKIPPED_EXACT = frozenset({"model", "data", "seed", "trainer", "split", "method", "device"})
NAME_SKIPPED_TREES = ("hydra", "paths", "logger", "callbacks", "experiment", "experiment_name", "hparams_search",
                      "tags", "task_name", "ckpt_path", "train", "test", "optimized_metric", "grid", "embed_batch",
                      "orb_ransac.workers", "data.root", "data.files", "data.cache_dir")
NAME_KEPT_TRAINER = ("trainer.max_epochs", "trainer.max_steps", "trainer.limit_train_batches",
                     "trainer.accumulate_grad_batches", "trainer.gradient_clip_val")


def _named_override(key: str) -> bool:
    if key in NAME_SKIPPED_EXACT:
        return False
    if key.startswith("trainer."):
        return key in NAME_KEPT_TRAINER
    return not any(key == t or key.startswith(t + ".") for t in NAME_SKIPPED_TREES)


def _short_value(value: str) -> str:
    value = value.strip().strip("'\"")
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and not re.fullmatch(r"[+-]?\d+", value) and math.isfinite(number):
        return f"{number:.4g}"
    if "/" in value and not value.startswith("["):  # a path: its last part
        value = value.rstrip("/").rsplit("/", 1)[-1] or value
    value = re.sub(r"\s+", "", value)
    return value if len(value) <= 24 else value[:21] + "..."


def name_tokens(overrides: Sequence[str]) -> list[str]:
    """`<key>=<value>` for each override that belongs in a run name, in command-line order.

    Keys are shortened to their last component (`model.inputs.n_keypoints=50` -> `n_keypoints=50`), or to as many
    trailing components as keep them apart (`encoder.dropout`, `head.dropout`); floats to 4 significant digits;
    paths to their last part.
    """
    pairs = []
    for item in overrides:
        if "=" not in item:
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+~")
        if _named_override(key):
            pairs.append((key, _short_value(value)))
    keys = [k for k, _ in pairs]
    return [f"{_shortest_unique(k, keys)}={v}" for k, v in pairs]


def _shortest_unique(key: str, keys: Sequence[str]) -> str:
    """The fewest trailing components of `key` that no other key of `keys` ends with."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
            return tail
    return key


def job_token(cfg: DictConfig) -> str | None:
    """`job<N>` for a multirun job (N = hydra.job.num, its directory), `trial<N>` under the Optuna sweeper
    (N = the trial's number in its study); None for a single run. `cfg`: the job's config (it resolves the
    sweeper's storage path)."""
    if hydra_mode() != "MULTIRUN":
        return None
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    num = hc.job.get("num")
    if "optuna" in str(hc.sweeper.get("_target_", "")).lower():
        trial = optuna_trial_number(task_overrides(), *_sweeper_storage(hc, cfg))
        return f"trial{trial if trial is not None else num}"
    return f"job{num}" if num is not None else None


def optuna_trial_number(overrides: Sequence[str], storage: str | None, study_name: str | None) -> int | None:
    """The number of the RUNNING Optuna trial whose parameters are these overrides (None when unknown).

    The sweeper does not tell the job its trial; it writes `name=value` overrides from `trial.params`, so the
    running trial with exactly those values is this job's."""
    if not storage or not study_name:
        return None
    try:
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=study_name, storage=storage)
        given = set(overrides)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.params and all(f"{k}={v}" in given for k, v in trial.params.items()):
                return int(trial.number)
    except Exception as exc:  # noqa: BLE001 - a name is never worth failing a run for
        log.debug("no Optuna trial number: %s", exc)
    return None


def _sweeper_storage(hc: Any, cfg: DictConfig) -> tuple[str | None, str | None]:
    """hydra.sweeper.storage / study_name, resolved against the job's config (they name ${paths...}, ${model...})."""
    try:
        root = OmegaConf.create({"hydra": {"sweeper": OmegaConf.to_container(hc.sweeper, resolve=False)}})
        root = OmegaConf.merge(OmegaConf.to_container(cfg, resolve=False), root)
        return (OmegaConf.select(root, "hydra.sweeper.storage", default=None),
                OmegaConf.select(root, "hydra.sweeper.study_name", default=None))
    except Exception as exc:  # noqa: BLE001
        log.debug("no Optuna storage: %s", exc)
        return None, None


def run_name(base: str, overrides: Sequence[str] | None = None, job: str | None = None) -> str:
    """`base` + the job token + the override tokens, joined by '-' (see the module docstring)."""
    overrides = task_overrides() if overrides is None else overrides
    return "-".join([base, *([job] if job else []), *name_tokens(overrides)])


def training_run_name(cfg: DictConfig) -> str:
    return run_name(f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}", job=job_token(cfg))


# ------------------------------------------------------------------------------------------------ loggers

# logger.wandb.log_model: what Lightning's WandbLogger is given
LOG_MODEL = {False: False, None: False, "false": False, True: True, "true": True, "best": True, "all": "all"}


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger without the `anonymous` argument it always passes: wandb 0.31 warns about
    that argument whatever its value, on every run, and no setting silences it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def is_wandb(lg_cfg: Mapping[str, Any]) -> bool:
    return str(lg_cfg.get("_target_", "")).endswith("WandbLogger")


def logger_settings(cfg: DictConfig, job_type: str, name: str, group: str, tags: Iterable[str] = ()) -> dict[str, dict]:
    """The resolved `logger` entries of `cfg`; W&B ones get name / group / job_type / tags where not set."""
    settings = {}
    for key, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        lg = OmegaConf.to_container(node, resolve=True)
        if is_wandb(lg):
            lg["name"] = lg.get("name") or name
            lg["group"] = lg.get("group") or group
            lg["job_type"] = lg.get("job_type") or job_type
            lg["tags"] = sorted({*(lg.get("tags") or []), *(str(t) for t in tags)})
            if lg.get("log_model") not in LOG_MODEL:
                raise ConfigError(f"logger.{key}.log_model={lg.get('log_model')!r}: must be one of false, best, all")
        settings[str(key)] = lg
    return settings


def logged_config(cfg: DictConfig, settings: Mapping[str, dict], **extra: Any) -> dict[str, Any]:
    """The run's one resolved config, its `logger` holding what the loggers were given (+ `extra` keys)."""
    config = _resolved(cfg)
    config["logger"] = {k: dict(v) for k, v in settings.items()} or None
    config["provenance"] = provenance()  # library versions and the code's git commit, as in metrics.json
    config.update(extra)
    return config


def _resolved(node: Any) -> Any:
    """`node` as plain containers, resolved; a value that cannot be resolved here (evaluate.py's
    `data.pairs.preset: ${model.pairs_preset}` without model=) stays as its `${...}` text."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - omegaconf's interpolation errors have several classes
        pass
    keys = list(node.keys()) if OmegaConf.is_dict(node) else list(range(len(node)))
    out = {}
    for key in keys:
        try:
            out[key] = _resolved(node[key])
        except Exception:  # noqa: BLE001
            out[key] = node._get_node(key)._value()  # the `${...}` text
    return {str(k): v for k, v in out.items()} if OmegaConf.is_dict(node) else list(out.values())


def make_loggers(settings: Mapping[str, dict], config: Mapping[str, Any], log_model: bool = True) -> list[Any]:
    """Instantiate the loggers of `settings` and log `config` as their hyperparameters."""
    loggers = []
    for key, lg in settings.items():
        lg = dict(lg)
        if is_wandb(lg):
            lg["log_model"] = LOG_MODEL[lg.get("log_model")] if log_model else False
            Path(lg["save_dir"]).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate_config(f"logger.{key}", lg, _convert_="all"))  # a bad node: one line
    for key, lg in zip(settings, loggers):
        try:
            lg.log_hyperparams(dict(config))  # W&B starts its run here
        except Exception as exc:
            if not type(exc).__module__.startswith("wandb."):
                raise
            finish_loggers(loggers)  # no API key, no network: one line, not wandb's traceback
            raise _no_wandb_run(key, settings[key].get("mode"), load_failure(exc)) from None
    return loggers


def check_wandb_login(cfg: DictConfig) -> None:
    """Before any work: a W&B logger in mode 'online' needs credentials (wandb's own lookup: WANDB_API_KEY,
    ~/.netrc, or its prompt on a terminal), or the refusal would come after the training / evaluation."""
    for key, node in (cfg.get("logger") or {}).items():
        if node is None or not is_wandb(node) or node.get("mode") != "online":
            continue
        import wandb

        try:  # verify=False: the key is not checked with the server here, wandb.init does that. It returns
            wandb.login(verify=False)  # False where this process set wandb up offline before: make_loggers tells
        except wandb.errors.UsageError as exc:
            raise _no_wandb_run(key, "online", load_failure(exc)) from None


def _no_wandb_run(key: str, mode: Any, reason: str) -> UserError:
    return UserError(f"logger.{key}: W&B could not start its run in mode {mode!r} ({reason}); run `wandb login` "
                     "first, or log offline (the default) and upload later with `wandb sync`")


def wandb_runs(loggers: Iterable[Any]) -> list[Any]:
    """The wandb Run of each W&B logger (rank zero only: other ranks hold a dummy)."""
    runs = []
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            run = lg.experiment
            if hasattr(run, "summary") and not callable(run.summary):
                runs.append(run)
    return runs


def wandb_run_info(loggers: Iterable[Any]) -> dict[str, str] | None:
    """project / group / name / id of the W&B run of `loggers` (what evaluate.py groups under), or None."""
    for run in wandb_runs(loggers):
        info = {k: getattr(run, k, None) for k in ("project", "group", "name", "id")}
        return {k: str(v) for k, v in info.items() if isinstance(v, str) and v}
    return None


def write_summary(loggers: Iterable[Any], values: Mapping[str, Any]) -> None:
    """Set W&B summary values; val/ keys keep their define_metric summary (best + last)."""
    kept = {k: v for k, v in values.items() if not k.startswith("val/")}
    for run in wandb_runs(loggers):
        run.summary.update(kept)


# ------------------------------------------------------------------------------------------------ tables

THUMB = (96, 72)  # (W, H) of the table's image cells


def per_query_table(dataset: Any, ranking: Any, top_k: int = 5,
                    image_rows: int = 100) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-query W&B table: one row per query of the ranking.

    query (image, grey border), query_path, first_positive_rank (1-based; 0: no positive in the database),
    precision@k, top_1..top_k (images, green border: sim = 1, red: sim = 0; caption: path and score),
    score_1..score_k. Image cells for the first `image_rows` queries only (None after): numbers for all.
    """
    import wandb

    from siamese_retrieval.drawing import thumb
    from siamese_retrieval.retrieval.visualize import GREEN, GREY, RED

    k = min(int(top_k), ranking.top_ids.shape[1])
    thumbs: dict[tuple[str, int, bool], Any] = {}

    def cell(kind: str, i: int, colour: tuple[int, int, int], caption: str) -> Any:
        key = (kind, i, colour == GREEN)
        if key not in thumbs:
            path = dataset.query_file(i) if kind == "q" else dataset.db_file(i)
            framed = np.pad(thumb(path, THUMB), ((3, 3), (3, 3), (0, 0)), mode="constant")
            framed[:3], framed[-3:], framed[:, :3], framed[:, -3:] = colour, colour, colour, colour
            thumbs[key] = wandb.Image(framed, caption=caption)
        return thumbs[key]

    columns = ["query", "query_path", "first_positive_rank", f"precision@{k}",
               *(f"top_{j + 1}" for j in range(k)), *(f"score_{j + 1}" for j in range(k))]
    relevant_top, _ = as_ground_truth(dataset).lookup(ranking.query_idx, ranking.top_ids[:, :k])  # one lookup
    rows = []
    for row, q in enumerate(ranking.query_idx):
        q = int(q)
        ids = [int(j) for j in ranking.top_ids[row, :k]]
        relevant = relevant_top[row].tolist()
        scores = [float(s) for s in ranking.top_scores[row, :k]]
        if row < image_rows:
            images = [cell("q", q, GREY, dataset.q_paths[q])]
            images += [cell("d", j, GREEN if r else RED, dataset.db_paths[j]) for j, r in zip(ids, relevant)]
        else:
            images = [None] * (k + 1)
        rows.append([images[0], dataset.q_paths[q], int(ranking.first_positive_rank[row]), sum(relevant) / max(k, 1),
                     *images[1:], *scores])
    return columns, rows


# ------------------------------------------------------------------------------------------------ evaluate.py


def evaluation_identity(cfg: DictConfig, result: Mapping[str, Any], ckpt: Any | None) -> dict[str, Any]:
    """job_type, name, group and tags of evaluate.py's W&B run (see the module docstring)."""
    split, data = str(result["split"]), str(result["data"])
    if ckpt is None:
        base, group, job_type = f"{result['method']}-{data}", "baselines", "baseline"
        skip_data = True
    else:
        trained = ckpt.training_data or {}
        recorded = trained.get("wandb") or {}
        base = recorded.get("name") or f"{ckpt.model_name}-{trained.get('name', data)}-s{trained.get('seed', cfg.seed)}"
        base += "-eval"
        skip_data = trained.get("name") == data
        group, job_type = recorded.get("group") or "eval", "eval"
    parts = [base, *([] if skip_data else [data]), *([] if split == "test" else [split])]
    return {"job_type": job_type, "group": group, "tags": [str(result["model"]), data],
            "name": run_name("-".join(parts), job=job_token(cfg))}


def log_evaluation(cfg: DictConfig, result: Mapping[str, Any], dataset: Any, ranking: Any,
                   curve: tuple[np.ndarray, np.ndarray] | None, grid_path: Path | None, ckpt: Any | None = None,
                   table: tuple[str, list[str], list[list[Any]]] | None = None) -> None:
    """evaluate.py's run in every configured logger (logger=none: nothing): the metrics (W&B: summary too),
    and in W&B the recall@k curve (line plot + its table), the retrieval grid and the per-query table; or, with
    `table` (name, columns, rows: the benchmarks of one evaluation), that table instead."""
    who = evaluation_identity(cfg, result, ckpt)
    settings = logger_settings(cfg, who["job_type"], who["name"], who["group"], who["tags"])
    if not settings:
        return
    model = {"name": str(result["model"])}
    if ckpt is not None:
        model["module"] = dict(ckpt.module.hparams)
    checkpoint = None if ckpt is None else {"path": str(ckpt.path), "training_data": dict(ckpt.training_data)}
    config = logged_config(cfg, settings, model=model, checkpoint=checkpoint)
    loggers = make_loggers(settings, config, log_model=False)
    try:
        metrics = dict(result["metrics"])
        for lg in loggers:
            lg.log_metrics(metrics, step=0)
        runs = wandb_runs(loggers)
        if runs:
            import wandb  # only with a W&B run to log to
        if runs and table is not None:
            name, columns, rows = table
            media, extra = {name: wandb.Table(columns=columns, data=rows)}, {}
        elif runs:
            prefix = "all" if result["split"] == "all" else str(result["split"])
            ks, recall = curve
            curve_table = wandb.Table(columns=["k", "recall"],
                                      data=[[int(k), None if np.isnan(r) else float(r)] for k, r in zip(ks, recall)])
            columns, rows = per_query_table(dataset, ranking, top_k=int(cfg.grid.top_k))
            media = {
                f"{prefix}/recall_at_k": wandb.plot.line(curve_table, "k", "recall",
                                                         title=f"recall@k: {result['method']} on {result['data']}"),
                f"{prefix}/per_query": wandb.Table(columns=columns, data=rows),
            }
            if Path(grid_path).is_file():
                media[f"{prefix}/retrieval_examples"] = wandb.Image(
                    str(grid_path), caption="query | top-k (green: sim=1, red: sim=0)")
            extra = {k: result[k] for k in ("seconds_per_query", "ranking_s", "n_queries", "n_database") if k in result}
        for run in runs:
            run.log(media)
            run.summary.update({**metrics, **extra})
        for lg in loggers:
            lg.save()
            lg.finalize("success")
    finally:
        finish_loggers(loggers)
