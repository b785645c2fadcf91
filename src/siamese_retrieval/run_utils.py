"""Run plumbing shared by the entry points: run dirs, W&B grouping, metrics.json, results table, errors."""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from siamese_retrieval.errors import UserError
from siamese_retrieval.io_utils import atomic_write_json

log = logging.getLogger(__name__)

SHOWN_METRICS = (
    "precision@1", "precision@5", "precision@10", "recall@1", "recall@5", "recall@10", "mAP", "ndcg@10",
    "range_acc@0.01",
)


def quiet_known_warnings() -> None:
    """Silence library warnings that do not apply here (each checked): they drown the results table."""
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")  # Lightning vs torch 2.13
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")  # batches are built in-process
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval")
    warnings.filterwarnings("ignore", message=".*does not have many workers which may be a bottleneck")  # tensors in memory
    # DDP: retrieval metrics are computed once on rank zero and broadcast, so every rank logs the same value
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting")
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated")


def hydra_mode() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        mode = HydraConfig.get().mode
    except ValueError:  # not inside a Hydra app (tests calling train() with a composed config)
        return "RUN"
    return mode.name if mode is not None else "RUN"  # None when a test composed the config


def task_overrides() -> list[str]:
    """The command-line overrides of this job (what compare.py groups sweep jobs by)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ValueError, AttributeError):
        return []


def run_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    check_writable_dir(path)
    return path


def check_writable_dir(path: str | Path) -> None:
    """Create `path` if needed and write a probe file; UserError naming it when that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {path} is not writable ({exc.strerror or exc})") from None


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; keeps this module importable without it
    _HydraCallback = object


class OutputDirCheck(_HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): an unusable run/sweep directory is one clear line, exit 2.

    Hydra creates the run directory (and its log file) before the task runs, and reports a failure there
    as a traceback; this checks the directory first, when the run or the sweep starts.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(path: str) -> None:
        try:
            check_writable_dir(path)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)


def sweep_group(cfg: DictConfig) -> str:
    """W&B group: the experiment's name, else the sweep directory (multirun), else the task."""
    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    if hydra_mode() == "MULTIRUN":
        from hydra.core.hydra_config import HydraConfig

        sweep = Path(HydraConfig.get().sweep.dir)
        return f"sweep-{sweep.parent.name}-{sweep.name}"
    return str(cfg.get("task_name", "train"))


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """`ckpt_path=last` means this run directory's checkpoints/last.ckpt."""
    if ckpt_path in (None, ""):
        return None
    path = out_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"ckpt_path: checkpoint {path} not found")
    return str(path)


def write_metrics_json(path: Path, result: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    atomic_write_json(path, clean)
    log.info("wrote %s", path)


def print_results(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = result.get("metrics", {})
    table = Table(title=f"{result.get('model')} on {result.get('data')} (seed {result.get('seed')})")
    table.add_column("metric")
    for stage in ("val", "test"):
        table.add_column(stage, justify="right")
    for name in SHOWN_METRICS:
        row = [metrics.get(f"{stage}/{name}") for stage in ("val", "test")]
        if any(v is not None for v in row):
            table.add_row(name, *("-" if v is None else f"{v:.4f}" for v in row))
    Console().print(table)
    if result.get("checkpoint"):
        Console().print(f"best checkpoint: {result['checkpoint']}")


def finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs: without this, the jobs of a multirun merge into one run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def report_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Bad input ends in one clear line on stderr and exit code 2 (a sweep job is marked failed instead)."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return sweeper_value(task(cfg))
        except UserError as exc:
            if hydra_mode() == "MULTIRUN":
                return sweeper_value(mark_job_failed(cfg, str(exc)))
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - a multirun job's crash must not stop the sweep's other jobs
            message = storage_error(exc, output_dir(cfg))  # full disk / unwritable place: one line too
            if message is not None:
                if hydra_mode() == "MULTIRUN":
                    return sweeper_value(mark_job_failed(cfg, message))
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)
            if hydra_mode() != "MULTIRUN":
                raise
            log.exception("job crashed")
            return sweeper_value(mark_job_failed(cfg, f"{type(exc).__name__}: {exc}"))

    return wrapper


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def storage_error(exc: BaseException, out_dir: str | Path | None = None) -> str | None:
    """One line for a failed write (full disk, quota, read-only or unwritable place), else None.

    Also looks at the exception's cause/context: libraries (e.g. checkpoint writers) re-raise OSErrors.
    """
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            reason = exc.strerror or os.strerror(exc.errno)
            where = f" to {out_dir}" if out_dir is not None else ""
            what = f" (while writing {exc.filename})" if exc.filename is not None else ""
            return f"cannot write{where}: {reason}{what}"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def output_dir(cfg: DictConfig) -> str | None:
    try:
        return str(cfg.paths.output_dir)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return None


def sweeper_value(value: Any) -> Any:
    """NaN (a failed job, or no optimized metric) as the Optuna sweeper's worst value instead.

    hydra-optuna-sweeper 1.2 + optuna 2.10 abort the whole search on a NaN objective (and leave the trial
    RUNNING); +-inf is recorded as a completed trial that the sampler ranks last.
    """
    if not (isinstance(value, float) and math.isnan(value)):
        return value
    try:
        from hydra.core.hydra_config import HydraConfig

        sweeper = HydraConfig.get().sweeper
    except (ValueError, AttributeError):
        return value
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return value
    direction = str(sweeper.get("direction", "minimize")).lower()
    return float("-inf") if direction.endswith("maximize") else float("inf")


def mark_job_failed(cfg: DictConfig, error: str) -> float:
    """A failed sweep job: metrics.json says so (compare.py lists it), W&B run closed, NaN to the sweeper."""
    log.error("job failed: %s", error)
    try:
        write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json",
                           {"status": "failed", "error": error, "overrides": task_overrides()})
    except OSError:
        pass
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)
    return float("nan")
