"""Compare the jobs of one or more sweep directories: `python compare.py outputs/train/multirun/<date>/<time>`.

Reads every job's metrics.json (and its overrides from .hydra/overrides.yaml, else from metrics.json),
groups the jobs by their overrides other than the seed, and writes comparison.md (mean +- std over the
seeds of each group, n, the best mean of each metric in bold) and comparison.png (bars with std error
bars). Failed jobs (status "failed", no metrics.json at all, or files that cannot be understood: a
metrics.json that is not a JSON object of numeric metrics, an unreadable overrides.yaml) are listed with
the reason, never crashed on. A sweep directory without jobs, or an --out that cannot be written, is a
`CompareError`: one `error:` line, exit code 2. No network.
"""

from __future__ import annotations

import difflib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from siamese_retrieval.errors import UserError, json_kind, json_snippet, one_line
from siamese_retrieval.run_outputs import unwritable_reason

DEFAULT_METRICS = (
    "test/recall@1", "test/recall@5", "test/recall@10", "test/precision@10", "test/mAP", "test/ndcg@10",
    "test/range_acc@0.01",
)
SEED_KEYS = ("seed", "+seed", "++seed")
# overrides that never define a group: where outputs go, how the job was launched, logging
IGNORED_PREFIXES = ("hydra.", "hydra/", "paths.", "logger", "ckpt_path", "+ckpt_path")
LOWER_IS_BETTER = ("loss", "minutes")  # names read as lower-is-better where metrics.json records no `directions`
RUN_MINUTES = "minutes"  # a job's wall time (metrics.json's elapsed_s / 60): `--metrics ... minutes` tables the cost


class CompareError(UserError):
    """Nothing to compare or nowhere to write: one line, exit code 2."""


class MalformedJob(ValueError):
    """A job file that cannot be understood; the job is listed as failed with this reason."""


@dataclass
class Job:
    path: Path
    overrides: list[str]
    status: str  # ok | failed | missing
    metrics: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    error: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # metrics.json as read: the chart names things by it

    @property
    def provenance(self) -> dict[str, Any] | None:
        """metrics.json's record of versions and commit, where it has one."""
        recorded = self.fields.get("provenance")
        return recorded if isinstance(recorded, dict) else None

    @property
    def key(self) -> tuple[str, ...]:
        return group_key(self.overrides)


@dataclass
class Group:
    key: tuple[str, ...]
    jobs: list[Job]

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample standard deviation (0 for one seed) and the number of seeds with a value."""
        vals = [j.metrics[metric] for j in self.jobs if isinstance(j.metrics.get(metric), (int, float))
                and not math.isnan(j.metrics[metric])]
        if not vals:
            return float("nan"), float("nan"), 0
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def group_key(overrides: Iterable[str]) -> tuple[str, ...]:
    """The overrides that define a configuration: all but the seed and bookkeeping ones, sorted."""
    keep = []
    for ov in overrides:
        name = ov.split("=", 1)[0]
        if name in SEED_KEYS or name.lstrip("+~").startswith(IGNORED_PREFIXES):
            continue
        keep.append(ov)
    return tuple(sorted(keep))


def _decode(path: Path) -> str:
    """A job file's text; MalformedJob when it is not UTF-8 (OSError when it cannot be read)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        byte = f"0x{raw[exc.start]:02x}"
        raise MalformedJob(f"{path.name} is not UTF-8 text (byte {byte} at offset {exc.start})") from None


def _override_list(value: Any, where: str) -> list[str]:
    """A list of `key=value` strings (numbers allowed: YAML reads `- 1` as one)."""
    if value is None:
        return []
    if not isinstance(value, list):
        kind = "a mapping" if isinstance(value, dict) else json_kind(value)
        raise MalformedJob(f"{where} must be a list of overrides, found {kind}")
    for o in value:
        if o is None or isinstance(o, (dict, list)):
            raise MalformedJob(f"{where} must hold override strings, found {one_line(repr(o))[:80]}")
    return [str(o) for o in value]


def read_overrides(job_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """The job's overrides: .hydra/overrides.yaml (plain YAML, never interpolated), else metrics.json's list.

    Raises MalformedJob naming the file when it cannot be understood.
    """
    hydra_file = job_dir / ".hydra" / "overrides.yaml"
    if hydra_file.is_file():
        import yaml

        try:
            value = yaml.safe_load(_decode(hydra_file))
        except OSError as exc:
            raise MalformedJob(f".hydra/overrides.yaml cannot be read ({one_line(exc.strerror or exc)})") from None
        except MalformedJob as exc:
            raise MalformedJob(f".hydra/{exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise MalformedJob(f".hydra/overrides.yaml is not valid YAML ({one_line(problem)}{at})") from None
        return _override_list(value, ".hydra/overrides.yaml")
    return _override_list(metrics.get("overrides"), "metrics.json: overrides")


def _read_metrics(data: dict[str, Any]) -> dict[str, float]:
    """metrics.json's `metrics`: an object of numbers (null or NaN = not measured, left out of the means)."""
    raw = data.get("metrics")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MalformedJob(f"metrics.json: metrics must be an object of numbers, found {json_kind(raw)}")
    metrics = {}
    for name, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedJob(f"metrics.json: metric {name!r} is not a number: {json_snippet(value, 80)}")
        metrics[name] = float(value)
    return metrics


def seed_of(overrides: Sequence[str], metrics: dict[str, Any]) -> int | None:
    if isinstance(metrics.get("seed"), int):
        return metrics["seed"]
    for ov in overrides:
        name, _, value = ov.partition("=")
        if name in SEED_KEYS:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep: those with a metrics.json or a .hydra/ (a job that died before writing)."""
    if (sweep_dir / "metrics.json").is_file() or (sweep_dir / ".hydra" / "overrides.yaml").is_file():
        return [sweep_dir]  # a single run directory
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found = {d for d in found if "wandb" not in d.parts and d != sweep_dir}
    return sorted(found, key=lambda d: [int(p) if p.isdigit() else p for p in d.relative_to(sweep_dir).parts])


def read_job(job_dir: Path) -> Job:
    """One job directory -> Job; whatever is wrong with its files makes it a failed job with the reason."""
    metrics_file = job_dir / "metrics.json"
    try:
        if not metrics_file.is_file():
            return Job(job_dir, read_overrides(job_dir, {}), "missing",
                       error="no metrics.json (crashed or still running)")
        try:
            data = json.loads(_decode(metrics_file))
        except OSError as exc:
            raise MalformedJob(f"metrics.json cannot be read ({one_line(exc.strerror or exc)})") from None
        except json.JSONDecodeError as exc:
            raise MalformedJob(f"metrics.json is not valid JSON ({exc.msg} at line {exc.lineno} "
                               f"column {exc.colno})") from None
        except RecursionError:
            raise MalformedJob("metrics.json is not valid JSON (nested too deeply)") from None
        if not isinstance(data, dict):
            raise MalformedJob(f"metrics.json must hold a JSON object, found {json_kind(data)}")
        overrides = read_overrides(job_dir, data)
        status = str(data.get("status", "ok"))
        metrics = _read_metrics(data) if status == "ok" else {}
        elapsed = data.get("elapsed_s")
        if metrics and isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and elapsed >= 0:
            metrics[RUN_MINUTES] = float(elapsed) / 60
    except MalformedJob as exc:
        return Job(job_dir, _overrides_or_none(job_dir), "failed", error=one_line(exc))
    error = one_line(data.get("error", "")) if status != "ok" else ""
    return Job(job_dir, overrides, status if status in ("ok", "failed") else "failed", metrics,
               seed_of(overrides, data), error, data)


def _overrides_or_none(job_dir: Path) -> list[str]:
    """A malformed job's overrides for the failed-jobs list, if its overrides.yaml at least is readable."""
    try:
        return read_overrides(job_dir, {})
    except (MalformedJob, OSError):
        return []


def collect(sweep_dirs: Sequence[str | Path]) -> list[Job]:
    jobs = []
    for d in sweep_dirs:
        d = Path(d)
        if not d.is_dir():
            raise CompareError(f"{d}: not a directory")
        found = find_job_dirs(d)
        if not found:
            raise CompareError(f"{d}: no jobs found (no metrics.json or .hydra/overrides.yaml below it)")
        jobs.extend(read_job(j) for j in found)
    return jobs


def check_out_dir(out: Path) -> None:
    """Create `out` if needed and prove it writable before anything is written; CompareError if not."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: exists and is not a directory")
    reason = unwritable_reason(out)
    if reason is not None:
        raise CompareError(f"--out {out}: cannot write there ({reason})")


def group_jobs(jobs: Sequence[Job]) -> list[Group]:
    """Successful jobs grouped by their non-seed overrides, in the order first seen."""
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        if job.status == "ok":
            groups.setdefault(job.key, []).append(job)
    return [Group(k, v) for k, v in groups.items()]


def group_labels(groups: Sequence[Group]) -> list[str]:
    """Each group named by the overrides that differ between groups (the common ones say nothing)."""
    if not groups:
        return []
    common = set.intersection(*(set(g.key) for g in groups)) if len(groups) > 1 else set()
    labels = []
    for g in groups:
        own = [o for o in g.key if o not in common]
        labels.append(" ".join(own) if own else ("(defaults)" if not g.key else " ".join(g.key)))
    return labels


def pick_metrics(groups: Sequence[Group], wanted: Sequence[str] | None) -> list[str]:
    """The --metrics asked for (one no job recorded is a typo, refused with the names there are), else the
    default ones present. A sweep whose jobs all failed records none: its table lists what was asked."""
    present = {m for g in groups for j in g.jobs for m in j.metrics}
    if wanted:
        unknown = [m for m in wanted if m not in present]
        if present and unknown:
            close = difflib.get_close_matches(unknown[0], sorted(present), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CompareError(f"--metrics {' '.join(unknown)}: no job recorded it{hint}; recorded: "
                               f"{', '.join(sorted(present))}")
        return list(wanted)
    return [m for m in DEFAULT_METRICS if m in present] or sorted(present)


def best_groups(groups: Sequence[Group], metric: str) -> set[int]:
    """Indices of the groups with the best mean as the table shows it (ties all count); none when every group
    ties. Best is the way the jobs' metrics.json `directions` say (the metric's registry entry when measured)."""
    means = [(round(g.mean_std(metric)[0], shown_digits(metric)), i) for i, g in enumerate(groups)]
    means = [(m, i) for m, i in means if not math.isnan(m)]
    if len(means) < 2:
        return set()
    recorded = {mode for g in groups for j in g.jobs if isinstance(j.fields.get("directions"), dict)
                and (mode := j.fields["directions"].get(metric)) in ("min", "max")}
    lower = recorded == {"min"} if recorded else any(tag in metric for tag in LOWER_IS_BETTER)
    best = (min if lower else max)(m for m, _ in means)
    winners = {i for m, i in means if m == best}
    return set() if len(winners) == len(means) else winners


def shown_digits(metric: str) -> int:
    """Decimals a metric's mean is shown with (and compared at: a bold mean is best as printed)."""
    return 1 if metric == RUN_MINUTES else 4


def fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    return "-" if n == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(groups: Sequence[Group], metrics: Sequence[str]) -> str:
    labels = group_labels(groups)
    header = ["configuration", "n"] + list(metrics)
    rows = []
    best = {m: best_groups(groups, m) for m in metrics}
    for i, (g, label) in enumerate(zip(groups, labels)):
        cells = [label, str(len(g.jobs))]
        for m in metrics:
            cell = fmt(*g.mean_std(m), digits=shown_digits(m))
            cells.append(f"**{cell}**" if i in best[m] else cell)
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def failed_section(jobs: Sequence[Job]) -> str:
    bad = [j for j in jobs if j.status != "ok"]
    if not bad:
        return ""
    lines = [f"Failed jobs ({len(bad)}):", ""]
    for j in bad:
        ov = " ".join(j.overrides) or "-"
        lines.append(f"- `{j.path}` [{j.status}] {ov}: {j.error or 'no error message'}")
    return "\n".join(lines)


BASELINE_METHODS = ("orb_ransac", "thumbnail")  # metrics.json "method" of the baselines: reference lines
BOUNDED_METRICS = ("precision@", "recall@", "mAP", "ndcg@", "range_acc@")  # values in [0, 1]


def _baseline_method(group: Group) -> str | None:
    """The baseline method shared by all the group's jobs (orb_ransac, thumbnail), else None (a learned model)."""
    methods = {str(j.fields.get("method", "")) for j in group.jobs}
    return methods.pop() if len(methods) == 1 and methods <= set(BASELINE_METHODS) else None


def _chart_title(groups: Sequence[Group], metrics: Sequence[str]) -> str:
    fields = [j.fields for g in groups for j in g.jobs]
    data = sorted({str(f["data"]) for f in fields if f.get("data")})
    splits = sorted({m.split("/", 1)[0] for m in metrics if "/" in m})
    where = f" on {', '.join(data)}" if data else ""
    split = f" ({', '.join(splits)} split)" if splits else ""
    return f"Retrieval{where}{split}: mean ± std over seeds"


def write_plot(groups: Sequence[Group], metrics: Sequence[str], path: Path) -> Path:
    """Bars (mean, with std error bars clipped to the metric's range) per configuration and metric; the
    baselines (jobs whose metrics.json method is orb_ransac or thumbnail) as dashed reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [_baseline_method(g) for g in groups]
    learned = [(g, lab) for g, lab, kind in zip(groups, group_labels(groups), kinds) if kind is None]
    baselines = [(g, kind) for g, kind in zip(groups, kinds) if kind is not None]
    n_g, n_m = max(len(learned), 1), max(len(metrics), 1)
    width = 0.8 / n_g
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * n_m * max(1, n_g / 2) + 1.5), 5.0))
    x = np.arange(n_m)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    show_values = n_g * n_m <= 24
    top = 0.0
    for i, (g, label) in enumerate(learned):
        stats = [g.mean_std(m) for m in metrics]
        means = np.array([0.0 if n == 0 else mean for mean, _, n in stats])
        stds = np.array([0.0 if n == 0 else std for _, std, n in stats])
        lower = np.minimum(stds, np.maximum(means, 0.0))  # error bars never reach below 0
        upper = np.array([min(sd, 1.0 - mu) if any(b in m for b in BOUNDED_METRICS) else sd
                          for m, mu, sd in zip(metrics, means, stds)]).clip(min=0.0)
        pos = x + (i - (n_g - 1) / 2) * width
        ax.bar(pos, means, width, yerr=[lower, upper], capsize=3, color=colours[i % len(colours)],
               error_kw={"elinewidth": 1, "ecolor": "#333333"}, label=f"{label} (n={len(g.jobs)})")
        top = max(top, float((means + upper).max(initial=0.0)))
        if show_values:
            for xp, mu, up, (_, _, n) in zip(pos, means, upper, stats):
                if n:
                    ax.annotate(f"{mu:.2f}", (xp, mu + up), textcoords="offset points", xytext=(0, 2),
                                ha="center", va="bottom", fontsize=7, zorder=5,
                                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})
    styles = ["--", ":", "-."]
    for b, (g, method) in enumerate(baselines):  # one dashed line across each metric's bars
        label: str | None = f"{method} (baseline)"
        for j, m in enumerate(metrics):
            mean, _, n = g.mean_std(m)
            if n:
                ax.hlines(mean, j - 0.45, j + 0.45, colors=("black", "dimgray", "saddlebrown")[b % 3],
                          linestyles=styles[b % 3], linewidth=1.6, label=label)
                label, top = None, max(top, mean)
    prefixes = {m.split("/", 1)[0] + "/" for m in metrics if "/" in m}
    common = prefixes.pop() if len(prefixes) == 1 and all("/" in m for m in metrics) else ""  # named in the title
    ax.set_xticks(x)
    ax.set_xticklabels([m[len(common):] for m in metrics], rotation=30 if n_m > 4 else 0,
                       ha="right" if n_m > 4 else "center")
    ax.set_ylabel("mean ± std over seeds")
    if all(any(b in m for b in BOUNDED_METRICS) for m in metrics):
        ax.set_ylim(0, min(1.08, top * 1.12 + 0.02) if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(_chart_title(groups, metrics), fontsize=10)
    if groups:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


RESULTS_VERSION = 1


def results_record(jobs: Sequence[Job], metrics: Sequence[str], command: str) -> dict[str, Any]:
    """What an experiment stores (experiments/<name>/results/*.json) so that its table can be made again without
    the sweep: every job's overrides, seed, status and metrics, the command, and when, where and with what code
    the jobs ran (the first job's recorded provenance: versions and commit; each job's own commit beside it, as
    sweeps merged into one table may have run on different commits)."""
    import datetime

    from siamese_retrieval.run_outputs import commit_label, machine_description, provenance

    ran = next((j.provenance for j in jobs if j.provenance is not None), None) or provenance()
    return {"version": RESULTS_VERSION, "date": datetime.date.today().isoformat(), "machine": machine_description(),
            "provenance": ran, "command": command, "metrics": list(metrics),
            "jobs": [{"overrides": j.overrides, "seed": j.seed, "status": j.status, "error": j.error,
                      "metrics": {m: j.metrics[m] for m in metrics if m in j.metrics},
                      **({"commit": commit_label(j.provenance)} if j.provenance else {})} for j in jobs]}


def table_from_results(record: dict[str, Any]) -> str:
    """The markdown table of a stored results record (results_record), as compare.py prints it for the sweep."""
    jobs = [Job(Path(f"job{i}"), list(j["overrides"]), j["status"], dict(j["metrics"]), j["seed"], j.get("error", ""))
            for i, j in enumerate(record["jobs"])]
    return markdown_table(group_jobs(jobs), record["metrics"])


def compare(sweep_dirs: Sequence[str | Path], metrics: Sequence[str] | None = None,
            out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write comparison.md and comparison.png (into out_dir, default the first sweep dir); return what was found."""
    jobs = collect(sweep_dirs)
    out = Path(out_dir) if out_dir else Path(sweep_dirs[0])
    check_out_dir(out)
    groups = group_jobs(jobs)
    chosen = pick_metrics(groups, metrics)
    table = markdown_table(groups, chosen)
    sources = ", ".join(f"`{d}`" for d in sweep_dirs)
    n_ok = sum(j.status == "ok" for j in jobs)
    text = [f"# Comparison of {sources}", "",
            f"{n_ok} of {len(jobs)} jobs succeeded; {len(groups)} configurations; mean ± sample std over seeds "
            "(n = seeds); best mean per metric in bold.", "", table, ""]
    failed = failed_section(jobs)
    if failed:
        text += [failed, ""]
    md = "\n".join(text)
    from siamese_retrieval.io_utils import atomic_write_text

    atomic_write_text(out / "comparison.md", md)
    png = write_plot(groups, chosen, out / "comparison.png")
    return {"jobs": jobs, "groups": groups, "metrics": chosen, "markdown": md, "table": table,
            "md_path": out / "comparison.md", "png_path": png}
