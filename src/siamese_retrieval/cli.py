"""How an entry point ends: a user error is one line on stderr and exit code 2, never a traceback;
in a sweep, a failed job is recorded (metrics.json, W&B, the sweeper's worst value) and the others go on."""

from __future__ import annotations

import difflib
import errno
import functools
import logging
import math
import os
import shutil
import stat
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.experimental.callback import Callback as _HydraCallback
from omegaconf import DictConfig, OmegaConf, read_write

from siamese_retrieval.errors import UserError, fail, first_line
from siamese_retrieval.run_outputs import check_writable_dir, hydra_mode, task_overrides, write_metrics_json

log = logging.getLogger(__name__)


_task_started = False


def report_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Bad input ends in one clear line on stderr and exit code 2 (a sweep job is marked failed instead).

    The composed config is checked against the typed configs (configs/) first, before the task imports
    torch: a wrong type or range costs a second, not a city generation.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        global _task_started
        _task_started = True
        _restore_full_error()  # the task's own crashes: Hydra reports them as before
        try:
            from siamese_retrieval.configs import check_config
            from siamese_retrieval.registry import import_user_modules

            import_user_modules(cfg.get("imports"))  # the user's own components register themselves first
            for warning in check_config(cfg, str(cfg.get("task_name", ""))):
                log.warning(warning)
            check_cache_dirs(cfg)
            return sweeper_value(task(cfg))
        except UserError as exc:
            if hydra_mode() == "MULTIRUN":
                return sweeper_value(mark_job_failed(cfg, str(exc)))
            remove_unused_run_dir(output_dir(cfg))
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - a multirun job's crash must not stop the sweep's other jobs
            message = storage_error(exc, output_dir(cfg))  # full disk / unwritable place: one line too
            if message is not None:
                if hydra_mode() == "MULTIRUN":
                    return sweeper_value(mark_job_failed(cfg, message))
                fail(message)
            if hydra_mode() != "MULTIRUN":
                raise
            log.exception("job crashed")
            return sweeper_value(mark_job_failed(cfg, f"{type(exc).__name__}: {exc}"))

    return wrapper


CACHE_ENV = "SIAMESE_CACHE_DIR"  # conf/paths/default.yaml: paths.cache_dir's default
CACHE_KEYS = ("paths.cache_dir", "data.cache_dir", "index_cache_dir")  # data.cache_dir, index_cache_dir: from it


def check_cache_dirs(cfg: DictConfig) -> None:
    """The cache directories of the config must be directories, or not exist yet (they are created on first
    use): a file there, or on the way there, is one UserError naming where the path came from (the
    SIAMESE_CACHE_DIR variable, else the config key), before anything is generated. Nothing is touched."""
    env = os.environ.get(CACHE_ENV)
    seen = set()
    for key in CACHE_KEYS:
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved: the task reports it
            continue
        if value in (None, "") or str(value) in seen:
            continue
        seen.add(str(value))
        problem = not_a_directory(Path(str(value)).expanduser())
        if problem is not None:
            name = CACHE_ENV if env is not None and key == "paths.cache_dir" and str(value) == env else key
            raise UserError(f"{name}={value}: {problem}; the cache needs a directory (set {name} to one)")


def not_a_directory(path: Path) -> str | None:
    """Why `path` cannot be (made) a directory: it, or the first of its parents that exists, is something else;
    None when it is a directory or can be created (permissions aside: those are reported where it is written)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):  # a dangling link: mkdir(exist_ok=True) fails on it
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        st = None
    except NotADirectoryError:
        st = None
    except OSError:
        return None
    if st is not None:
        return None if stat.S_ISDIR(st.st_mode) else f"is {_kind(st.st_mode)}, not a directory"
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        return None if stat.S_ISDIR(st.st_mode) else f"{parent} is {_kind(st.st_mode)}, not a directory"
    return None


def _kind(mode: int) -> str:
    return "a file" if stat.S_ISREG(mode) else "a special file" if not stat.S_ISLNK(mode) else "a link"


FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
LEAF_CUTOFF = 0.8  # difflib ratio: `heigth` ~ `height` (0.83), `lr` ~ `lr`; `foo` ~ nothing
_saved_full_error: list[str | None] = []  # the user's HYDRA_FULL_ERROR while this process overrides it
NEEDS_QUOTES = set("()<>#!&;^~`")  # in an override's value, these (and non-ASCII letters) need Hydra's quotes
# Hydra plugins' configs, and the pyproject extra that installs each (missing, Hydra only says it cannot load them)
PLUGIN_EXTRAS = {"hydra/launcher/submitit_": "launchers", "hydra/launcher/joblib": "launchers",
                 "hydra/sweeper/optuna": "optuna"}


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function; Hydra's own errors (unknown key, unknown group option, a bad override)
    are one `error:` line with exit code 2 like every user error, instead of Hydra's several lines and 1.
    A failure inside the task keeps its code; Ctrl-C is one `interrupted` line and 130, not a traceback.

    Hydra prints its errors itself unless HYDRA_FULL_ERROR=1, when it raises them: set until the task starts,
    so its composition errors reach us as exceptions with the config node that refused the key (for "did you
    mean"). A user's own HYDRA_FULL_ERROR=1 keeps Hydra's full traceback.
    """
    if os.environ.get(FULL_ERROR_ENV) != "1":
        _saved_full_error.append(os.environ.get(FULL_ERROR_ENV))
        os.environ[FULL_ERROR_ENV] = "1"
    try:
        main()
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (train.py says how to continue), the shell's exit code 130
        print(f"interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 1 and not _task_started:
            sys.exit(2)
        raise
    except Exception as exc:
        if _task_started or not _saved_full_error:
            raise
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(exc, (HydraException, OmegaConfBaseException)):
            line = null_group_override(exc, sys.argv[1:]) or launcher_error(exc, sys.argv[1:])
            if line is None:
                traceback.print_exc()  # not a config error Hydra knows: as Hydra would print it, exit 2 as before
                sys.exit(2)
            remove_unused_run_dir(_claimed_run_dir)  # a sweep refused by its launcher: only multirun.yaml is there
            fail(line)
        fail(hydra_error_line(exc))
    finally:
        _restore_full_error()


def null_group_override(exc: BaseException, argv: list[str]) -> str | None:
    """`rerank=null` (a config group set to null) is a ValueError deep in Hydra's defaults list: one line naming
    the override and what to type instead; None for any other exception."""
    if not (isinstance(exc, ValueError) and "Config group override must be a string or a list" in str(exc)):
        return None
    nulls = [a for a in argv if a.partition("=")[2].strip().lower() in ("null", "~")
             and "." not in a.partition("=")[0] and not a.startswith(("+", "~", "hydra"))]
    shown = ", ".join(nulls) or "a config group set to null"
    groups = " or ".join(f"~{a.partition('=')[0]}" for a in nulls) or "~GROUP"
    return (f"{shown}: a config group takes an option name, not null; leave the override out for the default, "
            f"or remove the group with {groups}")


def launcher_error(exc: BaseException, argv: list[str]) -> str | None:
    """A launcher plugin that cannot start the jobs on this machine (`hydra/launcher=slurm` off a SLURM cluster:
    submitit's `Could not detect "srun"`) in one line naming the launcher; None for an exception from elsewhere."""
    if not any("hydra_plugins" in Path(frame.filename).parts for frame in traceback.extract_tb(exc.__traceback__)):
        return None
    launcher = next((a for a in argv if a.startswith("hydra/launcher=")), "hydra/launcher")
    return f"{launcher}: cannot launch the jobs: {first_line(exc)}"


def _restore_full_error() -> None:
    """HYDRA_FULL_ERROR as the user left it (the task, and the processes it starts, see theirs)."""
    if not _saved_full_error:
        return
    value = _saved_full_error.pop()
    if value is None:
        os.environ.pop(FULL_ERROR_ENV, None)
    else:
        os.environ[FULL_ERROR_ENV] = value


def hydra_error_line(exc: BaseException) -> str:
    """Hydra's message for a bad command line in one line, in Hydra's words, plus the nearest valid key or
    group option ("did you mean ...?") when one is close.

    `Could not override 'trainer.max_epoch': key 'max_epoch' is not in struct (did you mean trainer.max_epochs?)`
    """
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    plugin = next((extra for path, extra in PLUGIN_EXTRAS.items() if f"'{path}" in (lines or [""])[0]), None)
    if plugin is not None:
        return f"{lines[0].rstrip('.')}: its Hydra plugin is not installed (pip install -e '.[{plugin}]')"
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, name = str(exc.missing_cfg_file).rpartition("/")
        options = [str(o) for o in exc.options]
        text = f"{lines[0]}; available options in '{group}': {', '.join(options)}"
        close = difflib.get_close_matches(name, options, n=1)
        return text + (f" (did you mean {group}={close[0]}?)" if close else "")
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException):  # Hydra prints the cause's first line too
        reason = str(cause).strip().splitlines()
        if reason:
            lines.insert(1, reason[0])
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            suggestion = nearest_key(cause, _quoted(lines[0]))
            if suggestion is not None:  # Hydra's "To append to your config use +<typo>" no longer fits
                return _joined_lines(lines[:2]) + f" (did you mean {suggestion}?)"
    text = _joined_lines(lines) if lines else type(exc).__name__
    return text + quoting_hint(exc)


def quoting_hint(exc: BaseException) -> str:
    """An override Hydra could not parse because its value holds a character its grammar wants quoted (a file
    name such as `Zürich (1).jpg`): how to quote it, for the shell and for Hydra. Empty for any other error."""
    from hydra.errors import OverrideParseException

    key, _, value = str(getattr(exc, "override", "")).partition("=")
    if (not isinstance(exc, OverrideParseException) or value.startswith(("'", '"', "[", "{"))
            or not any(not c.isascii() or c in NEEDS_QUOTES for c in value)):
        return ""
    quoted = value.replace("\\", "\\\\").replace('"', '\\"')
    return f"; quote such a value: '{key}=\"{quoted}\"'"


def nearest_key(error: Exception, wanted: str | None = None) -> str | None:
    """The config key closest to the one a KeyError-like OmegaConf error refused, as a full dotted path.

    First among the keys of the node that refused it (`trainer.max_epoch` -> `trainer.max_epochs`,
    `trainr.max_epochs` -> `trainer.max_epochs`), else the dotted path of the config whose last part is
    closest (`devices` -> `trainer.devices`, `lr` -> `model.module.optimizer.lr`); None when nothing is close.
    `wanted` is the override's whole key, when the refused key is only its first unknown part.
    """
    parent, key = getattr(error, "parent_node", None), getattr(error, "key", None)
    if not isinstance(parent, DictConfig) or key is None:
        return None
    key = str(key)
    full_key = str(getattr(error, "full_key", None) or key)
    wanted = wanted if wanted and wanted.startswith(full_key) else full_key
    prefix = full_key[: -len(key)] if full_key.endswith(key) else ""
    paths = set(_dotted_paths(OmegaConf.to_container(parent._get_root(), resolve=False)))
    close = difflib.get_close_matches(key, [str(k) for k in parent.keys()], n=1)
    if close and prefix + close[0] + wanted[len(full_key):] in paths:
        return prefix + close[0] + wanted[len(full_key):]
    # elsewhere: the path whose last part is closest to the wanted one's (a shared parent alone is no match),
    # the closest whole path among equals; Hydra's own settings only for a key under hydra.
    own = _under_hydra(wanted)
    scored = [(_similarity(_leaf(wanted), _leaf(p)), _similarity(wanted, p), p) for p in sorted(paths)
              if own or not _under_hydra(p)]
    best = max((s for s in scored if s[0] >= LEAF_CUTOFF), default=None)
    return best[2] if best is not None else None


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _under_hydra(path: str) -> bool:
    return path == "hydra" or path.startswith("hydra.")


def _dotted_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a nested dict as a dotted path, nodes and leaves (list items are no keys)."""
    if isinstance(node, dict):
        for k, value in node.items():
            yield f"{prefix}{k}"
            yield from _dotted_paths(value, f"{prefix}{k}.")


def _quoted(text: str) -> str | None:
    """The first 'quoted' part of a message (Hydra's `Could not override 'a.b'.`)."""
    parts = text.split("'")
    return parts[1] if len(parts) >= 3 else None


def _joined_lines(lines: list[str]) -> str:
    """`First.` + `Second line.` -> `First: second line`: Hydra's lines joined, without its trailing dots."""
    def tidy(ln: str) -> str:
        ln = ln.rstrip(".")
        return ln[:1].lower() + ln[1:] if ln[1:2].islower() else ln

    head, rest = lines[0].rstrip("."), [tidy(ln) for ln in lines[1:]]
    return head + (": " + "; ".join(rest) if rest else "")


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


class OutputDirCheck(_HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): every run gets a directory of its own, and an unusable
    run/sweep directory is one clear line, exit 2.

    Hydra names run directories by the second (`${now:...}`), so two runs started in the same second would
    share one and overwrite each other's metrics.json and config. When the directory comes from such a
    timestamp pattern, the run claims it with an atomic mkdir and takes `<dir>-1`, `<dir>-2`, ... when
    another run holds it; a sweep whose directory is taken refuses to start. A directory named explicitly
    (`hydra.run.dir=...`) is used as it is. Hydra creates the directory (and its log file) after this, and
    would report a failure there as a traceback.

    Resuming (train only, timestamped run dirs): `ckpt_path=last` continues the newest unfinished run of the
    same overrides (resume.py) and `ckpt_path=<run dir>` that run; either way this run's directory becomes
    that run's, so the log, .hydra/, checkpoints, metrics.json and the W&B run stay in one place.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Claim (or resume) the run directory; a UserError is one line and exit 2, not Hydra's traceback."""
        global _claimed_run_dir, _created_parents
        try:
            path = str(config.hydra.run.dir)
            if _timestamped(config.hydra.run, "dir"):
                resumed = _resumed_run_dir(config)
                path = str(resumed) if resumed is not None else _claim(path, unique=True)
                _claimed_run_dir = None if resumed is not None else path
                with read_write(config.hydra.run):
                    config.hydra.run.dir = path
            elif not Path(path).exists():  # a fixed or named folder this run creates (retrieve's outputs/retrieve)
                _claimed_run_dir = path
                _created_parents = _missing_parents(path)
            check_writable_dir(path)
        except UserError as exc:
            fail(str(exc))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the sweeper's storage, claim the sweep directory; a UserError is one line, exit 2."""
        from siamese_retrieval.sweeper_storage import check_sweeper_storage

        global _claimed_run_dir
        try:
            check_sweeper_storage(config)  # an unusable Optuna storage file: refused before the sweep dir is made
            path = str(config.hydra.sweep.dir)
            if _timestamped(config.hydra.sweep, "dir"):
                _claimed_run_dir = _claim(path, unique=False)
            check_writable_dir(path)
        except UserError as exc:
            fail(str(exc))


def _resumed_run_dir(config: DictConfig) -> Path | None:
    """The run directory a training run continues (`ckpt_path=last` / `ckpt_path=<run dir>`), else None.

    UserError when `ckpt_path=last` finds no run to continue, a directory holds no last.ckpt, or the run to
    continue could not record its result (before any training).
    """
    from siamese_retrieval.resume import LAST_CKPT, check_continuable, find_unfinished_run, runs_root

    if config.get("task_name") != "train":
        return None
    ckpt_path = config.get("ckpt_path")
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        pattern = str(OmegaConf.to_container(config.hydra.run, resolve=False)["dir"])
        root, depth = runs_root(pattern, str(config.hydra.run.dir),
                                lambda text: OmegaConf.create({"v": text}, parent=config).v)
        found = find_unfinished_run(root, depth, list(config.hydra.overrides.task))
        if found is None:
            raise UserError(f"ckpt_path=last: no unfinished run of these overrides under {root}; "
                            f"start one without ckpt_path")
        check_continuable(found, "ckpt_path=last")
        print(f"ckpt_path=last: resuming {found}", file=sys.stderr)
        return found
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_dir():
        return None  # a checkpoint file: a new run directory
    if not (path / LAST_CKPT).is_file():
        raise UserError(f"ckpt_path: run directory {ckpt_path} holds no {LAST_CKPT.as_posix()}")
    check_continuable(path, "ckpt_path")
    return path


_claimed_run_dir: str | None = None  # the timestamped run or sweep directory this process created (OutputDirCheck)
_created_parents: list[Path] = []  # the folders above it that claiming it created (outputs/eval/runs/<date>/...)


def remove_unused_run_dir(path: str | None) -> None:
    """A refused run leaves no directory behind: the one this process claimed is removed while it holds only
    what Hydra wrote before the refusal (.hydra/ and the log; a sweep's multirun.yaml), with the folders above it
    that claiming it created, where they are left empty (its date folder; `outputs/eval/runs` in a new folder).
    A directory that existed before (`hydra.run.dir=` an existing folder, a resumed run) is never touched."""
    if path is None or _claimed_run_dir is None or Path(path).resolve() != Path(_claimed_run_dir).resolve():
        return
    run_dir = Path(path)
    if not run_dir.is_dir() or any(p.name not in (".hydra", "multirun.yaml") and p.suffix != ".log"
                                   for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in _created_parents:  # deepest first
        try:
            folder.rmdir()  # only when empty
        except OSError:
            break


def _timestamped(node: DictConfig, key: str) -> bool:
    raw = OmegaConf.to_container(node, resolve=False).get(key)
    return isinstance(raw, str) and "${now:" in raw


def _missing_parents(path: str) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first: made by creating it, removed on a refusal."""
    return [p for p in Path(path).absolute().parents if not p.exists()]


def _claim(path: str, unique: bool) -> str:
    """Create `path` atomically; when it exists, `path-1`, `path-2`, ... (unique) or refuse (UserError)."""
    global _created_parents
    base = Path(path)
    _created_parents = _missing_parents(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return path  # check_writable_dir reports it
    for n in range(1000):
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            if not unique:
                raise UserError(f"sweep directory {base} is already used by another sweep started in the same "
                                f"second; start this one again")
        except OSError:
            return str(candidate)  # check_writable_dir reports it
    return path
