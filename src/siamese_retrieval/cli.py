"""How an entry point ends: a user error is one line on stderr and exit code 2, never a traceback;
in a sweep, a failed job is recorded (metrics.json, W&B, the sweeper's worst value) and the others go on."""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from siamese_retrieval.errors import UserError
from siamese_retrieval.run_outputs import check_writable_dir, hydra_mode, task_overrides, write_metrics_json

log = logging.getLogger(__name__)


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
