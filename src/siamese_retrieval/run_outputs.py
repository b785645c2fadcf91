"""What a run leaves behind and prints: its directory, metrics.json, the results table, W&B grouping."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def unwritable_reason(path: str | Path) -> str | None:
    """Why `path` cannot hold a run's files (created if needed, probed with a file), or None when it can."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return " ".join(str(exc.strerror or exc).split())
    return None


def check_writable_dir(path: str | Path) -> None:
    """Create `path` if needed and write a probe file; UserError naming it when that fails."""
    reason = unwritable_reason(path)
    if reason is not None:
        raise UserError(f"output directory {path} is not writable ({reason})")


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


def strict_json(value: Any) -> Any:
    """NaN / inf -> None at any depth: metrics.json stays strict JSON that every parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_metrics_json(path: Path, result: dict[str, Any]) -> None:
    atomic_write_json(path, strict_json(result))
    log.info("wrote %s", path)


def finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs: without this, the jobs of a multirun merge into one run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def print_results(
    metrics: Mapping[str, float],
    title: str,
    stages: Sequence[str] = ("val", "test"),
    extra_rows: Sequence[tuple[str, str]] = (),
    caption: str | None = None,
    footer: str | None = None,
) -> None:
    """The one results table: a row per shown metric, a column per stage (`<stage>/<metric>` keys)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    table.add_column("metric")
    for stage in stages:
        table.add_column(stage, justify="right")
    for name in SHOWN_METRICS:
        row = [metrics.get(f"{stage}/{name}") for stage in stages]
        if any(v is not None for v in row):
            table.add_row(name, *("-" if v is None else f"{v:.4f}" for v in row))
    for name, value in extra_rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    if footer:
        console.print(footer, soft_wrap=True)
