"""Configs and files that used to crash the real entry points with a traceback (a red team's findings).

Each case runs `python train.py|evaluate.py ...` from the repository root as a subprocess and expects either
ONE `error: ...` line on stderr with exit code 2 (a user error), or success (a valid config never crashes);
the user's files it names are left untouched (byte-identical).

    learned verifier     rerank.train.epochs=1 / 2, one optimiser step: the one-cycle schedule is defined for
                         every step count (10 steps divided 0 by 0)                     retrieval/verifier_fit.py
    data.train_views.*   checked like every knob (configs/: TrainViews), and again by data/train_views.py
    instantiation        a node the config cannot build (bad keyword, missing import, refused value) names the
                         node, its target and the reason (errors.instantiate_config); a bug keeps its traceback
    Optuna storage       a text / truncated sqlite file, a directory, links to them: refused before the sweep
                         (entry_points.check_sweeper_storage); a new or valid study still runs
    SIAMESE_CACHE_DIR    a file (or a path under one): one line naming the variable (cli.check_cache_dirs)
    resume               a run whose metrics.json is a directory is refused before training (resume.py)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT

TRAIN = ["data=synth_tiny", "logger=none", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
         "+trainer.limit_val_batches=2", "test=false"]
EVALUATE = ["data=synth_tiny", "logger=none", "rerank=learned_matches", "rerank.network.hidden=8",
            "rerank.network.blocks=1",  # the default training pairs: 5 batches of 64 per epoch on the tiny city
            "rerank.combine=fused"]  # the verifier's schedule is what is tested, not the trust rule
SWEEP = ["hparams_search=optuna", "hydra.sweeper.n_trials=1", *TRAIN]


def run(script: str, args: list[str], log_dir: Path, cache_dir: Path, env: dict[str, str] | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, script, *args, f"paths.log_dir={log_dir}"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess, expected: str | re.Pattern) -> None:
    """Exit code 2, no traceback, exactly one `error:` line, the last line: `expected` (or matching it)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and lines, proc.stderr[-3000:]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, proc.stderr[-3000:]
    if isinstance(expected, str):
        assert lines[-1] == expected, proc.stderr[-3000:]
    else:
        assert expected.fullmatch(lines[-1]), lines[-1]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, proc.stderr[-3000:]


def snapshot(path: Path) -> object:
    """What a user's file or directory is: link target, kind, content hash (a directory: its listing)."""
    link = os.readlink(path) if path.is_symlink() else None
    if path.is_dir():
        return link, "dir", sorted(p.name for p in path.iterdir())
    if path.is_file():
        return link, "file", hashlib.sha256(path.read_bytes()).hexdigest()
    return link, "missing" if not os.path.lexists(path) else "other", None


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    script: str
    args: list[str]
    expected: str | re.Pattern | None  # None: success; `{tmp}` in a string: the case's tmp_path
    setup: Callable[[Path], dict] | None = None  # -> {"env": {...}, "files": [paths left untouched]}
    needs_checkpoint: bool = False
    marks: list = field(default_factory=list)


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _optuna_db(path: Path, trials: int = 0) -> Path:
    """An Optuna study storage of the default study name (model keypoint_snn on synth_tiny)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="keypoint_snn-synth_tiny", storage=f"sqlite:///{path}",
                                direction="maximize")
    for _ in range(trials):
        trial = study.ask()
        study.tell(trial, 0.5)
    del study
    return path


def _storage(kind: str) -> Callable[[Path], dict]:
    """A bad sweeper storage at {tmp}/study.db: text, truncated sqlite, directory, or a link to one of them."""

    def setup(tmp: Path) -> dict:
        target = tmp / ("target.db" if kind.startswith("link_") else "study.db")
        what = kind.removeprefix("link_")
        if what == "text":
            target.write_text("trial,value\n0,0.5\n")
        elif what == "truncated":
            good = _optuna_db(tmp / "good.db", trials=2).read_bytes()
            target.write_bytes(good[: len(good) // 2])
        elif what == "directory":
            target.mkdir()
            (target / "keep.txt").write_text("mine")
        files = [target]
        if kind.startswith("link_"):
            (tmp / "study.db").symlink_to(target)
            files.append(tmp / "study.db")
        return {"files": files}

    return setup


def _cache_file(under: bool) -> Callable[[Path], dict]:
    def setup(tmp: Path) -> dict:
        path = _file(tmp, "afile", b"not a folder\n")
        return {"env": {"SIAMESE_CACHE_DIR": str(path / "sub" if under else path)}, "files": [path]}

    return setup


def _failing_callback(tmp: Path) -> dict:
    (tmp / "boom_cb.py").write_text("class Boom:\n    def __init__(self):\n        raise RuntimeError('a bug')\n")
    return {"env": {"PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}}


def _new_study(tmp: Path) -> dict:
    return {"files": []}


def _valid_study(tmp: Path) -> dict:
    _optuna_db(tmp / "study.db")
    return {}


VIEWS = "data.train_views={{preset:{preset},n_streets:{n},queries_per_street:{q},first_street:{first}}}"
STORAGE = "hydra.sweeper.storage=sqlite:///{tmp}/study.db"
STORAGE_ERROR = (r"error: hydra\.sweeper\.storage: {path}{link} {what}; it was left as it is: move it away, or set "
                 r"hydra\.sweeper\.storage=sqlite:///<another file> \(a new file starts a new study\)")


def storage_error(what: str, link: bool = False) -> str:
    return STORAGE_ERROR.format(path=r"\S+/study\.db", link=r" \(a symbolic link to \S+/target\.db\)" if link else "",
                                what=what)


NOT_SQLITE = r"is not an SQLite database \(it does not start with the SQLite header\)"
DAMAGED = r"is a damaged SQLite database \(.+\)"
DIRECTORY = r"is a directory, not an SQLite database file"
CACHE_ERROR = ("error: SIAMESE_CACHE_DIR={tmp}/afile{sub}: {prefix}is a file, not a directory; the cache needs a "
               "directory (set SIAMESE_CACHE_DIR to one)")
SLOW = [pytest.mark.slow]

CASES = [
    # 1. the learned verifier's one-cycle schedule (10 steps divided by zero)
    Case("lm_epochs_1", "evaluate.py", [*EVALUATE, "rerank.train.epochs=1"], None, needs_checkpoint=True, marks=SLOW),
    Case("lm_epochs_2", "evaluate.py", [*EVALUATE, "rerank.train.epochs=2"], None, needs_checkpoint=True, marks=SLOW),
    Case("lm_one_step", "evaluate.py", [*EVALUATE, "rerank.train.epochs=1", "rerank.train.batch_pairs=100000"], None,
         needs_checkpoint=True, marks=SLOW),
    # 2. the training-only city's knobs
    Case("views_n_streets_abc", "train.py", [*TRAIN, VIEWS.format(preset="default", n="abc", q=2, first="null")],
         "error: data.train_views.n_streets=abc: must be an integer >= 1"),
    Case("views_preset_bogus", "train.py", [*TRAIN, VIEWS.format(preset="bogus", n=2, q=2, first="null")],
         "error: data.train_views.preset='bogus': must be one of default, tiny, large"),
    Case("views_queries_0", "train.py", [*TRAIN, VIEWS.format(preset="tiny", n=2, q=0, first="null")],
         "error: data.train_views.queries_per_street=0: must be an integer >= 1"),
    Case("views_first_street_negative", "train.py", [*TRAIN, VIEWS.format(preset="tiny", n=2, q=2, first=-1)],
         "error: data.train_views.first_street=-1: must be an integer >= 0 or null"),
    Case("views_not_a_mapping", "train.py", [*TRAIN, "data.train_views=abc"],
         "error: data.train_views='abc': must be a mapping of the training city's settings (preset, n_streets, "
         "queries_per_street, first_street) or null"),
    Case("model_views_n_streets_abc", "train.py", [*TRAIN, "model=cnn_snn", "model.train_views.n_streets=abc"],
         "error: model.train_views.n_streets=abc: must be an integer >= 1"),
    Case("views_other_field_by_train_views_py", "train.py",
         [*TRAIN, "data.train_views={preset:tiny,n_streets:1,street_length_m:abc}"],
         "error: data.train_views.street_length_m=abc: must be a number"),
    Case("views_valid", "train.py", [*TRAIN, VIEWS.format(preset="tiny", n=1, q=2, first="null")], None,
         marks=SLOW),  # test_train_views.py trains with a training-only city in the default suite
    # 3. a node the config cannot build
    Case("trainer_unknown_keyword", "train.py", [*TRAIN, "+trainer.no_such_arg=1"],
         "error: trainer: cannot build pytorch_lightning.Trainer: Trainer.__init__() got an unexpected keyword "
         "argument 'no_such_arg'", marks=SLOW),  # encoder_unknown_keyword: the same refusal, one node deeper
    Case("trainer_refuses_precision", "train.py", [*TRAIN, "trainer.precision=transformer-engine"],  # the schema's
         re.compile(r"error: trainer: cannot build pytorch_lightning\.Trainer: Requirement 'transformer_engine.+"),
         marks=[*SLOW, pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                                          reason="transformer_engine is installed: Lightning accepts the precision")]),
    Case("trainer_refuses_accelerator", "train.py", [*TRAIN, "trainer.accelerator=tpu"],
         re.compile(r"error: trainer: cannot build pytorch_lightning\.Trainer: .+"), marks=SLOW),
    Case("callback_does_not_import", "train.py", [*TRAIN, "+callbacks.mine._target_=no_such_pkg.Callback"],
         "error: callbacks.mine: cannot build no_such_pkg.Callback: No module named 'no_such_pkg'"),
    Case("encoder_unknown_keyword", "train.py", [*TRAIN, "+model.module.encoder.bogus=1"],
         "error: model.module.encoder: cannot build siamese_retrieval.models.keypoint_mlp.KeypointMLP: "
         "KeypointMLP.__init__() got an unexpected keyword argument 'bogus'"),
    Case("optimizer_unknown_keyword", "train.py", [*TRAIN, "+model.module.optimizer.momentum=0.9"],
         "error: model.module.optimizer: cannot build torch.optim.Adam: Adam.__init__() got an unexpected keyword "
         "argument 'momentum'", marks=SLOW),
    Case("logger_missing_argument", "train.py", [*TRAIN, "+logger.csv._target_=pytorch_lightning.loggers.CSVLogger"],
         "error: logger.csv: cannot build pytorch_lightning.loggers.CSVLogger: CSVLogger.__init__() missing 1 "
         "required positional argument: 'save_dir'", marks=SLOW),
    # 4. the Optuna sweeper's sqlite storage
    Case("storage_text_file", "train.py", [*SWEEP, STORAGE], re.compile(storage_error(NOT_SQLITE)), _storage("text")),
    Case("storage_truncated", "train.py", [*SWEEP, STORAGE], re.compile(storage_error(DAMAGED)), _storage("truncated")),
    Case("storage_directory", "train.py", [*SWEEP, STORAGE], re.compile(storage_error(DIRECTORY)),
         _storage("directory")),
    Case("storage_link_to_text", "train.py", [*SWEEP, STORAGE], re.compile(storage_error(NOT_SQLITE, link=True)),
         _storage("link_text")),
    Case("storage_link_to_truncated", "train.py", [*SWEEP, STORAGE], re.compile(storage_error(DAMAGED, link=True)),
         _storage("link_truncated")),
    Case("storage_link_to_directory", "train.py", [*SWEEP, STORAGE], re.compile(storage_error(DIRECTORY, link=True)),
         _storage("link_directory")),
    Case("storage_new_study", "train.py", [*SWEEP, STORAGE], None, _new_study, marks=SLOW),
    Case("storage_valid_study", "train.py", [*SWEEP, STORAGE], None, _valid_study, marks=SLOW),  # README's optuna test: default
    # 5. the data cache
    Case("cache_dir_is_a_file", "train.py", TRAIN, CACHE_ERROR.format(tmp="{tmp}", sub="", prefix=""),
         _cache_file(under=False)),
    Case("cache_dir_under_a_file", "evaluate.py", ["data=synth_tiny", "method=orb_ransac", "logger=none"],
         CACHE_ERROR.format(tmp="{tmp}", sub="/sub", prefix="{tmp}/afile "), _cache_file(under=True)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_config_case(case: Case, tmp_path: Path, cache_dir: Path, request: pytest.FixtureRequest) -> None:
    prepared = case.setup(tmp_path) if case.setup is not None else {}
    args = [a.format(tmp=tmp_path) if "{tmp}" in a else a for a in case.args]
    if case.needs_checkpoint:
        args.append(f"ckpt_path={request.getfixturevalue('tiny_checkpoint')}")
    files = prepared.get("files", [])
    before = [snapshot(p) for p in files]
    proc = run(case.script, args, tmp_path / "outputs", cache_dir, prepared.get("env"))
    if case.expected is None:
        assert_ok(proc)
    else:
        expected = case.expected.format(tmp=tmp_path) if isinstance(case.expected, str) else case.expected
        assert_one_line(proc, expected)
        assert not any((tmp_path / "outputs").rglob("metrics.json")), "a refused run left results"
    assert [snapshot(p) for p in files] == before, "a user file was changed"
    if case.id.startswith("storage_") and case.expected is not None:
        assert not (tmp_path / "outputs").exists(), "a refused sweep left its sweep directory behind"
    if case.id == "storage_valid_study":
        import optuna

        study = optuna.load_study(study_name="keypoint_snn-synth_tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE"]


def test_a_bug_in_a_constructor_keeps_its_traceback(tmp_path: Path, cache_dir: Path) -> None:
    """Only what the config caused is one line: a constructor that crashes (RuntimeError) is reported as Hydra
    reports a crash, exit code 1, not as a user error."""
    proc = run("train.py", [*TRAIN, "+callbacks.boom._target_=boom_cb.Boom"], tmp_path / "outputs", cache_dir,
               _failing_callback(tmp_path)["env"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError" in proc.stderr and "a bug" in proc.stderr
    assert not any(ln.startswith("error:") for ln in proc.stderr.splitlines())


def test_one_cycle_schedule_is_defined_for_every_step_count() -> None:
    """The verifier's schedule at 1 .. 300 optimiser steps (epochs x batches): every step has a learning rate
    in (0, lr]; torch's OneCycleLR alone divides by zero at 10 steps (pct_start 0.1)."""
    import warnings

    import torch

    from siamese_retrieval.retrieval.verifier_fit import one_cycle

    for steps in range(1, 301):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=0.003)
        sched = one_cycle(opt, 0.003, steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(steps):
                assert 0 < opt.param_groups[0]["lr"] <= 0.003 + 1e-12, steps
                opt.step()
                sched.step()


def test_train_views_py_refuses_what_slips_past_the_schema() -> None:
    """data/train_views.py checks the city it is given (a direct call, a config of another shape)."""
    from siamese_retrieval.data.train_views import views_config, views_mapping
    from siamese_retrieval.errors import ConfigError

    for views, message in [
        ({"preset": "default", "n_streets": "abc"}, "data.train_views.n_streets=abc: must be an integer >= 1"),
        ({"preset": "tiny", "queries_per_street": 0}, "data.train_views.queries_per_street=0: must be an integer >= 1"),
        ({"preset": "tiny", "first_street": -2}, "data.train_views.first_street=-2: must be an integer >= 0"),
        ({"preset": "nope"}, "data.train_views.preset='nope': must be one of default, tiny, large"),
        ({"preset": "tiny", "n_streets": True}, "data.train_views.n_streets=true: must be an integer >= 1"),
        ({"preset": "tiny", "seed": -1}, "data.train_views.seed=-1: must be an integer in [0, 4294967295]"),
        ("abc", "data.train_views='abc': must be a mapping"),
    ]:
        with pytest.raises(ConfigError) as info:
            views_config(views, None)
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(ConfigError, match="must be a mapping"):
        views_mapping(["a"])
    assert views_mapping(None) is None and views_mapping({}) is None
    assert views_config({"preset": "tiny", "n_streets": 2}, None).n_streets == 2


# ---------------------------------------------------------------------------------------------- 6. resume
@pytest.fixture(scope="module")
def run_with_metrics_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path]:
    """A trained run whose metrics.json was replaced by a directory: (log dir, run dir)."""
    log_dir = tmp_path_factory.mktemp("resume") / "outputs"
    assert_ok(run("train.py", TRAIN, log_dir, cache_dir))
    (run_dir,) = [p.parent for p in log_dir.glob("train/runs/*/*/metrics.json")]
    (run_dir / "metrics.json").unlink()
    (run_dir / "metrics.json").mkdir()
    (run_dir / "metrics.json" / "note.txt").write_text("mine")
    return log_dir, run_dir


@pytest.mark.parametrize("how", ["last", "run_dir"])
def test_resuming_a_run_whose_metrics_json_is_a_directory(how: str, run_with_metrics_dir: tuple[Path, Path],
                                                          cache_dir: Path) -> None:
    """Refused before any training (exit 2, one line): continuing it would train to the end and then fail to
    write metrics.json; skipping it would silently continue an older run or none."""
    log_dir, run_dir = run_with_metrics_dir
    runs_before = sorted(log_dir.glob("train/runs/*/*"))
    before = snapshot(run_dir / "metrics.json"), snapshot(run_dir / "checkpoints")
    ckpt = "last" if how == "last" else str(run_dir)
    proc = run("train.py", [*TRAIN, f"ckpt_path={ckpt}"], log_dir, cache_dir)
    shown = "ckpt_path=last" if how == "last" else "ckpt_path"
    assert_one_line(proc, f"error: {shown}: cannot continue run {run_dir}: its metrics.json is a directory, not a "
                          f"file (the run would train and then fail to write its results there); move it away, or "
                          f"start a new run without ckpt_path")
    assert (snapshot(run_dir / "metrics.json"), snapshot(run_dir / "checkpoints")) == before
    assert sorted(log_dir.glob("train/runs/*/*")) == runs_before
