"""Which run `python train.py ckpt_path=...` continues, and which W&B run it continues.

    ckpt_path=last        the newest unfinished run of the same overrides (below); it keeps writing into
                          that run's directory (log, .hydra/, checkpoints/, metrics.json, wandb/)
    ckpt_path=<run dir>   that run's checkpoints/last.ckpt, writing into that run's directory
    ckpt_path=<file>      that checkpoint, in a new run directory

The run-selection rule (`find_unfinished_run`): the candidates are the run directories under the runs
folder of this task, i.e. the folders of the timestamped run-dir pattern above its first `${now:...}`
part (`outputs/runs/` or `outputs/train/runs/`), at the pattern's depth. A candidate must hold
`checkpoints/last.ckpt`, must not hold a `metrics.json` with status "ok" (a finished run), and its task
overrides (`.hydra/overrides.yaml`) must equal this invocation's as a multiset, leaving out `ckpt_path=...`
and any `hydra.*` override. Of those, the one whose last.ckpt was written most recently wins (ties: the
later directory name).

OutputDirCheck (cli.py) applies this before Hydra creates the run directory; train.py reads the
checkpoint through `resolve_ckpt_path`, and its W&B logger takes the run id from `wandb_run_id`.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Iterable

import yaml

from siamese_retrieval.errors import UserError

LAST_CKPT = Path("checkpoints") / "last.ckpt"
IGNORED_KEYS = ("ckpt_path",)  # overrides that do not make a run different


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """The checkpoint to resume from: `last` = this run directory's last.ckpt (OutputDirCheck has already
    pointed the run directory at the run being continued), a run directory = its last.ckpt, else the file."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        path = Path(out_dir) / LAST_CKPT
    else:
        path = Path(str(ckpt_path)).expanduser()
        if path.is_dir():
            if not (path / LAST_CKPT).is_file():
                raise UserError(f"ckpt_path: run directory {ckpt_path} holds no {LAST_CKPT.as_posix()}")
            path = path / LAST_CKPT
    if not path.is_file():
        raise UserError(f"ckpt_path: checkpoint {path} not found")
    return str(path)


def override_key(override: str) -> str:
    """`+a.b=1` / `~a.b` / `a.b=1` -> `a.b`."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def comparable_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that make a run what it is: without `ckpt_path=...` and `hydra.*`, in sorted order."""
    kept = []
    for o in overrides:
        key = override_key(str(o))
        if key in IGNORED_KEYS or key == "hydra" or key.startswith("hydra."):
            continue
        kept.append(str(o))
    return sorted(kept)


def run_overrides(run_dir: Path) -> list[str] | None:
    """The task overrides a run was started with (its .hydra/overrides.yaml), or None when unreadable."""
    try:
        value = yaml.safe_load((Path(run_dir) / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if value is None:
        return []
    if not isinstance(value, list):
        return None
    return [str(v) for v in value]


def is_finished(run_dir: Path) -> bool:
    """A run is finished when its metrics.json says status ok (a failed or killed run is not)."""
    if metrics_problem(run_dir) is not None:
        return False  # never read a directory or a FIFO (a read would block)
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def metrics_problem(run_dir: Path) -> str | None:
    """Why the run's metrics.json, which a continued run replaces at its end, is in the way: it exists and is not
    a regular file (a directory, a FIFO, ...); None when it is one or is missing (a link to one is fine)."""
    path = Path(run_dir) / "metrics.json"
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"its metrics.json cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    return f"its metrics.json is {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}, not a file"


def check_continuable(run_dir: Path, how: str) -> None:
    """UserError when the run `run_dir` that `how` (`ckpt_path=last`) would continue could not record its
    result: training it to the end would then fail to write metrics.json."""
    problem = metrics_problem(run_dir)
    if problem is not None:
        raise UserError(f"{how}: cannot continue run {run_dir}: {problem} (the run would train and then fail to "
                        f"write its results there); move it away, or start a new run without ckpt_path")
    problem = checkpoint_problem(run_dir / LAST_CKPT)  # before Hydra writes this run's config and log into it
    if problem is not None:
        raise UserError(f"{how}: cannot continue run {run_dir}: {problem}; start a new run without ckpt_path")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is no loadable checkpoint, judged from its bytes without torch (a torch checkpoint is a zip
    archive whose every member's CRC holds), or None: checked before Hydra writes into the run being resumed."""
    import zipfile

    if not path.is_file():
        return f"{path} is not a file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"checkpoint {path} is not a loadable torch checkpoint ({type(exc).__name__}: {exc})"
    return f"checkpoint {path} is damaged (member {bad} fails its CRC check)" if bad is not None else None


def runs_root(pattern: str, resolved: str | Path, resolve_prefix=None) -> tuple[Path, int] | None:
    """The folder holding the runs of a timestamped run-dir pattern, and the depth of a run dir below it.

    `pattern` is the unresolved `hydra.run.dir` (`${paths.log_dir}/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}`),
    `resolved` what it resolved to for this invocation; `resolve_prefix(text)` resolves the part above the
    first `${now:` (when not given, the root is found by counting the pattern's path parts from the end).
    None when the pattern holds no `${now:`.
    """
    cut = pattern.find("${now:")
    if cut < 0:
        return None
    slash = pattern.rfind("/", 0, cut)
    head, tail = pattern[: slash + 1], pattern[slash + 1 :]
    resolved = Path(resolved)
    if resolve_prefix is not None and head:
        try:
            root = Path(resolve_prefix(head.rstrip("/") or "/"))
            depth = len(resolved.relative_to(root).parts)
            if depth >= 1:
                return root, depth
        except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved alone: count parts instead
            pass
    depth = max(1, len([p for p in tail.split("/") if p]))
    root = resolved
    for _ in range(depth):
        root = root.parent
    return root, depth


def find_unfinished_run(root: Path, depth: int, overrides: Iterable[str]) -> Path | None:
    """The run `ckpt_path=last` continues (the rule in this module's docstring), or None.

    A run whose metrics.json is not a file (a directory, a FIFO) is not finished, and is a candidate like any
    other: when it is the one chosen, the caller refuses it (`check_continuable`) rather than skip to an older run
    or start a new one behind the user's back."""
    want = comparable_overrides(overrides)
    root = Path(root)
    if not root.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for ckpt in root.glob("/".join(["*"] * depth) + "/" + LAST_CKPT.as_posix()):
        run = ckpt.parent.parent
        if is_finished(run):
            continue
        theirs = run_overrides(run)
        if theirs is None or comparable_overrides(theirs) != want:
            continue
        try:
            found.append((ckpt.stat().st_mtime_ns, run))
        except OSError:
            continue
    return max(found, key=lambda t: (t[0], str(t[1])))[1] if found else None


_WANDB_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def wandb_run_id(run_dir: str | os.PathLike) -> str | None:
    """The id of the newest W&B run (offline or online) under `<run_dir>/wandb/`, or None.

    Read from the names only: `wandb/latest-run` -> `offline-run-<time>-<id>/run-<id>.wandb`, else the
    newest `*run-<time>-<id>/` folder holding a `run-<id>.wandb`.
    """
    wandb_dir = Path(run_dir) / "wandb"
    if not wandb_dir.is_dir():
        return None
    latest = wandb_dir / "latest-run"
    if latest.is_dir():
        run_id = _id_of(latest.resolve())
        if run_id is not None:
            return run_id
    runs = []
    for folder in wandb_dir.iterdir():
        run_id = _id_of(folder)  # None unless a run folder holding its run-<id>.wandb
        if run_id is not None:
            runs.append((_WANDB_RUN_DIR.match(folder.name).group(1), folder.name, run_id))
    return max(runs)[2] if runs else None


def _id_of(folder: Path) -> str | None:
    match = _WANDB_RUN_DIR.match(folder.name)
    if match is None:
        return None
    run_id = match.group(2)
    return run_id if (folder / f"run-{run_id}.wandb").is_file() else None
