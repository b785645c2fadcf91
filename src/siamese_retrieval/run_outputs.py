"""What a run leaves behind and prints: its directory, metrics.json, the results table, W&B grouping."""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig

from siamese_retrieval.errors import UserError, one_line
from siamese_retrieval.io_utils import atomic_write_json
from siamese_retrieval.registry import METRICS

log = logging.getLogger(__name__)


def shown_metrics(metrics: Iterable[str] = ()) -> list[str]:
    """The rows of the results table, names without the stage: each registered metric family's `shown` names,
    families ordered by their `row` (registry.METRICS), then every `<name>@<k>` of `metrics` (keys
    `<stage>/<name>@<k>`) that a family shows as `<name>@*` (streaming evaluation's mAP@k), sorted.

    Reading the registry imports the modules that define the metrics (torch): call it when the results are
    printed, never at import (this module is imported before torch, for one-line config errors)."""
    families = sorted((e for e in METRICS.entries() if e.meta["shown"]), key=lambda e: e.meta["row"])
    shown = [n for e in families for n in e.meta["shown"] if not n.endswith("@*")]
    every_k = tuple(n[:-1] for e in families for n in e.meta["shown"] if n.endswith("@*"))  # ("mAP@",)
    logged = {k.split("/", 1)[1] for k in metrics if k.count("/") == 1}
    return [*shown, *sorted(n for n in logged if n.startswith(every_k) and n not in shown)]


def __getattr__(name: str) -> Any:
    if name == "SHOWN_METRICS":  # the fixed rows, as the constant this was (read lazily: see shown_metrics)
        return tuple(shown_metrics())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


THIRD_PARTY_LOGGERS = (
    "faiss", "pytorch_lightning", "lightning_fabric", "lightning", "lightning_utilities", "wandb", "urllib3",
    "h5py", "matplotlib", "PIL", "numexpr", "fsspec", "filelock", "git", "httpx", "httpcore", "torch",
)
LIGHTNING_TIP_LOGGERS = (  # where Lightning's rank_zero_info advertisements come from
    "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
)


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels" advertisements: they stay out of the log
    even for someone who turns Lightning's INFO lines back on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party_logs() -> None:
    """Libraries log at WARNING and above, our own `siamese_retrieval.*` loggers keep INFO.

    Sets THIRD_PARTY_LOGGERS to WARNING (a stricter level someone configured stays), drops Lightning's tips,
    and asks W&B for its quiet mode (WANDB_QUIET, unless set: no banner and no run-history summary; the line
    saying where the offline run is saved stays). Idempotent; called when this module is imported (before
    faiss is: its loader logs 11 INFO lines on import) and again by `quiet_known_warnings` (after Lightning is
    imported: it sets its own loggers to INFO on import).
    """
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    for name in LIGHTNING_TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
    os.environ.setdefault("WANDB_QUIET", "true")


def quiet_known_warnings() -> None:
    """Silence library warnings that do not apply here (each checked) and library INFO logs: they drown the
    results table."""
    quiet_third_party_logs()
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")  # Lightning vs torch 2.13
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")  # batches are built in-process
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval")
    warnings.filterwarnings("ignore", message=".*does not have many workers which may be a bottleneck")  # tensors in memory
    # DDP: retrieval metrics are computed once on rank zero and broadcast, so every rank logs the same value
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting")
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated")
    # a plain pickle given as a checkpoint or weights: the weights-only loader's refusal is the one error line
    warnings.filterwarnings("ignore", message="Detected pickle protocol")


quiet_third_party_logs()  # at import: the pipelines import this module before faiss


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
    """The run's directory, usable: writable, and its metrics.json (written at the end) a file if it exists, so
    a run never works for an hour to fail at its last write."""
    path = Path(cfg.paths.output_dir)
    check_writable_dir(path)
    metrics = path / "metrics.json"
    if os.path.lexists(metrics) and (metrics.is_symlink() or not metrics.is_file()):
        kind = "a symbolic link" if metrics.is_symlink() else "a directory" if metrics.is_dir() else "not a file"
        raise UserError(f"{metrics}: is {kind}; this run writes its results there: move it away or choose another "
                        f"run directory")
    return path


def unwritable_reason(path: str | Path) -> str | None:
    """Why `path` cannot hold a run's files (created if needed, probed with a file), or None when it can."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe-", dir=path)  # a new, random name: never a planted link
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return one_line(exc.strerror or exc)
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
    """metrics.json, with what produced it (`provenance`: library versions and the code's git commit) and which
    way each metric is better (`directions`, from METRICS: compare.py bolds the best mean by it, so that a
    researcher's own lower-is-better metric is bolded the right way without compare.py importing their code)."""
    record = {**result, "provenance": result.get("provenance") or provenance()}
    if isinstance(result.get("metrics"), Mapping):
        record["directions"] = {n: mode for n in result["metrics"] if (mode := METRICS.best_mode(n))}
    atomic_write_json(path, strict_json(record))
    log.info("wrote %s", path)


PROVENANCE_PACKAGES = ("siamese-retrieval", "torch", "pytorch-lightning", "torchmetrics", "numpy", "faiss-cpu",
                       "opencv-python-headless", "opencv-python", "hydra-core", "omegaconf", "wandb", "timm",
                       "torchvision")


def machine_description() -> str:
    """'2 CPU cores, x86_64, no GPU' / '16 CPU cores, x86_64, GPU: NVIDIA H100 80GB HBM3': where a result was measured
    (nvidia-smi's answer, so that describing the machine never imports torch)."""
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            gpu = f"GPU: {len(names)} x {names[0]}" if len(names) > 1 else f"GPU: {names[0]}" if names else gpu
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, {gpu}"


def measured_line(record: dict[str, Any]) -> str:
    """'Measured <date> on <machine>[ with `<command>`]; <versions>; commit <sha>[ (with uncommitted changes)][;
    <note>].': the line an experiment's README shows under a results table, from the results file's own record
    (`date`, `machine`, `provenance` as provenance() gives it, optional `command` and `note`). Jobs that ran on
    different commits (compare.py's record keeps each job's) are all named: 'commits a1b2c3d (4 jobs), ...'."""
    p = record["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items() if k != "siamese-retrieval")
    dates = record["date"] if isinstance(record["date"], list) else [record["date"]]
    command = f" with `{record['command']}`" if record.get("command") else ""
    note = f"; {record['note']}" if record.get("note") else ""
    machine = f"{record['machine']} ({p['cpu']})" if p.get("cpu") else record["machine"]
    jobs = [j for j in record.get("jobs", []) if isinstance(j, dict)]
    per_job = Counter(j["commit"] for j in jobs if j.get("commit"))
    unrecorded = len(jobs) - sum(per_job.values())  # jobs older than the per-job record
    if len(per_job) > 1 or (per_job and unrecorded):
        counted = {**per_job, **({"not recorded": unrecorded} if unrecorded else {})}
        commits = "commits " + ", ".join(f"{c} ({n} job{'s' if n > 1 else ''})" for c, n in counted.items())
    else:
        commits = f"commit {commit_label(p)}"
    return f"Measured {', '.join(dates)} on {machine}{command}; {versions}; {commits}{note}."


def commit_label(p: dict[str, Any]) -> str:
    """'a1b2c3d', or 'a1b2c3d (with uncommitted changes)': the short commit of a provenance record."""
    dirty = " (with uncommitted changes)" if p.get("git_dirty") else ""
    return f"{(p.get('git_commit') or 'unknown')[:7]}{dirty}"


def cpu_line() -> str:
    """'AMD EPYC, torch kernels AVX2': the processor and the vector kernels torch picked. Two machines of one kind
    can differ here, and other kernels round differently: a training run repeats bit for bit on the same
    processor and libraries, not necessarily on another."""
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    torch = sys.modules.get("torch")  # not imported for this: a cheap call must stay cheap
    return f"{model}, torch kernels {torch.backends.cpu.get_cpu_capability()}" if torch is not None else model


def provenance() -> dict[str, Any]:
    """Python and library versions (those installed), the CPU (cpu_line) and the git commit of the package's
    checkout (null when it is not one: an installed wheel), with `git_dirty` when it has uncommitted changes."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit, dirty = None, None
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / ".git").exists():
        def git(*args: str) -> str | None:
            try:
                done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                return None
            return done.stdout.strip() if done.returncode == 0 else None

        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if commit else None
        dirty = bool(status) if status is not None else None
    return {"versions": versions, "cpu": cpu_line(), "git_commit": commit, "git_dirty": dirty}


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
    """The one results table: a row per shown metric, a column per stage (`<stage>/<metric>` keys).

    Never wrapped or squeezed: the console is as wide as the table (and its title and caption) needs, on a
    narrow terminal as in a pipe, and the footer (the checkpoint path) is printed on one line as it is.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), caption=Text(caption) if caption else None,
                  min_width=max(len(title), len(caption or "")))
    table.add_column("metric", no_wrap=True)
    for stage in stages:
        table.add_column(stage, justify="right", no_wrap=True)
    for name in shown_metrics(metrics):  # the registered metrics' rows (+ mAP@k of a streaming evaluation)
        row = [metrics.get(f"{stage}/{name}") for stage in stages]
        if any(v is not None for v in row):
            table.add_row(name, *("-" if v is None else f"{v:.4f}" for v in row))
    for name, value in extra_rows:
        table.add_row(name, value)
    width = Console(width=10_000).measure(table).maximum
    console = Console(width=width, highlight=False)
    console.print(table)
    if footer:
        console.print(footer, soft_wrap=True, markup=False, highlight=False)
