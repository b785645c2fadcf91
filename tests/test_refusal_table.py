"""Hostile inputs through the real commands, ONE table: a refused input is exit code 2 and ONE `error: ...` line on
stderr (log lines before it at most, never a traceback); a damaged CACHE is ONE warning line and a rebuild, exit 0.
Either way every user-owned file (dataset, checkpoint, storage file, previous runs, ...) is byte-identical
afterwards, and a refusal writes nothing new into the user's folders (nor a metrics.json anywhere).

Each `Case` row names the command, its arguments (`<token>`s filled in per case, see `Ctx`), how its inputs are
prepared and damaged (`prep`), the exit code and what the one line must contain; `CATEGORIES` lists what the rows
cover (a row's id starts with its category). Everything the user owns is prepared under `<tmp>/user` and
snapshotted whole; run directories go to `<tmp>/outputs`, the data cache to `<tmp>/cache` (the session's cache for
`data=synth_tiny`, where the tiny city already is).

Speed: the commands run IN-PROCESS (`run_in_process`: the function the console script calls, with sys.argv, env and
cwd set; Hydra's global state, the logging configuration Hydra installs and the entry points' module state restored
afterwards), 0.4-0.8 s a case instead of 3-10 s for a fresh interpreter. The console scripts themselves
(`siamese-train`, ... in the venv's bin/) run as real subprocesses, one case each (refused before torch loads).
`SIAMESE_REFUSAL_SUBPROCESS=1 pytest tests/test_refusal_table.py -n 0` runs EVERY row as a real subprocess (~10 min):
in-process and real runs must agree.

A row that fails is a bug in the command, not in the row: fix the command (its four first findings were fixed:
an unknown layout option, a damaged last.ckpt found after Hydra wrote into the run, a named run dir whose
metrics.json is a directory, and train's trust.allow hint listing the run's own classes).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import resource
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import make_dataset, textured_image
from tests.test_damaged_inputs import png_bomb

ALL_SUBPROCESS = os.environ.get("SIAMESE_REFUSAL_SUBPROCESS") == "1"
BIN = Path(sys.executable).parent  # the venv's bin/: python and the console scripts


# ============================================================================================ running a command


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def _main(command: str) -> Callable[[], Any]:
    """The function a command runs (the console scripts call these, the root scripts too)."""
    from siamese_retrieval import entry_points
    from siamese_retrieval.data import convert

    name = command.removeprefix("siamese-")
    return {"train": entry_points.train_main, "evaluate": entry_points.evaluate_main,
            "retrieve": entry_points.retrieve_main, "compare": entry_points.compare_main,
            "convert": convert.main, "module": entry_points.module_main}[name]


def _argv(command: str) -> list[str]:
    """The real command line of `command`: a root script, a console script, or `python -m ...`."""
    if command.startswith("siamese-"):
        return [str(BIN / command)]
    if command == "convert":
        return [sys.executable, "-m", "siamese_retrieval.data.convert"]
    if command == "module":
        return [sys.executable, "-m", "siamese_retrieval.entry_points"]
    return [sys.executable, str(ROOT / f"{command}.py")]


def run_in_process(command: str, args: list[str], env: dict[str, str], cwd: Path) -> int:
    """`command args` in this process, as its script would run it; the exit code (SystemExit's, what the function
    returned, or 1 and the traceback on stderr for an uncaught exception). Restores argv, cwd, environment, Hydra's
    global state (GlobalHydra, HydraConfig, JobRuntime), the root logger (Hydra's job logging replaces its handlers),
    logger levels, the process's image pixel limit and the entry points' module state afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobRuntime

    from siamese_retrieval import cli
    from siamese_retrieval.image_header import image_pixel_limit, max_image_pixels

    saved_hydra = HydraConfig.instance().cfg, JobRuntime.instance().conf  # e.g. a later test's hydra_mode()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: lg.level for name, lg in logging.Logger.manager.loggerDict.items()
                    if isinstance(lg, logging.Logger)}
    saved_task, saved_full = cli._task_started, list(cli._saved_full_error)
    GlobalHydra.instance().clear()
    code = 0
    with image_pixel_limit(max_image_pixels()):  # a datamodule sets the process's limit from its config
        try:
            os.environ.update(env)
            os.environ.pop("HYDRA_FULL_ERROR", None)
            sys.argv = [_argv(command)[-1], *args]
            os.chdir(cwd)
            cli._task_started = False  # a fresh process: Hydra's composition errors are exit 2, not 1
            cli._claimed_run_dir, cli._created_parents = None, []  # nor has it claimed a run directory yet
            try:
                returned = _main(command)()
                code = returned if isinstance(returned, int) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            os.environ.clear()
            os.environ.update(saved_env)
            for h in root.handlers[:]:
                if h not in saved_handlers:
                    root.removeHandler(h)
                    h.close()
            for h in saved_handlers:
                if h not in root.handlers:
                    root.addHandler(h)
            root.setLevel(saved_level)
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
            cli._task_started, cli._saved_full_error[:] = saved_task, saved_full
            HydraConfig.instance().cfg, JobRuntime.instance().conf = saved_hydra
            GlobalHydra.instance().clear()
    return code


def run_subprocess(command: str, args: list[str], env: dict[str, str], cwd: Path) -> Outcome:
    if command.startswith("siamese-") and not (BIN / command).exists():
        pytest.skip(f"{command} is not installed in {BIN}")
    full_env = {**os.environ, **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([*_argv(command), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


# ============================================================================================ what is checked


def snapshot(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under `folder` (links not followed, nothing opened but regular files): type and content hash."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out.update({os.path.relpath(p, folder): entry for entry in snapshot_entry(p).values()})
    return out


def snapshot_entry(p: Path) -> dict[str, tuple[str, str]]:
    """{"": (type, content hash or link target)} of one path; {} when nothing is there."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return {}
    if stat.S_ISLNK(st.st_mode):
        return {"": ("link", os.readlink(p))}
    if stat.S_ISDIR(st.st_mode):
        return {"": ("dir", "")}
    if stat.S_ISREG(st.st_mode):
        return {"": ("file", hashlib.sha256(p.read_bytes()).hexdigest())}
    return {"": ("other", oct(st.st_mode))}


LOG_LINE = re.compile(r"^\[[^\]]+\]\[[^\]]+\]\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] - ")


def the_error_line(outcome: Outcome, allow: tuple[str, ...] = ()) -> str:
    """The one `error:` line of a refusal: the last line of stderr; every other stderr line is a log line below
    ERROR (retrieve logs to stderr) or one the case allows; no traceback anywhere."""
    text = outcome.stdout + outcome.stderr
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], outcome.stderr[-3000:]
    for ln in lines[:-1]:
        m = LOG_LINE.match(ln)
        assert (m is not None and m.group(1) in ("DEBUG", "INFO", "WARNING")) or any(a in ln for a in allow), ln
    return errors[0]


def the_warning_line(outcome: Outcome, allow: tuple[str, ...] = ()) -> str:
    """The one WARNING log line of a rebuilt cache (stdout for train/evaluate, stderr for retrieve); other warnings
    only where the case allows them; no ERROR, no `error:` line, no traceback."""
    text = outcome.stdout + "\n" + outcome.stderr
    assert "Traceback" not in text, text[-3000:]
    assert not any(ln.startswith("error:") for ln in text.splitlines()), text[-3000:]
    levels = [(m.group(1), ln) for ln in text.splitlines() if (m := LOG_LINE.match(ln))]
    assert not [ln for lv, ln in levels if lv in ("ERROR", "CRITICAL")], text[-3000:]
    warnings = [ln for lv, ln in levels if lv == "WARNING" and not any(a in ln for a in allow)]
    assert len(warnings) == 1, warnings
    return warnings[0]


# ============================================================================================ shared inputs


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid dataset in the contract layout (2 streets x 3 database images, 2 queries each, 64 x 48)."""
    root = tmp_path_factory.mktemp("pristine") / "city"
    make_dataset(root, n_streets=2, per_street=3, queries_per_street=2, height=48, width=64)
    return root


@pytest.fixture(scope="module")
def layouts(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pristine dataset in the VPR folder layout, the official MSLS layout, and with a sparse gt.h5."""
    from siamese_retrieval.data.dataset import read_dataset, write_gt
    from siamese_retrieval.data.ground_truth import SparseRelevance
    from siamese_retrieval.data.synth.export import export_msls_official, export_vpr_folder

    out = tmp_path_factory.mktemp("layouts")
    sparse = out / "sparse"
    shutil.copytree(pristine, sparse)
    ds = read_dataset(pristine, check="none")
    write_gt(sparse / "gt.h5", None, None, SparseRelevance.from_dense(ds.sim, ds.fov))
    return {"contract": pristine, "sparse": sparse, "vpr": export_vpr_folder(pristine, out / "vpr", split="test"),
            "msls": export_msls_official(pristine, out / "msls", city=CITY)}


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb()


# the damaged-cache cases: a dataset of their own (the cache keys name its root: it is used in place, never copied),
# and for each cache kind a cache folder built once by the very command the case runs (copied into each case)
CACHE_CITY_STREETS = 5  # 5 places of 50 m: the default 0.6/0.2/0.2 split gives the verifier a training split


def cache_commands(ckpt: Path, city: Path) -> dict[str, tuple[str, list[str]]]:
    data = ["data=msls_city", f"data.root={city}"]
    query = sorted((city / "query" / "images").iterdir())[0]
    return {
        "orb": ("evaluate", ["method=orb_ransac", *data, "split=all", "logger=none"]),
        "bow": ("evaluate", ["method=orb_bow", *data, "split=all", "logger=none", "orb_bow.vocabulary_size=32",
                             "orb_bow.kmeans_samples=1000"]),
        "verifier": ("evaluate", [f"ckpt_path={ckpt}", *data, "split=test", "logger=none", "rerank=learned_matches",
                                  "rerank.network.hidden=8", "rerank.network.blocks=1", "rerank.train.epochs=1",
                                  # the verifier's cache is what is tested: combine=fused needs no trust rule
                                  # (whose fallback would render the reference city into this cache)
                                  "rerank.combine=fused"]),
        "index": ("retrieve", [f"ckpt_path={ckpt}", *data, f"query={query}", "grid.dir=null", "output=json"]),
    }


@pytest.fixture(scope="module")
def cache_world(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("cache_world")
    city = base / "city"
    make_dataset(city, n_streets=CACHE_CITY_STREETS, per_street=4, queries_per_street=2)
    ckpt = base / "model.ckpt"
    shutil.copy(tiny_checkpoint, ckpt)
    commands = cache_commands(ckpt, city)
    golden = {}
    (base / "cwd").mkdir()
    for kind, (command, args) in commands.items():
        golden[kind] = base / f"golden-{kind}"
        code = run_in_process(command, [*args, f"paths.log_dir={base / 'outputs'}"],
                              {"SIAMESE_CACHE_DIR": str(golden[kind]), "WANDB_MODE": "offline"}, base / "cwd")
        assert code == 0, kind
    return {"city": city, "ckpt": ckpt, "commands": commands, "golden": golden}


# ============================================================================================ the table's vocabulary


CITY = "synthcity"
DB_JSON, Q_JSON, GT = "database/database.json", "query/query.json", "gt.h5"
DB_IMG, Q_IMG = "database/images/s00_001.jpg", "query/images/s01_000.jpg"
MSLS_DB, MSLS_Q = f"train_val/{CITY}/database", f"train_val/{CITY}/query"


class Ctx:
    """One case's world: `user` holds every user-owned input (snapshotted whole), `out` the run directories
    (paths.log_dir), `cache` the data cache (SIAMESE_CACHE_DIR). `subs`: the `<token>`s of the arguments."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp, self.request = tmp, request
        self.user, self.out, self.cache = tmp / "user", tmp / "outputs", tmp / "cache"
        self.log_dir = self.out
        self.user.mkdir()
        self.env: dict[str, str] = {}
        self.watched: list[Path] = [self.user]  # user-owned folders outside `user` (used in place)
        self.subs: dict[str, str] = {"<tmp>": str(tmp), "<user>": str(self.user)}
        self.target: Path | None = None  # the damaged cache entry a rebuild warning must name
        self.command: tuple[str, list[str]] | None = None  # set by a prep: the command to run instead of the row's
        self.damaged: Any = None  # the damaged cache entry's state before the run

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def sub(self, token: str, value: Path | str) -> Path | str:
        self.subs[f"<{token}>"] = str(value)
        return value

    def fill(self, text: str) -> str:
        for token, value in sorted(self.subs.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(token, value)
        return text


Prep = Callable[[Ctx], None]


def prep(*steps: Prep) -> Prep:
    def run(ctx: Ctx) -> None:
        for step in steps:
            step(ctx)
    return run


def data(kind: str) -> Prep:
    """A copy of one of the `layouts` (contract, sparse, vpr, msls) as <user>/data, named by <data>."""
    def step(ctx: Ctx) -> None:
        shutil.copytree(ctx.fixture("layouts")[kind], ctx.user / "data", symlinks=True)
        ctx.sub("data", ctx.user / "data")
    return step


def ckpt(edit: Callable[[dict], None] | None = None) -> Prep:
    """The session's tiny checkpoint copied to <user>/model.ckpt (<ckpt>), its raw dict changed by `edit`."""
    def step(ctx: Ctx) -> None:
        path = ctx.user / "model.ckpt"
        if edit is None:
            shutil.copy(ctx.fixture("tiny_checkpoint"), path)
        else:
            import torch

            raw = torch.load(ctx.fixture("tiny_checkpoint"), map_location="cpu", weights_only=True)
            edit(raw)
            torch.save(raw, path)
        ctx.sub("ckpt", path)
    return step


def session_cache(ctx: Ctx) -> None:
    """data=synth_tiny: the session's cache, where the tiny city already is."""
    ctx.cache = ctx.fixture("cache_dir")


def env(**values: str) -> Prep:
    def step(ctx: Ctx) -> None:
        ctx.env.update({k: ctx.fill(v) for k, v in values.items()})
    return step


def fresh_wandb(ctx: Ctx) -> None:
    """wandb set up anew, as in a new process: an earlier test's offline setup makes wandb.login answer False."""
    import wandb

    wandb.teardown()


def write(rel: str, content: bytes | str | Callable[[Ctx], bytes]) -> Prep:
    """<user>/<rel> with these bytes (a callable: made from the case's fixtures)."""
    def step(ctx: Ctx) -> None:
        path = ctx.user / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        value = content(ctx) if callable(content) else content
        path.write_bytes(value.encode() if isinstance(value, str) else value)
    return step


def edit_bytes(rel: str, old: bytes, new: bytes) -> Prep:
    def step(ctx: Ctx) -> None:
        path = ctx.user / "data" / rel
        path.write_bytes(path.read_bytes().replace(old, new, 1))
    return step


def unlink(rel: str) -> Prep:
    return lambda ctx: (ctx.user / "data" / rel).unlink()


def symlink(rel: str, target: str) -> Prep:
    def step(ctx: Ctx) -> None:
        link = ctx.user / rel
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(ctx.fill(target))
    return step


# --------------------------------------------------------------------------------------------- VPR folder names


def vpr_rename(kind: str, fn: Callable[[str], str], index: int = 0) -> Prep:
    """Rename the index-th file of images/test/<kind>/ of the VPR copy by fn(name); <bad> is its new path."""
    def step(ctx: Ctx) -> None:
        first = sorted((ctx.user / "data" / "images" / "test" / kind).iterdir())[index]
        bad = first.with_name(fn(first.name))
        first.rename(bad)
        ctx.sub("bad", bad)
    return step


def vpr_field(i: int, value: str) -> Callable[[str], str]:
    """The i-th '@' field of a VPR file name (1: UTM_east, 2: UTM_north, 3: zone, 9: heading, 14: note)."""
    def fn(name: str) -> str:
        parts = name.split("@")
        parts[i] = value
        return "@".join(parts)
    return fn


def vpr_replace(kind: str, data_of: Callable[[Ctx], bytes]) -> Prep:
    """The bytes of the first file of images/test/<kind>/ replaced; <bad> is its path."""
    def step(ctx: Ctx) -> None:
        first = sorted((ctx.user / "data" / "images" / "test" / kind).iterdir())[0]
        first.write_bytes(data_of(ctx))
        ctx.sub("bad", first)
    return step


# --------------------------------------------------------------------------------------------- MSLS csv files


def msls_csv(rel: str, fn: Callable[[list[list[str]]], None]) -> Prep:
    def step(ctx: Ctx) -> None:
        path = ctx.user / "data" / rel
        rows = list(csv.reader(path.open(newline="")))
        fn(rows)
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    return step


def drop_column(name: str) -> Callable[[list[list[str]]], None]:
    def fn(rows: list[list[str]]) -> None:
        col = rows[0].index(name)
        for row in rows:
            del row[col]
    return fn


def set_cell(line: int, column: str, value: str) -> Callable[[list[list[str]]], None]:
    return lambda rows: rows[line - 1].__setitem__(rows[0].index(column), value)


# --------------------------------------------------------------------------------------------- gt.h5


def gt_edit(fn: Callable[[Any, int], None]) -> Prep:
    """Change the copy's gt.h5 in place (h5py, mode a): fn(file, n_database)."""
    def step(ctx: Ctx) -> None:
        import h5py

        with h5py.File(ctx.user / "data" / GT, "a") as f:
            n_db = int(f.attrs["n_database"]) if "n_database" in f.attrs else int(f["sim"].shape[1])
            fn(f, n_db)
    return step


def replace_ds(key: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[Any, int], None]:
    def fn(f: Any, n_db: int) -> None:
        old = f[key][()]
        del f[key]
        f.create_dataset(key, data=value(old))
    return fn


# --------------------------------------------------------------------------------------------- images


def encoded(ext: str) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, textured_image(np.random.default_rng(0), 48, 64))
    assert ok
    return buf.tobytes()


def claiming(ext: str, width: int, height: int) -> bytes:
    """A small real image whose header claims width x height."""
    raw = bytearray(encoded(ext))
    if ext == ".bmp":
        raw[18:26] = struct.pack("<ii", width, height)
    else:  # JPEG: the first SOFn frame header
        i = next(i for i in range(2, len(raw) - 1) if raw[i] == 0xFF and raw[i + 1] in (0xC0, 0xC1, 0xC2))
        raw[i + 5: i + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def the_bomb(ctx: Ctx) -> bytes:
    return ctx.fixture("bomb")


BOMB = "image is 30000 x 30000 = 900 Mpx, above data.max_image_pixels=50000000"


# --------------------------------------------------------------------------------------------- the Optuna storage


def storage(kind: str) -> Prep:
    """<user>/study.db (the sweep's storage) made hostile; link_*: a symbolic link to such a <user>/target.db."""
    def step(ctx: Ctx) -> None:
        target = ctx.user / ("target.db" if kind.startswith("link_") else "study.db")
        what = kind.removeprefix("link_")
        if what == "text":
            target.write_text("trial,value\n0,0.5\n")
        elif what == "truncated":  # an SQLite database of several pages, cut in half
            whole = ctx.user / "whole.db"
            con = sqlite3.connect(whole)
            con.execute("CREATE TABLE version_info (id INTEGER, note TEXT)")
            con.executemany("INSERT INTO version_info VALUES (?, ?)", [(i, "x" * 50) for i in range(500)])
            con.commit()
            con.close()
            target.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
            whole.unlink()
        elif what == "directory":
            target.mkdir()
            (target / "keep.txt").write_text("mine")
        elif what == "other_sqlite":
            con = sqlite3.connect(target)
            con.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
            con.execute("INSERT INTO invoices VALUES (1, 9.5)")
            con.commit()
            con.close()
        if kind.startswith("link_"):
            (ctx.user / "study.db").symlink_to(target)
    return step


# --------------------------------------------------------------------------------------------- previous runs (resume)


def previous_run(name: str, overrides: list[str], last: bytes | None = b"ckpt", metrics: str | None = None,
                 metrics_dir: bool = False) -> Prep:
    """A train run directory as train.py leaves it under <user>/outputs (paths.log_dir for this case): its
    .hydra/overrides.yaml (these overrides + this case's paths.log_dir), maybe checkpoints/last.ckpt, metrics.json
    (a status, or a directory). <run> is its path."""
    def step(ctx: Ctx) -> None:
        ctx.log_dir = ctx.user / "outputs"
        run = ctx.log_dir / "train" / "runs" / "2026-01-01" / name
        (run / ".hydra").mkdir(parents=True)
        listed = [*overrides, f"paths.log_dir={ctx.log_dir}"]
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in listed))
        if last is not None:
            (run / "checkpoints").mkdir()
            content = ctx.fixture("tiny_checkpoint").read_bytes() if last == b"REAL" else last
            (run / "checkpoints" / "last.ckpt").write_bytes(content)
        if metrics is not None:
            (run / "metrics.json").write_text(json.dumps({"status": metrics}))
        if metrics_dir:
            (run / "metrics.json").mkdir()
            (run / "metrics.json" / "note.txt").write_text("mine")
        ctx.sub("run", run)
    return step


def metrics_dir_in(run_dir: str) -> Prep:
    """<run_dir>/metrics.json a directory (holding the user's note.txt, watched as theirs)."""
    def step(ctx: Ctx) -> None:
        where = Path(ctx.fill(run_dir)) / "metrics.json"
        where.mkdir(parents=True)
        (where / "note.txt").write_text("mine")
        ctx.watched.append(where)
    return step


def user_log_dir(ctx: Ctx) -> None:
    ctx.log_dir = ctx.user / "outputs"
    ctx.log_dir.mkdir()


# --------------------------------------------------------------------------------------------- caches


def damaged_cache(kind: str, damage: Callable[[Path], None]) -> Prep:
    """The cache `kind` built by its command (cache_world), copied to <cache> and its entry damaged in place."""
    def step(ctx: Ctx) -> None:
        world = ctx.fixture("cache_world")
        shutil.copytree(world["golden"][kind], ctx.cache)
        ctx.watched += [world["city"], world["ckpt"]]
        ctx.command = world["commands"][kind]
        pattern = {"orb": "orb-*.npz", "bow": "orb_bow-*.npz", "verifier": "learned_matches-*.pt",
                   "index": "index/*"}[kind]
        (entry,) = [p for p in ctx.cache.glob(pattern) if not p.name.startswith(".")]
        damage(entry)
        ctx.target = entry
        ctx.damaged = _state(entry)
        ctx.sub("target", entry)
    return step


def npz_edit(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray] | bytes]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            new = fn({k: z[k] for k in z.files})
        if isinstance(new, bytes):
            path.write_bytes(new)
        else:
            with open(path, "wb") as f:
                np.savez(f, **new)
    return damage


def as_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


def index_file(fn: Callable[[Path, np.ndarray], None]) -> Callable[[Path], None]:
    def damage(entry: Path) -> None:
        fn(entry, np.load(entry / "embeddings.npy", allow_pickle=False))
    return damage


def _index_of_dim(entry: Path, emb: np.ndarray) -> None:
    import faiss

    index = faiss.IndexFlatL2(emb.shape[1] + 3)
    index.add(np.random.default_rng(0).normal(size=(emb.shape[0], emb.shape[1] + 3)).astype(np.float32))
    faiss.write_index(index, str(entry / "index.faiss"))


def _nan_embeddings(entry: Path, emb: np.ndarray) -> None:
    bad = emb.copy()
    bad[1, 0] = np.nan
    np.save(entry / "embeddings.npy", bad)


# --------------------------------------------------------------------------------------------- checkpoints


def foreign(where: str, target: str) -> Callable[[dict], None]:
    """A checkpoint whose hyper_parameters name a `_target_` that is no registered component."""
    def edit(raw: dict) -> None:
        hp = raw["hyper_parameters"]
        node = {"_target_": target}
        if where == "loss":
            hp["loss"] = node
        elif where == "nested":
            hp["loss"] = {"_target_": "siamese_retrieval.models.losses.SumOfLosses", "terms": {"x": node}}
        elif where == "inputs":
            hp["inputs"] = node
        elif where == "optimizer":
            hp["optimizer"] = {**node, "_partial_": True}
    return edit


def truncated_ckpt(ctx: Ctx) -> None:
    path = ctx.user / "model.ckpt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ============================================================================================ the table


@dataclass
class Case:
    id: str
    command: str  # train | evaluate | retrieve | compare | convert | module | siamese-<script> (always a subprocess)
    args: list[str]
    prep: Prep | None = None
    says: tuple[str, ...] = ()  # what the one line contains (<token>s filled in)
    code: int = 2  # 2: refused with one `error:` line; 0: a damaged cache rebuilt with one warning
    allow: tuple[str, ...] = ()  # other stderr lines (refusal) / other warnings (rebuild) that may appear
    bounded_memory: bool = False  # an image bomb: refused from its header, the process never near a decode's GBs
    marks: list = field(default_factory=list)


ORB = ["method=orb_ransac", "split=all", "logger=none"]  # no checkpoint: the dataset is what is read
CONTRACT = ["data=msls_city", "data.root=<data>", *ORB]
VPR = ["data=vpr_folder", "data.root=<data>", *ORB]
MSLS = ["data=msls_official", "data.root=<data>", *ORB]
TRAIN = ["data=synth_tiny", "logger=none", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
         "+trainer.limit_val_batches=2", "test=false"]
SWEEP = ["hparams_search=optuna", "hydra.sweeper.n_trials=1", *TRAIN, "hydra.sweeper.storage=sqlite:///<user>/study.db"]
RESUME = ["data=synth_tiny", "logger=none", "trainer.max_epochs=2"]
VIEWS = "data.train_views={{preset:{preset},n_streets:{n},queries_per_street:{q},first_street:{first}}}"
STORAGE = "hydra.sweeper.storage: <user>/study.db"
NOT_SQLITE = "is not an SQLite database (it does not start with the SQLite header)"
CKPT_EVAL = ["data=synth_tiny", "ckpt_path=<ckpt>", "logger=none"]
REFUSE = "it is not a registered component of this package"
NO_WANDB_LOGIN = ("logger.wandb: W&B could not start its run in mode 'online' (No API key configured); run `wandb "
                  "login` first, or log offline (the default) and upload later with `wandb sync`")
NO_CUDA = "this machine has no CUDA GPU (torch.cuda.is_available() is false); use device=auto or device=cpu"
NO_PLUGIN = "its Hydra plugin is not installed (pip install -e "

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
NOT_MAPPING = ("must be a mapping of the training city's settings (preset, n_streets, queries_per_street, "
               "first_street) or null")
CACHE_ERR = "is a file, not a directory; the cache needs a directory"
CONVERT_VPR = ["--layout", "vpr_folder", "--root", "<data>"]
CONVERT_MSLS = ["--layout", "msls_official", "--root", "<data>"]
class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


PLAIN_PICKLE = pickle.dumps({"state_dict": _RunsCode()}, protocol=4)  # not torch's zip format; names os.system
NOT_TRAINING_SPLIT = "this is not the training run's test split"  # the verifier's dataset is not the ckpt's


def without(module: str) -> pytest.MarkDecorator:
    """A row for a missing optional plugin: skipped where it is installed."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is not None, reason=f"{module} is installed")


CASES: list[Case] = [
    # ---------------------------------------------------------------- datasets: the contract layout (data=msls_city)
    Case("contract_json_cut_short", "evaluate", CONTRACT,
         prep(data("contract"), write(f"data/{DB_JSON}", '{"im_paths": [')),
         ("<data>/database/database.json", "not valid JSON")),
    Case("contract_json_not_utf8", "evaluate", CONTRACT,
         prep(data("contract"), write(f"data/{Q_JSON}", b'{"im_paths": ["caf\xe9.jpg"], "loc": [[0, 0]]}')),
         ("<data>/query/query.json", "not UTF-8 text")),
    Case("contract_image_missing", "evaluate", CONTRACT, prep(data("contract"), unlink(DB_IMG)),
         (DB_IMG, "image not found")),
    Case("contract_gt_not_hdf5", "evaluate", CONTRACT, prep(data("contract"), write(f"data/{GT}", b'{"sim": [[1]]}')),
         ("<data>/gt.h5", "not a readable HDF5 file")),
    Case("contract_fov_transposed", "evaluate", CONTRACT,
         prep(data("contract"), gt_edit(replace_ds("fov", lambda v: v.T))),
         ("<data>/gt.h5", "fov has shape (6, 4), expected (n_query, n_database) = (4, 6)")),
    # ---------------------------------------------------------------- datasets: the VPR folder layout (data=vpr_folder)
    Case("vpr_too_few_fields", "evaluate", VPR,
         prep(data("vpr"), vpr_rename("database", lambda n: "@" + "@".join(n.split("@")[3:]))),
         ("<bad>", "'@' separators")),
    Case("vpr_two_utm_zones", "evaluate", VPR, prep(data("vpr"), vpr_rename("database", vpr_field(3, "34"), index=3)),
         ("<bad>", "UTM zone 34", "all images of a split must lie in one UTM zone")),
    Case("vpr_split_not_there", "evaluate", [*VPR, "data.layout_options.split=val"], data("vpr"),
         ("<data>/images/val/database: folder not found", "splits present: test")),
    Case("vpr_no_query_images", "evaluate", VPR,
         prep(data("vpr"), lambda ctx: [p.unlink() for p in (ctx.user / "data/images/test/queries").iterdir()]),
         ("<data>/images/test/queries", "there are no queries (no .jpg files)")),
    Case("vpr_heading_rule_without_headings", "evaluate", [*VPR, "data.layout_options.max_heading_deg=40"],
         prep(data("vpr"), vpr_rename("queries", vpr_field(9, ""))), ("<bad>", "the heading field (9) is empty")),
    Case("vpr_image_is_text", "evaluate", VPR, prep(data("vpr"), vpr_replace("database", lambda ctx: b"hello\n")),
         ("<bad>", "not a decodable image")),
    Case("vpr_unknown_layout_option", "evaluate", [*VPR, "+data.layout_options.raduis_m=10"], data("vpr"),
         ("data.layout_options", "raduis_m")),
    # ---------------------------------------------------------------- datasets: the official MSLS layout
    Case("msls_column_missing", "evaluate", MSLS,
         prep(data("msls"), msls_csv(f"{MSLS_DB}/postprocessed.csv", drop_column("northing"))),
         (f"<data>/{MSLS_DB}/postprocessed.csv", "missing column(s) northing")),
    Case("msls_easting_not_a_number", "evaluate", MSLS,
         prep(data("msls"), msls_csv(f"{MSLS_DB}/postprocessed.csv", set_cell(4, "easting", "east"))),
         ("postprocessed.csv", "line 4: easting of key 'database_s00_002' is not a number: 'east'")),
    Case("msls_key_not_in_raw_csv", "evaluate", MSLS,
         prep(data("msls"), msls_csv(f"{MSLS_DB}/raw.csv", lambda rows: rows.pop(2))),
         (f"<data>/{MSLS_DB}/raw.csv", "no row for key 'database_s00_001'")),
    Case("msls_key_is_a_path", "evaluate", MSLS,
         prep(data("msls"), msls_csv(f"{MSLS_DB}/postprocessed.csv", set_cell(2, "key", "../../x"))),
         ("postprocessed.csv", "is not a usable image name")),
    Case("msls_csv_empty", "evaluate", MSLS, prep(data("msls"), write(f"data/{MSLS_Q}/postprocessed.csv", b"")),
         (f"<data>/{MSLS_Q}/postprocessed.csv", "empty file; expected a header row")),
    Case("msls_csv_not_utf8", "evaluate", MSLS,
         prep(data("msls"), edit_bytes(f"{MSLS_Q}/postprocessed.csv", b"query_s00_000", b"query_s00_\xe9")),
         (f"<data>/{MSLS_Q}/postprocessed.csv", "not UTF-8 text")),
    Case("msls_image_missing", "evaluate", MSLS, prep(data("msls"), unlink(f"{MSLS_Q}/images/query_s00_001.jpg")),
         ("query_s00_001.jpg", "not found")),
    # ---------------------------------------------------------------- sparse gt.h5 (data=msls_city)
    Case("sparse_ids_unsorted", "evaluate", CONTRACT,
         prep(data("sparse"), gt_edit(replace_ds("indices", lambda x: x[::-1]))),
         ("<data>/gt.h5", "sorted and unique")),
    Case("sparse_indptr_too_short", "evaluate", CONTRACT,
         prep(data("sparse"), gt_edit(replace_ds("indptr", lambda x: x[:-1]))), ("<data>/gt.h5", "indptr has")),
    Case("sparse_id_out_of_range", "evaluate", CONTRACT,
         prep(data("sparse"), gt_edit(lambda f, n: replace_ds("indices", lambda x: x + n)(f, n))),
         ("<data>/gt.h5", "database ids must lie in")),
    Case("sparse_n_database_wrong", "evaluate", CONTRACT,
         prep(data("sparse"), gt_edit(lambda f, n: f.attrs.__setitem__("n_database", n + 1))),
         ("<data>/gt.h5", "n_database attribute is")),
    Case("sparse_indices_2d", "evaluate", CONTRACT,
         prep(data("sparse"), gt_edit(replace_ds("indices", lambda x: x.reshape(1, -1)))),
         ("<data>/gt.h5", "must be 1-D")),
    # ---------------------------------------------------------------- python -m siamese_retrieval.data.convert
    Case("convert_newline_in_a_name", "convert", [*CONVERT_VPR, "--out", "<user>/out"],
         prep(data("vpr"), vpr_rename("queries", vpr_field(14, "night\nfog"))),
         ("cannot be converted", "contains the control character U+000A")),
    Case("convert_backslash_in_a_name", "convert", [*CONVERT_VPR, "--out", "<user>/out"],
         prep(data("vpr"), vpr_rename("queries", vpr_field(14, "a\\b"))), ("cannot be converted", "a backslash")),
    Case("convert_output_inside_input", "convert", [*CONVERT_VPR, "--out", "<data>/images/out"], data("vpr"),
         ("lies inside the source root",)),
    Case("convert_output_is_input", "convert", [*CONVERT_MSLS, "--out", "<data>", "--overwrite"], data("msls"),
         ("is the source root",)),
    Case("convert_output_holds_input", "convert", [*CONVERT_VPR, "--out", "<user>", "--overwrite"], data("vpr"),
         ("holds the source root",)),
    Case("convert_output_not_empty", "convert", [*CONVERT_MSLS, "--out", "<user>/out"],
         prep(data("msls"), write("out/keep.txt", "mine\n")),
         ("<user>/out", "already exists and is not an empty folder", "--overwrite")),
    Case("convert_output_is_a_file", "convert", [*CONVERT_VPR, "--out", "<user>/out", "--overwrite"],
         prep(data("vpr"), write("out", "a file\n")), ("already exists and is not a folder",)),
    Case("convert_output_under_a_file", "convert", [*CONVERT_VPR, "--out", "<user>/afile/out"],
         prep(data("vpr"), write("afile", "a file\n")), ("<user>/afile",)),
    Case("convert_city_for_vpr", "convert", [*CONVERT_VPR, "--out", "<user>/out", "--city", "london"], data("vpr"),
         ("--city does not apply to --layout vpr_folder",)),
    # ---------------------------------------------------------------- damaged caches: one warning, rebuilt, exit 0
    # (the command: cache_commands' entry of the cache kind, on its own dataset)
    Case("cache_orb_float_offsets", "evaluate", ["(method=orb_ransac)"],
         damaged_cache("orb", npz_edit(lambda a: {**a, "offsets": a["offsets"].astype(np.float64)})),
         ("ORB feature cache <target>", "has offsets of dtype float64", "rebuilding"), code=0),
    Case("cache_orb_empty_file", "evaluate", ["(method=orb_ransac)"],
         damaged_cache("orb", lambda p: p.write_bytes(b"")),
         ("ORB feature cache <target>", "is unreadable", "rebuilding"), code=0),
    Case("cache_vocabulary_idf_short", "evaluate", ["(method=orb_bow)"],
         damaged_cache("bow", npz_edit(lambda a: {**a, "idf": a["idf"][:-1]})),
         ("ORB vocabulary cache <target>", "has idf of dtype float32 and shape (31,)", "rebuilding"), code=0),
    Case("cache_vocabulary_not_a_zip", "evaluate", ["(method=orb_bow)"],
         damaged_cache("bow", lambda p: p.write_bytes(b"PK\x03\x04 not a zip")),
         ("ORB vocabulary cache <target>", "is unreadable", "rebuilding"), code=0),
    Case("cache_verifier_random_bytes", "evaluate", ["(rerank=learned_matches)"],
         damaged_cache("verifier", lambda p: p.write_bytes(os.urandom(2048))),
         ("learned verifier cache <target> is unusable", "refitting"), code=0, allow=(NOT_TRAINING_SPLIT,)),
    Case("cache_verifier_a_directory", "evaluate", ["(rerank=learned_matches)"],
         damaged_cache("verifier", as_directory),
         ("learned verifier cache <target> is unreadable (not a regular file)", "rebuilding"), code=0,
         allow=(NOT_TRAINING_SPLIT,)),
    Case("cache_index_wrong_dimension", "retrieve", ["(the database index)"],
         damaged_cache("index", index_file(_index_of_dim)),
         ("embedding cache <target>", "index has dimension", "rebuilding"), code=0),
    Case("cache_index_nan_embeddings", "retrieve", ["(the database index)"],
         damaged_cache("index", index_file(_nan_embeddings)),
         ("embedding cache <target>", "non-finite embeddings", "rebuilding"), code=0),
    # ---------------------------------------------------------------- the Optuna sweeper's storage (train, multirun)
    Case("storage_text_file", "train", SWEEP, prep(session_cache, storage("text")), (STORAGE, NOT_SQLITE)),
    Case("storage_truncated_sqlite", "train", SWEEP, prep(session_cache, storage("truncated")),
         (STORAGE, "is a damaged SQLite database")),
    Case("storage_directory", "train", SWEEP, prep(session_cache, storage("directory")),
         (STORAGE, "is a directory, not an SQLite database file")),
    Case("storage_symlink_to_text", "train", SWEEP, prep(session_cache, storage("link_text")),
         (STORAGE, "(a symbolic link to <user>/target.db)", NOT_SQLITE)),
    Case("storage_other_database", "train", SWEEP, prep(session_cache, storage("other_sqlite")),
         (STORAGE, "is an SQLite database of something else (tables invoices")),
    # ---------------------------------------------------------------- ckpt_path=last / a run directory (train)
    Case("resume_nothing_to_resume", "train", [*RESUME, "ckpt_path=last"], prep(session_cache, user_log_dir),
         ("ckpt_path=last: no unfinished run of these overrides under <user>/outputs/train/runs",)),
    Case("resume_only_a_finished_run", "train", [*RESUME, "ckpt_path=last"],
         prep(session_cache, previous_run("10-00-00", RESUME, metrics="ok")), ("ckpt_path=last: no unfinished run",)),
    Case("resume_damaged_last_ckpt", "train", [*RESUME, "ckpt_path=last"],
         prep(session_cache, previous_run("10-00-00", RESUME, last=b"PK\x03\x04 half a zip")),
         ("checkpoint <run>/checkpoints/last.ckpt is not a loadable torch checkpoint",),
         allow=("ckpt_path=last: resuming <run>",)),
    Case("resume_evaluate_a_plain_pickle", "siamese-evaluate",  # a real process: torch's warning would be a line
         ["data=synth_tiny", "ckpt_path=<user>/model.ckpt", "logger=none"],
         prep(session_cache, write("model.ckpt", PLAIN_PICKLE)),  # one line: no torch warning, none of its advice
         ("checkpoint <user>/model.ckpt is not a loadable torch checkpoint (the weights-only loader refused it: "
          "Unsupported operand",)),
    Case("resume_evaluate_a_run_directory", "evaluate", ["data=synth_tiny", "ckpt_path=<user>/run", "logger=none"],
         prep(session_cache, write("run/checkpoints/last.ckpt", b"x"), write("run/checkpoints/epoch03.ckpt", b"x")),
         ("checkpoint <user>/run is a directory, not a checkpoint file "
          "(its checkpoints/ holds epoch03.ckpt, last.ckpt)",)),
    Case("resume_run_dir_without_last_ckpt", "train", [*RESUME, "ckpt_path=<run>"],
         prep(session_cache, previous_run("10-00-00", RESUME, last=None)),
         ("ckpt_path: run directory <run> holds no checkpoints/last.ckpt",)),
    # ---------------------------------------------------------------- a run whose metrics.json is a directory
    Case("metrics_dir_ckpt_path_last", "train", [*RESUME, "ckpt_path=last"],
         prep(session_cache, previous_run("10-00-00", RESUME, metrics_dir=True)),
         ("ckpt_path=last: cannot continue run <run>: its metrics.json is a directory, not a file",)),
    Case("metrics_dir_ckpt_path_run_dir", "train", [*RESUME, "ckpt_path=<run>"],
         prep(session_cache, previous_run("10-00-00", RESUME, metrics_dir=True)),
         ("ckpt_path: cannot continue run <run>: its metrics.json is a directory",
          "start a new run without ckpt_path")),
    Case("metrics_dir_in_the_named_run_dir", "evaluate", [*CONTRACT, "hydra.run.dir=<tmp>/outputs/run"],
         prep(data("contract"), metrics_dir_in("<tmp>/outputs/run")), ("<tmp>/outputs/run/metrics.json", "directory")),
    # ---------------------------------------------------------------- data.train_views (train)
    Case("views_preset_bogus", "train", [*TRAIN, VIEWS.format(preset="bogus", n=2, q=2, first="null")], session_cache,
         ("data.train_views.preset='bogus': must be one of default, tiny, large",)),
    Case("views_not_a_mapping", "train", [*TRAIN, "data.train_views=abc"], session_cache,
         ("data.train_views='abc': " + NOT_MAPPING,)),
    Case("views_street_length_abc", "train", [*TRAIN, "data.train_views={preset:tiny,n_streets:1,street_length_m:abc}"],
         session_cache, ("data.train_views.street_length_m=abc: must be a number",)),
    # ---------------------------------------------------------------- image bombs (data.max_image_pixels)
    Case("bomb_in_a_dataset", "evaluate", CONTRACT, prep(data("contract"), write(f"data/{Q_IMG}", the_bomb)),
         (f"<data>/{Q_IMG}: {BOMB}",), bounded_memory=True),
    Case("bomb_as_the_query", "retrieve", ["data=synth_tiny", "ckpt_path=<ckpt>", "query=<user>/bomb.png"],
         prep(session_cache, ckpt(), write("bomb.png", the_bomb)), (f"<user>/bomb.png: {BOMB}",), bounded_memory=True),
    Case("bomb_in_a_vpr_folder", "evaluate", VPR, prep(data("vpr"), vpr_replace("queries", the_bomb)),
         (f"<bad>: {BOMB}",), bounded_memory=True),
    Case("bomb_jpeg_header_in_msls", "evaluate", MSLS,
         prep(data("msls"), write(f"data/{MSLS_DB}/images/database_s01_002.jpg", claiming(".jpg", 30000, 30000))),
         (f"database_s01_002.jpg: {BOMB}",), bounded_memory=True),
    Case("bomb_bmp_above_pillows_limit", "evaluate", CONTRACT,
         prep(data("contract"), write(f"data/{DB_IMG}", claiming(".bmp", 20000, 20000))),
         (DB_IMG, "image is above 178956970 pixels by its header, above data.max_image_pixels=50000000"),
         bounded_memory=True),
    Case("bomb_limit_refuses_ordinary_images", "evaluate", [*CONTRACT, "data.max_image_pixels=1000"], data("contract"),
         ("image is 64 x 48 = 0 Mpx, above data.max_image_pixels=1000",)),
    # ---------------------------------------------------------------- SIAMESE_CACHE_DIR / the cache keys
    Case("cachedir_env_is_a_file", "train", TRAIN,
         prep(write("afile", "not a folder\n"), env(SIAMESE_CACHE_DIR="<user>/afile")),
         ("SIAMESE_CACHE_DIR=<user>/afile: " + CACHE_ERR,)),
    Case("cachedir_env_dangling_link", "retrieve", ["data=synth_tiny", "ckpt_path=<ckpt>", "query=<user>/q.jpg"],
         prep(ckpt(), write("q.jpg", encoded(".jpg")), symlink("cachelink", "<user>/gone"),
              env(SIAMESE_CACHE_DIR="<user>/cachelink")),
         ("SIAMESE_CACHE_DIR=<user>/cachelink: is a symbolic link to <user>/gone, which does not exist",)),
    Case("cachedir_key_is_a_file", "evaluate", [*CONTRACT, "paths.cache_dir=<user>/afile"],
         prep(data("contract"), write("afile", "not a folder\n")), ("paths.cache_dir=<user>/afile: " + CACHE_ERR,)),
    Case("cachedir_index_dir_is_a_file", "retrieve", ["data=synth_tiny", "ckpt_path=<ckpt>", "query=<user>/q.jpg",
                                                   "index_cache_dir=<user>/afile"],
         prep(session_cache, ckpt(), write("q.jpg", encoded(".jpg")), write("afile", "x")),
         ("index_cache_dir=<user>/afile: " + CACHE_ERR,)),
    # ---------------------------------------------------------------- untrusted `_target_`s in a checkpoint
    Case("trust_loss_class", "evaluate", CKPT_EVAL,
         prep(session_cache, ckpt(foreign("loss", "collections.OrderedDict"))),
         ("checkpoint <ckpt>: refusing to instantiate loss._target_='collections.OrderedDict'", REFUSE,
          "trust.allow=[collections.OrderedDict]")),
    Case("trust_inputs_class", "retrieve", ["data=synth_tiny", "ckpt_path=<ckpt>", "query=<user>/q.jpg"],
         prep(session_cache, ckpt(foreign("inputs", "argparse.Namespace")), write("q.jpg", encoded(".jpg"))),
         ("refusing to instantiate inputs._target_='argparse.Namespace'", "trust.allow=[argparse.Namespace]")),
    Case("trust_nested_in_an_allowed_loss", "train", [*TRAIN, "ckpt_path=<ckpt>"],
         prep(session_cache, ckpt(foreign("nested", "fractions.Fraction"))),
         ("refusing to instantiate loss.terms.x._target_='fractions.Fraction'", "trust.allow=[fractions.Fraction]")),
    Case("trust_allow_names_another_class", "evaluate", [*CKPT_EVAL, "trust.allow=[my_pkg.Mine]"],
         prep(session_cache, ckpt(foreign("loss", "no_such_pkg.Evil"))),
         ("refusing to instantiate loss._target_='no_such_pkg.Evil'", "trust.allow=[my_pkg.Mine,no_such_pkg.Evil]")),
    # ---------------------------------------------------------------- a GPU asked for on a machine without one
    Case("device_train_gpu_recipe", "train", [*TRAIN, "experiment=gpu_recipe"], session_cache,
         ("trainer.accelerator='gpu': this machine has no GPU that Lightning can use", "trainer=default"),
         marks=[NO_GPU]),
    Case("device_evaluate_cuda", "evaluate", [*CKPT_EVAL, "device=cuda"], prep(session_cache, ckpt()),
         (f"device=cuda: {NO_CUDA}",), marks=[NO_GPU]),
    Case("device_retrieve_cuda", "retrieve",
         ["data=synth_tiny", "ckpt_path=<ckpt>", "query=<user>/q.jpg", "device=cuda"],
         prep(session_cache, ckpt(), write("q.jpg", encoded(".jpg"))), (f"device=cuda: {NO_CUDA}",), marks=[NO_GPU]),
    # ---------------------------------------------------------------- W&B asked to stream without a login
    Case("wandb_online_without_a_login", "train", ["data=synth_tiny", "trainer.max_epochs=1", "logger=wandb"],
         prep(session_cache, env(WANDB_MODE="online", WANDB_API_KEY="", HOME="<user>", WANDB_CONFIG_DIR="<user>")),
         (NO_WANDB_LOGIN,)),
    Case("wandb_online_without_a_login_evaluate", "evaluate",
         ["data=synth_tiny", "method=orb_ransac", "split=all", "logger=wandb"],  # refused before it evaluates
         prep(session_cache, fresh_wandb, env(WANDB_MODE="online", WANDB_API_KEY="", HOME="<user>", WANDB_CONFIG_DIR="<user>")),
         (NO_WANDB_LOGIN,)),
    # ---------------------------------------------------------------- a Hydra plugin's config, its extra not installed
    Case("plugin_slurm_launcher", "train", ["-m", "experiment=keypoint_vs_cnn", "hydra/launcher=slurm", "trainer=gpu"],
         None, (f"Could not load 'hydra/launcher/submitit_slurm': {NO_PLUGIN}'.[launchers]')",),
         marks=[without("hydra_plugins.hydra_submitit_launcher")]),
    Case("plugin_local_parallel_launcher", "train",
         ["-m", "experiment=keypoint_vs_cnn", "hydra/launcher=local_parallel"], None,
         (f"Could not load 'hydra/launcher/joblib': {NO_PLUGIN}'.[launchers]')",),
         marks=[without("hydra_plugins.hydra_joblib_launcher")]),
    Case("plugin_slurm_off_a_cluster", "train", ["-m", "experiment=keypoint_vs_cnn", "hydra/launcher=slurm"], None,
         ('hydra/launcher=slurm: cannot launch the jobs: Could not detect "srun", are you indeed on a slurm cluster?',),
         marks=[pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None
                                   or shutil.which("srun") is not None, reason="needs the plugin, off a cluster")]),
    # ---------------------------------------------------------------- the commands themselves (real subprocesses)
    Case("script_module_main_truncated_ckpt", "module", ["evaluate", *CKPT_EVAL],
         prep(session_cache, ckpt(), truncated_ckpt), ("checkpoint <ckpt> is not a loadable torch checkpoint",)),
    Case("script_siamese_train_views_a_list", "siamese-train", [*TRAIN, "data.train_views=[1,2]"], session_cache,
         ("data.train_views=[1, 2]: " + NOT_MAPPING,)),
    Case("script_siamese_evaluate_cache_dev_null", "siamese-evaluate", ["data=synth_tiny", *ORB],
         env(SIAMESE_CACHE_DIR="/dev/null"),
         ("SIAMESE_CACHE_DIR=/dev/null: is a special file, not a directory; the cache needs a directory",)),
    Case("script_siamese_retrieve_pixel_limit_zero", "siamese-retrieve",
         ["data=synth_tiny", "ckpt_path=<ckpt>", "query=<user>/q.jpg", "data.max_image_pixels=0"],
         prep(session_cache, ckpt(), write("q.jpg", encoded(".jpg"))),
         ("data.max_image_pixels=0: must be an integer >= 1",)),
    Case("script_siamese_compare_out_is_a_file", "siamese-compare", ["<user>/sweep", "--out", "<user>/table.md"],
         prep(write("sweep/0/metrics.json", json.dumps({"status": "ok", "metrics": {"test/recall@1": 0.5}})),
              write("sweep/0/.hydra/overrides.yaml", "- seed=0\n"), write("table.md", "mine\n")),
         ("--out <user>/table.md: exists and is not a directory",)),
]

HYDRA_COMMANDS = {"train", "evaluate", "retrieve"}


def _is_hydra(case: Case) -> bool:
    name = case.command.removeprefix("siamese-")
    return name in HYDRA_COMMANDS or (name == "module" and case.args[:1] != ["compare"])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest,
                       capfd: pytest.CaptureFixture) -> None:
    ctx = Ctx(tmp_path, request)
    if case.prep is not None:
        case.prep(ctx)
    command, args = ctx.command or (case.command, [ctx.fill(a) for a in case.args])
    if _is_hydra(case):
        args = [*args, f"paths.log_dir={ctx.log_dir}"]
    run_env = {"SIAMESE_CACHE_DIR": str(ctx.cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **ctx.env}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = {str(p): _state(p) for p in ctx.watched}
    folders_before = set(tmp_path.glob("outputs/**/"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if command.startswith("siamese-") or ALL_SUBPROCESS:
        outcome = run_subprocess(command, args, run_env, cwd)
    else:
        capfd.readouterr()
        code = run_in_process(command, args, run_env, cwd)
        out, err = capfd.readouterr()
        outcome = Outcome(code, out, err)
    assert outcome.code == case.code, (outcome.code, outcome.stderr[-3000:], outcome.stdout[-2000:])
    allow = tuple(ctx.fill(a) for a in case.allow)
    line = the_error_line(outcome, allow) if case.code == 2 else the_warning_line(outcome, allow)
    for needle in case.says:
        assert ctx.fill(needle) in line, (ctx.fill(needle), line)
    after = {str(p): _state(p) for p in ctx.watched}
    changed = {f"{p}/{rel}": (before[p].get(rel), after[p].get(rel)) for p in before
               for rel in set(before[p]) | set(after[p]) if before[p].get(rel) != after[p].get(rel)}
    assert not changed, f"user files changed or written: {changed}"
    assert os.listdir(cwd) == [], "written into the current directory"
    if case.code == 2:
        # (a metrics.json folder a row planted is no result)
        assert not [m for m in tmp_path.glob("outputs/**/metrics.json") if m.is_file()], "a refused run left results"
        # run directories and the folders above them (Hydra's .hydra/ copy in a named, existing run dir aside)
        left = sorted(str(d) for d in set(tmp_path.glob("outputs/**/")) - folders_before if d.name != ".hydra")
        assert not left, f"a refused run left its directory: {left}"
    else:
        assert ctx.target is not None and _state(ctx.target) not in (ctx.damaged, {}), "the cache was not rebuilt"
    if case.bounded_memory and not ALL_SUBPROCESS:  # decoding the bomb takes >= 900 MB (3.5 GB at peak)
        assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 300e6


def _state(path: Path) -> dict[str, tuple[str, str]]:
    """A folder's snapshot; a file (or link, or nothing) as a one-entry snapshot of itself."""
    if path.is_dir() and not path.is_symlink():
        return snapshot(path)
    return snapshot_entry(path)


CATEGORIES = {  # a case's id starts with its category
    "contract": "dataset in the contract layout (data=msls_city): damaged json / gt.h5, missing images",
    "vpr": "dataset in the VPR folder layout: file names, folders, images",
    "msls": "dataset in the official MSLS layout: damaged csv, wrong columns, missing images",
    "sparse": "sparse gt.h5: bad shapes and indices",
    "convert": "python -m siamese_retrieval.data.convert: bad names, output inside the input, non-empty output",
    "cache": "damaged caches (ORB features, orb_bow vocabulary, learned verifier, retrieve index): one warning, exit 0",
    "storage": "the Optuna sweeper's storage: text, truncated sqlite, directory, symlink, another database",
    "resume": "ckpt_path=last with nothing to resume, a damaged checkpoint, a run directory without last.ckpt",
    "metrics": "a run whose metrics.json is a directory",
    "views": "data.train_views with bad values",
    "bomb": "image bombs refused by data.max_image_pixels before decoding",
    "cachedir": "SIAMESE_CACHE_DIR / a cache key naming a file",
    "trust": "untrusted checkpoint `_target_`s (trust.allow=[...])",
    "device": "a GPU asked for on a machine without one (trainer=gpu, device=cuda)",
    "wandb": "W&B asked to stream its run (WANDB_MODE=online) on a machine without a login",
    "plugin": "a Hydra launcher whose plugin (the launchers extra) is not installed, or cannot launch here",
    "script": "the console scripts and `python -m siamese_retrieval.entry_points` themselves",
}


def test_the_table() -> None:
    """At least 60 cases, ids unique, every category present, at most 5 real subprocesses."""
    assert len(CASES) >= 60
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    per_category = {name: sum(i.startswith(name + "_") for i in ids) for name in CATEGORIES}
    assert all(per_category.values()), per_category
    assert sum(per_category.values()) == len(ids)
    assert sum(c.command.startswith("siamese-") for c in CASES) <= 5  # one per console script
    assert all("trust.allow=[" in " ".join(c.says) for c in CASES if c.id.startswith("trust_"))
