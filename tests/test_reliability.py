"""Reliability (issue 7): bad datasets, bad configs, caches, faults during training, reproducibility, checkpoints.

Each case ends in one clear line (exit code 2 through the entry point), in the same result, or in a rebuilt
cache -- never in a traceback, a hang, or a half-written file reused later. Read-level dataset faults are in
test_dataset.py, ORB on odd images in test_keypoints.py; here they go through the training entry point.

The command-line cases share one batch of concurrently started `train.py` processes (`cli` fixture): each
one pays ~5 s of imports, so running them side by side keeps the default set fast.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import ROOT, compose_config

# ----------------------------------------------------------------------------------------- helpers


class StallAtEpoch(pl.Callback):
    """Test-only callback (used through `+callbacks.stall=...`): at the start of `epoch` (0-based) write
    `marker` and sleep, so a test can kill the process at a known point inside that epoch."""

    def __init__(self, epoch: int, marker: str, seconds: float = 300.0) -> None:
        self.epoch, self.marker, self.seconds = int(epoch), marker, float(seconds)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(self.seconds)


def train_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def assert_one_clear_line(proc: dict, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one `error: ...` line (the last one on stderr) holding every needle."""
    assert proc["rc"] == 2, proc["stderr"][-3000:]
    assert "Traceback" not in proc["stderr"] + proc["stdout"]
    lines = error_lines(proc["stderr"])
    assert len(lines) == 1, proc["stderr"][-3000:]
    assert proc["stderr"].strip().splitlines()[-1] == lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def small_dataset(root: Path, **kw):
    from tests.helpers import make_dataset

    params = dict(n_streets=3, per_street=8, queries_per_street=4, height=144, width=192)
    params.update(kw)
    return make_dataset(root, **params)


def unshare_works(*flags: str, probe: str = "true") -> bool:
    """Whether `unshare FLAGS sh -c PROBE` succeeds here (user namespaces can be disabled, e.g. in CI)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", *flags, "sh", "-c", probe], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def tiny_city(cache_dir: Path) -> Path:
    """The synth_tiny city in the session cache (generated once, before processes share it)."""
    from siamese_retrieval.data.synth import SynthConfig, ensure_city

    return ensure_city(cache_dir, SynthConfig.from_preset("tiny", seed=0))


# ----------------------------------------------------------------------------------------- the CLI batch


def launch_all(cases: dict[str, dict], env: dict[str, str], timeout: float = 240) -> dict[str, dict]:
    """Start every case's command at once, wait for all; add rc, stdout, stderr, wall_s (and timed_out)."""
    started = time.perf_counter()
    procs = {
        name: subprocess.Popen(case["cmd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=case.get("env", env))
        for name, case in cases.items()
    }
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            cases[name]["timed_out"] = True
        cases[name].update(rc=proc.returncode, stdout=out, stderr=err,
                           wall_s=round(time.perf_counter() - started, 1))
    return cases


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_city: Path) -> dict[str, dict]:
    """The default command-line cases, started together: {case: {rc, stdout, stderr, wall_s, ...}}."""
    base = tmp_path_factory.mktemp("cli")
    env = train_env(cache_dir)
    cases: dict[str, dict] = {}

    # 1. a zero-byte image in a dataset root
    root = base / "zero_byte"
    ds = small_dataset(root, height=48, width=64)
    ds.db_file(2).write_bytes(b"")
    cases["zero_byte"] = dict(cmd=train_cmd("data=msls_city", f"data.root={root}", "logger=none",
                                            f"hydra.run.dir={base / 'run_zero_byte'}"),
                              bad_file=str(ds.db_file(2)), run=base / "run_zero_byte")
    # 3. unknown model name
    cases["unknown_model"] = dict(cmd=train_cmd("model=nope", "logger=none", f"hydra.run.dir={base / 'run_nope'}"))
    # 5. output directory under a regular file (tests run as root: chmod would not stop us)
    blocker = base / "a_file"
    blocker.write_text("not a directory")
    cases["unwritable"] = dict(cmd=train_cmd("data=synth_tiny", "logger=none", f"hydra.run.dir={blocker / 'run'}"),
                               run=blocker / "run")
    # 5. no network at all, default (W&B, offline by default) logger: a network namespace without interfaces
    nonet_args = train_cmd("data=synth_tiny", "trainer.max_epochs=1", "+trainer.limit_train_batches=5",
                           f"hydra.run.dir={base / 'run_nonet'}")
    nonet_env = {k: v for k, v in env.items() if k not in ("WANDB_MODE", "WANDB_SILENT")}  # the defaults
    if unshare_works("-rn"):
        cases["no_network"] = dict(cmd=["unshare", "-rn", *nonet_args], run=base / "run_nonet", how="unshare -rn",
                                   env=nonet_env)
    else:  # fall back: every proxy points at a closed port
        proxies = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
        cases["no_network"] = dict(cmd=nonet_args, run=base / "run_nonet", how="proxies to 127.0.0.1:9",
                                   env={**nonet_env, **proxies, "NO_PROXY": "", "no_proxy": ""})
    return launch_all(cases, env)


@pytest.fixture(scope="module")
def cli_slow(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_city: Path) -> dict[str, dict]:
    """Command-line twins of in-process cases (each imports torch + Lightning: ~5 s of CPU apiece)."""
    base = tmp_path_factory.mktemp("cli_slow")
    env = train_env(cache_dir)
    cases: dict[str, dict] = {}
    # 3. a split that ends up empty: one 100 km cell holds the whole tiny city
    cases["empty_split"] = dict(cmd=train_cmd(*EMPTY_SPLIT, "logger=none", f"hydra.run.dir={base / 'run_empty'}"),
                                run=base / "run_empty")
    # 3. an impossible pair recipe: every database image is a positive of every query -> no negatives at all
    root = all_positive_dataset(base / "all_positive")
    cases["no_negatives"] = dict(cmd=train_cmd(*no_negatives_overrides(root), "logger=none",
                                               f"hydra.run.dir={base / 'run_noneg'}"), run=base / "run_noneg")
    # 5. full disk: the run directory on a 200 kB tmpfs (a checkpoint alone is ~450 kB)
    full = base / "full_disk"
    full.mkdir()
    if unshare_works("-rm", probe=f"mount -t tmpfs -o size=200k tmpfs {full}"):
        inner = " ".join(train_cmd("data=synth_tiny", "logger=none", "trainer.max_epochs=1",
                                   f"hydra.run.dir={full / 'run'}"))
        cases["full_disk"] = dict(cmd=["unshare", "-rm", "sh", "-c",
                                       f"mount -t tmpfs -o size=200k tmpfs {full} && exec {inner}"], run=full / "run")
    return launch_all(cases, env)


EMPTY_SPLIT = ["data=synth_tiny", "data.split.cell_size_m=100000"]


def all_positive_dataset(root: Path) -> Path:
    from siamese_retrieval.data.dataset import write_gt

    ds = small_dataset(root, n_streets=3, per_street=4, queries_per_street=2, height=48, width=64)
    write_gt(root / "gt.h5", np.ones_like(ds.sim), np.ones_like(ds.fov))
    return root


def no_negatives_overrides(root: Path) -> list[str]:
    # exclude_eval_overlap off: otherwise every database image overlaps an eval query and none is left to train on
    return ["data=msls_city", f"data.root={root}", "data.image_check=exists", "+data.split.exclude_eval_overlap=false"]


def run_in_process(overrides: list[str], out: Path, cache_dir: Path, capsys) -> str:
    """train() behind the entry point's error wrapper; expects exit code 2 and returns the one error line."""
    from siamese_retrieval.cli import report_user_errors
    from siamese_retrieval.train import train

    cfg = compose_config("train", ["logger=none", "trainer=cpu", *overrides], out, cache_dir)
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(train)(cfg)
    assert exit_info.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------------------- 1. dataset faults


def _fault_zero_byte(ds):
    ds.db_file(1).write_bytes(b"")
    return str(ds.db_file(1)), "image file is empty"


def _fault_text_as_jpg(ds):
    ds.query_file(0).write_text("hello, I am a text file")
    return str(ds.query_file(0)), "not a decodable image"


def _fault_truncated_jpeg(ds):
    data = ds.db_file(0).read_bytes()
    ds.db_file(0).write_bytes(data[: len(data) // 2])
    return str(ds.db_file(0)), ("truncated JPEG", "not a decodable image")  # depends on where the cut falls


def _fault_missing_image(ds):
    ds.db_file(3).unlink()
    return str(ds.db_file(3)), "image not found"


def _edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _fault_json_lacks_loc(ds):
    path = ds.root / "query" / "query.json"
    _edit_json(path, lambda m: m.pop("loc"))
    return str(path), "missing key(s) loc"


def _fault_json_not_json(ds):
    path = ds.root / "database" / "database.json"
    path.write_text('{"im_paths": [')
    return str(path), "not valid JSON"


def _fault_lengths_differ(ds):
    path = ds.root / "database" / "database.json"
    _edit_json(path, lambda m: m["loc"].pop())
    return str(path), f"im_paths has {ds.n_db} entries but loc has {ds.n_db - 1}"


def _fault_escaping_path(ds):
    path = ds.root / "database" / "database.json"
    _edit_json(path, lambda m: m["im_paths"].__setitem__(0, "../../etc/passwd"))
    return str(path), "im_paths[0] escapes the dataset root"


def _fault_sim_missing(ds):
    with h5py.File(ds.root / "gt.h5", "a") as f:
        del f["sim"]
    return str(ds.root / "gt.h5"), "missing dataset(s) sim"


def _fault_gt_shape(ds):
    from siamese_retrieval.data.dataset import write_gt

    write_gt(ds.root / "gt.h5", ds.sim.T, ds.fov.T)
    return str(ds.root / "gt.h5"), f"expected (n_query, n_database) = ({ds.n_query}, {ds.n_db})"


def _fault_fov_nan(ds):
    from siamese_retrieval.data.dataset import write_gt

    fov = ds.fov.copy()
    fov[1, 2] = np.nan
    write_gt(ds.root / "gt.h5", ds.sim, fov)
    return str(ds.root / "gt.h5"), "fov contains NaN"


FAULTS = {f.__name__[len("_fault_"):]: f for f in (
    _fault_zero_byte, _fault_text_as_jpg, _fault_truncated_jpeg, _fault_missing_image, _fault_json_lacks_loc,
    _fault_json_not_json, _fault_lengths_differ, _fault_escaping_path, _fault_sim_missing, _fault_gt_shape,
    _fault_fov_nan,
)}


@pytest.fixture(scope="module")
def pristine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "city"
    small_dataset(root, height=48, width=64)  # faults fire before any feature is computed: size is irrelevant
    return root


@pytest.mark.parametrize("fault", list(FAULTS))
def test_dataset_fault_stops_before_training(fault: str, pristine_root: Path, tmp_path: Path, cache_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Through the entry point's wrapper: one `error: <file>: <problem>` line, exit 2, no model ever built."""
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.models.siamese import SiameseModule
    from siamese_retrieval.cli import report_user_errors
    from siamese_retrieval.train import train

    root = tmp_path / "city"
    shutil.copytree(pristine_root, root)
    bad_file, problem = FAULTS[fault](read_dataset(root, check="none"))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built although the dataset is invalid")

    monkeypatch.setattr(SiameseModule, "__init__", no_model)
    cfg = compose_config("train", ["data=msls_city", f"data.root={root}", "logger=none", "trainer=cpu"],
                         tmp_path / "run", cache_dir)
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(train)(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert bad_file in lines[0], lines[0]
    assert any(p in lines[0] for p in ((problem,) if isinstance(problem, str) else problem)), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dataset_fault_through_train_py(cli: dict) -> None:
    """The same through the real command line: exit 2, one line naming the zero-byte file, no traceback."""
    case = cli["zero_byte"]
    assert_one_clear_line(case, case["bad_file"], "image file is empty (0 bytes)")
    assert not (case["run"] / "checkpoints").exists() and not (case["run"] / "metrics.json").exists()


def test_query_without_positive_trains_and_is_counted(tmp_path: Path, cache_dir: Path) -> None:
    """The first query of every street loses its positives: training works, each eval split counts one."""
    from siamese_retrieval.data.dataset import write_gt
    from siamese_retrieval.train import train

    root = tmp_path / "city"
    ds = small_dataset(root)
    sim, fov = ds.sim.copy(), ds.fov.copy()
    first_of_street = [i for i, p in enumerate(ds.q_paths) if p.endswith("_000.jpg")]
    assert len(first_of_street) == 3
    sim[first_of_street], fov[first_of_street] = False, 0.0
    write_gt(root / "gt.h5", sim, fov)
    cfg = compose_config("train", ["data=msls_city", f"data.root={root}", "logger=none", "trainer=cpu",
                                   "trainer.max_epochs=1"], tmp_path / "run", cache_dir)
    result = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "ok" and saved["epochs"] == 1
    # 3 streets = 3 places, fractions 0.6 / 0.2 / 0.2: one street (4 queries, one without positive) per split
    for stage in ("val", "test"):
        assert saved["metrics"][f"{stage}/n_queries"] == 4
        assert saved["metrics"][f"{stage}/n_queries_without_positive"] == 1
        assert 0.0 <= saved["metrics"][f"{stage}/recall@1"] <= 1.0
    assert result["metrics"] == saved["metrics"]


# ----------------------------------------------------------------------------------------- 2. image edge cases


def test_odd_images_through_the_cnn_and_orb_paths(tmp_path: Path) -> None:
    """Blank, 5x5, grayscale, RGBA, 16-bit and 5000x4000 images pass the decode check, load as (3, H, W)
    uint8 RGB for the CNN (resized; alpha dropped; 16-bit scaled) and give padded ORB features."""
    from siamese_retrieval.data.dataset import read_dataset, write_dataset
    from siamese_retrieval.data.images import load_images
    from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints

    root = tmp_path / "odd"
    (root / "database").mkdir(parents=True)
    (root / "query").mkdir()
    big = np.zeros((4000, 5000, 3), np.uint8)
    big[:, :2500] = 255  # left half white, right half black
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 0  # pure red (BGRA), fully transparent: alpha must not matter
    images = {
        "database/blank.png": np.full((120, 160, 3), 128, np.uint8),
        "database/tiny.jpg": np.full((5, 5, 3), 200, np.uint8),
        "database/gray.png": np.full((90, 120), 77, np.uint8),
        "database/rgba.png": rgba,
        "database/gray16.png": np.full((50, 70), 65535, np.uint16),
        "database/bgr16.png": np.dstack([np.zeros((50, 70), np.uint16), np.zeros((50, 70), np.uint16),
                                         np.full((50, 70), 257 * 100, np.uint16)]),
        "query/big.jpg": big,
    }
    for rel, img in images.items():
        assert cv2.imwrite(str(root / rel), img)
    db = [p for p in images if p.startswith("database/")]
    n_db = len(db)
    write_dataset(root, db, np.zeros((n_db, 3)), ["query/big.jpg"], np.zeros((1, 3)), np.ones((1, n_db), bool),
                  np.ones((1, n_db), np.float32))
    ds = read_dataset(root, check="decode")  # every odd image is a valid image

    t0 = time.perf_counter()
    db_img, q_img = load_images(ds, (48, 64), cache_dir=tmp_path / "cache")
    assert db_img.shape == (n_db, 3, 48, 64) and q_img.shape == (1, 3, 48, 64)
    assert db_img.dtype == q_img.dtype == np.uint8
    by_name = {Path(p).stem: db_img[i] for i, p in enumerate(ds.db_paths)}
    assert (by_name["blank"] == 128).all()
    assert np.abs(by_name["tiny"].astype(int) - 200).max() <= 2  # upscaled from 5x5
    assert (by_name["gray"] == 77).all()  # gray -> three equal channels
    assert (by_name["rgba"][0] == 255).all() and (by_name["rgba"][1:] == 0).all()  # RGB order, alpha dropped
    assert (by_name["gray16"] == 255).all()  # 16-bit full scale -> 255
    assert (by_name["bgr16"][0] == 100).all() and (by_name["bgr16"][1:] == 0).all()  # 16-bit red /257
    assert (q_img[0, :, :, :31] == 255).all() and (q_img[0, :, :, 33:] == 0).all()  # 5000x4000 -> 64x48
    assert time.perf_counter() - t0 < 20

    feats = extract_dataset_keypoints(ds, OrbConfig(n_keypoints=10), cache_dir=None)
    assert feats.db_desc.shape == (n_db, 10, 32) and feats.q_desc.shape == (1, 10, 32)
    for stem in ("blank", "tiny", "gray", "gray16"):  # constant or too small: no keypoint, all masked
        assert not feats.db_mask[ds.db_paths.index(next(p for p in ds.db_paths if Path(p).stem == stem))].any()


# ----------------------------------------------------------------------------------------- 3. config faults


def test_unknown_model_lists_the_available_ones(cli: dict) -> None:
    case = cli["unknown_model"]
    assert case["rc"] not in (0, None)
    assert "Could not find 'model/nope'" in case["stderr"]
    assert "keypoint_snn" in case["stderr"] and "cnn_snn" in case["stderr"]
    assert "Traceback" not in case["stderr"]


def test_unknown_data_lists_the_available_ones() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_config("train", ["data=nope"], Path("/nonexistent"), Path("/nonexistent"))
    message = str(info.value)
    assert all(name in message for name in ("synth", "synth_tiny", "msls_city"))


EMPTY_SPLIT_NEEDLES = ("split 'val' is empty", "1 place(s) with queries", "cell_size_m=100000")
NO_NEGATIVES_NEEDLES = ("impossible pair recipe: no negative of the requested kinds", "train queries x")


def test_empty_split_is_one_line_naming_the_split(tmp_path: Path, cache_dir: Path, tiny_city: Path, capsys) -> None:
    line = run_in_process(EMPTY_SPLIT, tmp_path / "run", cache_dir, capsys)
    assert all(needle in line for needle in EMPTY_SPLIT_NEEDLES), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_impossible_pair_recipe_is_one_line(tmp_path: Path, cache_dir: Path, capsys) -> None:
    root = all_positive_dataset(tmp_path / "all_positive")
    line = run_in_process(no_negatives_overrides(root), tmp_path / "run", cache_dir, capsys)
    assert all(needle in line for needle in NO_NEGATIVES_NEEDLES), line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_config_faults_through_train_py(cli_slow: dict) -> None:
    assert_one_clear_line(cli_slow["empty_split"], *EMPTY_SPLIT_NEEDLES)
    assert_one_clear_line(cli_slow["no_negatives"], *NO_NEGATIVES_NEEDLES)
    for case in ("empty_split", "no_negatives"):
        assert not (cli_slow[case]["run"] / "checkpoints").exists()


# ----------------------------------------------------------------------------------------- 4. caches


KILL_MID_WRITE = """
import os, signal, sys
from siamese_retrieval.data import images, keypoints
from siamese_retrieval.data.dataset import read_dataset
from siamese_retrieval.data.images import load_images
from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints

read = images.read_image
done = []

def killed(path):  # some images already written into the cache's files, then the process dies like under `kill -9`
    if len(done) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(path)
    return read(path)

images.read_image = keypoints.read_image = killed
ds = read_dataset(sys.argv[2], check="none")
if sys.argv[1] == "keypoints":
    extract_dataset_keypoints(ds, OrbConfig(), sys.argv[3], workers=1)
else:
    load_images(ds, (32, 48), sys.argv[3], workers=1)
"""


@pytest.mark.parametrize("kind", ["keypoints", "images"])
def test_cache_write_killed_midway_is_not_reused(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.data.images import images_cache_file, load_images
    from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints, keypoints_cache_file

    ds = small_dataset(tmp_path / "ds", n_streets=2, per_street=4, queries_per_street=2)
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, kind, str(ds.root), str(cache)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    final = keypoints_cache_file(ds, OrbConfig(), cache) if kind == "keypoints" else images_cache_file(ds, (32, 48), cache)
    leftovers = list(cache.iterdir())
    assert not final.exists()  # nothing under the final name...
    assert leftovers and all(p.name.startswith(f".{final.name}.tmp-") and p.name.rsplit("-", 1)[1].isdigit()
                             and p.is_dir() for p in leftovers)  # ...only the dead writer's temporary directory

    ds = read_dataset(ds.root, check="none")
    with caplog.at_level(logging.INFO):
        if kind == "keypoints":
            got = extract_dataset_keypoints(ds, OrbConfig(), cache).arrays()
            want = extract_dataset_keypoints(ds, OrbConfig(), None).arrays()
        else:
            got = dict(zip(("db", "q"), load_images(ds, (32, 48), cache)))
            want = dict(zip(("db", "q"), load_images(ds, (32, 48), None)))
    assert "cache miss" in caplog.text and "cache hit" not in caplog.text  # ...so the next run rebuilds
    assert final.is_dir()
    assert [p.name for p in cache.iterdir()] == [final.name]  # and the dead writer's temporary is gone
    for name, arr in want.items():
        np.testing.assert_array_equal(got[name], arr)


def test_caches_rebuilt_when_an_image_or_the_ground_truth_changes(tmp_path: Path) -> None:
    """The dataset fingerprint covers the contract files' bytes and every image's size + mtime."""
    from siamese_retrieval.data.dataset import read_dataset, write_gt
    from siamese_retrieval.data.images import images_cache_file, load_images
    from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints, keypoints_cache_file
    from tests.helpers import textured_image

    ds = small_dataset(tmp_path / "ds", n_streets=2, per_street=4, queries_per_street=2)
    cache, cfg, size = tmp_path / "cache", OrbConfig(), (32, 48)
    kp1 = extract_dataset_keypoints(ds, cfg, cache)
    db1, _ = load_images(ds, size, cache)

    # an image replaced under the same name (what a user re-exporting a folder does)
    new = textured_image(np.random.default_rng(99), 144, 192)
    assert cv2.imwrite(str(ds.db_file(0)), new)
    ds2 = read_dataset(ds.root)
    assert ds2.fingerprint != ds.fingerprint
    assert keypoints_cache_file(ds2, cfg, cache) != keypoints_cache_file(ds, cfg, cache)
    assert images_cache_file(ds2, size, cache) != images_cache_file(ds, size, cache)
    kp2 = extract_dataset_keypoints(ds2, cfg, cache)
    db2, _ = load_images(ds2, size, cache)
    assert not np.array_equal(kp2.db_desc[0], kp1.db_desc[0]) and np.array_equal(kp2.db_desc[1:], kp1.db_desc[1:])
    assert not np.array_equal(db2[0], db1[0]) and np.array_equal(db2[1:], db1[1:])
    np.testing.assert_array_equal(db2[0], cv2.resize(cv2.cvtColor(cv2.imread(str(ds.db_file(0))), cv2.COLOR_BGR2RGB),
                                                     (48, 32), interpolation=cv2.INTER_AREA).transpose(2, 0, 1))

    # the ground truth rewritten
    write_gt(ds.root / "gt.h5", ds2.sim, np.clip(ds2.fov * 0.5, 0, 1))
    ds3 = read_dataset(ds.root)
    assert ds3.fingerprint != ds2.fingerprint
    assert images_cache_file(ds3, size, cache) != images_cache_file(ds2, size, cache)
    # an unchanged dataset keeps its key
    assert read_dataset(ds.root).fingerprint == ds3.fingerprint


def test_cache_keys_cover_every_content_parameter(tmp_path: Path) -> None:
    from siamese_retrieval.data.images import images_cache_file
    from siamese_retrieval.data.keypoints import OrbConfig, keypoints_cache_file

    ds = small_dataset(tmp_path / "ds", n_streets=2, per_street=2, queries_per_street=1, height=48, width=64)
    base = OrbConfig()
    keys = {keypoints_cache_file(ds, base, tmp_path)}
    for f in dataclasses.fields(OrbConfig):
        value = getattr(base, f.name)
        changed = dataclasses.replace(base, **{f.name: value + 1 if isinstance(value, int) else value + 0.1})
        keys.add(keypoints_cache_file(ds, changed, tmp_path))
    assert len(keys) == 1 + len(dataclasses.fields(OrbConfig))  # n_keypoints, thresholds, max_side, ...
    sizes = [(32, 48), (48, 32), (32, 49), (33, 48)]
    assert len({images_cache_file(ds, s, tmp_path) for s in sizes}) == len(sizes)
    # the paths (order included) are part of both keys
    swapped = dataclasses.replace(ds, db_paths=[ds.db_paths[1], ds.db_paths[0], *ds.db_paths[2:]])
    assert keypoints_cache_file(swapped, base, tmp_path) != keypoints_cache_file(ds, base, tmp_path)
    assert images_cache_file(swapped, (32, 48), tmp_path) != images_cache_file(ds, (32, 48), tmp_path)


# ----------------------------------------------------------------------------------------- 5. faults in training


@pytest.mark.slow
def test_kill_9_in_epoch_2_then_resume_finishes_all_epochs(tmp_path: Path, cache_dir: Path, tiny_city: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "stalled"
    common = ["data=synth_tiny", "logger=csv", "trainer.max_epochs=4", f"hydra.run.dir={run}"]
    stall = ["+callbacks.stall._target_=tests.test_reliability.StallAtEpoch", "+callbacks.stall.epoch=1",
             f"+callbacks.stall.marker={marker}"]
    proc = subprocess.Popen(train_cmd(*common, *stall), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=train_env(cache_dir))
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():  # epoch 1 done (last.ckpt written), epoch 2 started
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never reached epoch 2"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (run / "metrics.json").exists()

    resumed = subprocess.run(train_cmd(*common, "ckpt_path=last"), capture_output=True, text=True, timeout=300,
                             cwd=ROOT, env=train_env(cache_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with (run / "csv" / "metrics.csv").open() as f:  # the resumed session started at epoch 1: restored
        assert min(int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch")) == 1
    result = json.loads((run / "metrics.json").read_text())
    assert result["status"] == "ok" and result["epochs"] == 4
    assert all(np.isfinite(v) for v in result["metrics"].values())
    assert {"test/recall@1", "test/mAP", "val/mAP"} <= set(result["metrics"])
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3


def test_no_network_never_hangs(cli: dict) -> None:
    """Default logger (W&B, offline by default) in a network namespace without interfaces."""
    case = cli["no_network"]
    assert not case.get("timed_out") and case["rc"] == 0, (case["how"], case["stderr"][-3000:])
    assert json.loads((case["run"] / "metrics.json").read_text())["status"] == "ok"
    assert list((case["run"] / "wandb").glob("offline-run-*/run-*.wandb")), case["how"]


def test_unwritable_output_dir_is_one_line(cli: dict) -> None:
    """Hydra would fail creating the run dir with a traceback; the OutputDirCheck callback says it first."""
    case = cli["unwritable"]
    assert_one_clear_line(case, f"output directory {case['run']} is not writable", "Not a directory")


def test_unwritable_output_dir_in_process(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from siamese_retrieval.cli import report_user_errors
    from siamese_retrieval.train import train

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = compose_config("train", ["data=synth_tiny", "logger=none"], blocker / "run", cache_dir)
    with pytest.raises(SystemExit) as info:
        report_user_errors(train)(cfg)
    assert info.value.code == 2
    assert error_lines(capsys.readouterr().err) == [f"error: output directory {blocker / 'run'} is not writable "
                                                    f"(Not a directory)"]


@pytest.mark.slow
def test_full_disk_is_one_line(cli_slow: dict) -> None:
    if "full_disk" not in cli_slow:
        pytest.skip("unshare -rm (a private mount namespace for a small tmpfs) is not available here")
    case = cli_slow["full_disk"]
    assert_one_clear_line(case, f"cannot write to {case['run']}: No space left on device")


def test_storage_errors_inside_library_exceptions_are_recognised() -> None:
    import errno

    from siamese_retrieval.cli import storage_error

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/x/last.ckpt")
        except OSError as inner:
            raise RuntimeError("checkpoint writer failed") from inner
    except RuntimeError as outer:
        assert storage_error(outer, "/x") == "cannot write to /x: No space left on device (while writing /x/last.ckpt)"
    assert storage_error(ValueError("nope")) is None
    assert storage_error(OSError(errno.ECONNREFUSED, "refused")) is None


# ----------------------------------------------------------------------------------------- 6. reproducibility


def _train_twice(tmp_path_factory, cache_dir: Path, overrides: list[str]) -> list[tuple[Path, dict]]:
    from siamese_retrieval.train import train

    runs = []
    for _ in range(2):
        out = tmp_path_factory.mktemp("repro")
        cfg = compose_config("train", ["logger=none", "trainer=cpu", "seed=7", *overrides], out, cache_dir)
        runs.append((out, train(cfg)))
    return runs


@pytest.fixture(scope="module")
def keypoint_runs(tmp_path_factory, cache_dir: Path, tiny_city: Path):
    return _train_twice(tmp_path_factory, cache_dir, ["data=synth_tiny", "trainer.max_epochs=2"])


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory, cache_dir: Path, tiny_city: Path):
    return _train_twice(tmp_path_factory, cache_dir, [
        "data=synth_tiny", "model=cnn_snn", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
        "model.inputs.height=48", "model.inputs.width=64",
    ])


def _assert_identical(runs) -> None:
    (out_a, a), (out_b, b) = runs
    assert a["metrics"] == b["metrics"]  # exact float equality, every metric
    saved = [json.loads((out / "metrics.json").read_text())["metrics"] for out in (out_a, out_b)]
    assert saved[0] == saved[1] == a["metrics"]
    sd = [torch.load(r["checkpoint"], map_location="cpu", weights_only=True)["state_dict"] for _, r in runs]
    assert sd[0].keys() == sd[1].keys()
    for k in sd[0]:
        assert torch.equal(sd[0][k], sd[1][k]), k


def test_same_seed_same_metrics_keypoint_snn(keypoint_runs) -> None:
    _assert_identical(keypoint_runs)


def test_same_seed_same_metrics_cnn_snn(cnn_runs) -> None:
    _assert_identical(cnn_runs)


@pytest.mark.slow
def test_same_command_twice_same_metrics_json(tmp_path: Path, cache_dir: Path, tiny_city: Path) -> None:
    """The literal promise: the same command line, run twice as separate processes, same metrics.json values."""
    for model_args in (["model=keypoint_snn", "trainer.max_epochs=2"],
                       ["model=cnn_snn", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                        "model.inputs.height=48", "model.inputs.width=64"]):
        metrics = []
        for i in range(2):
            run = tmp_path / f"{model_args[0].split('=')[1]}-{i}"
            proc = subprocess.run(train_cmd("data=synth_tiny", "logger=none", "seed=11", *model_args,
                                            f"hydra.run.dir={run}"),
                                  capture_output=True, text=True, timeout=600, cwd=ROOT, env=train_env(cache_dir))
            assert proc.returncode == 0, proc.stderr[-3000:]
            metrics.append(json.loads((run / "metrics.json").read_text())["metrics"])
        assert metrics[0] == metrics[1], model_args[0]


# ----------------------------------------------------------------------------------------- 7. checkpoints


def test_cnn_checkpoint_loads_weights_only(cnn_runs) -> None:
    ckpt = cnn_runs[0][1]["checkpoint"]
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["model_name"] == "cnn_snn"
    assert raw["hyper_parameters"]["encoder"]["_target_"].endswith("PlainCNN")


def test_load_checkpoint_checks_the_model_type(keypoint_runs, cnn_runs, tmp_path: Path) -> None:
    from siamese_retrieval.errors import UserError
    from siamese_retrieval.checkpoints import load_checkpoint
    from siamese_retrieval.models.siamese import SiameseModule

    kp_ckpt, cnn_ckpt = keypoint_runs[0][1]["checkpoint"], cnn_runs[0][1]["checkpoint"]
    loaded = load_checkpoint(kp_ckpt, expected_model="keypoint_snn")
    assert isinstance(loaded.module, SiameseModule) and loaded.model_name == "keypoint_snn"
    assert loaded.inputs_cfg["_target_"].endswith("KeypointInputs") and not loaded.module.training
    assert load_checkpoint(cnn_ckpt).model_name == "cnn_snn"  # no expectation: any model

    with pytest.raises(UserError) as info:
        load_checkpoint(kp_ckpt, expected_model="cnn_snn")
    assert str(info.value) == f"checkpoint {kp_ckpt} holds model_name='keypoint_snn', expected 'cnn_snn'"

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    with pytest.raises(UserError, match=rf"checkpoint {other} is not a SiameseModule checkpoint"):
        load_checkpoint(other, expected_model="keypoint_snn")

    text = tmp_path / "notes.ckpt"
    text.write_text("definitely not a checkpoint")
    with pytest.raises(UserError, match=rf"checkpoint {text} is not a loadable torch checkpoint"):
        load_checkpoint(text)

    with pytest.raises(UserError, match=rf"checkpoint {tmp_path / 'missing.ckpt'} not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_full_disk_in_process_is_one_line(tmp_path: Path, cache_dir: Path, monkeypatch, capsys) -> None:
    """A write failing with ENOSPC anywhere in the run (here: while caching features) -> one line, exit 2."""
    import errno

    import siamese_retrieval.train as train_mod

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(tmp_path / "cache" / "keypoints-x" / "db_desc.npy"))

    monkeypatch.setattr(train_mod, "build_datamodule", lambda data_cfg, inputs: full(data_cfg))
    line = run_in_process(["data=synth_tiny"], tmp_path / "run", cache_dir, capsys)
    assert line == (f"error: cannot write to {tmp_path / 'run'}: No space left on device "
                    f"(while writing {tmp_path / 'cache' / 'keypoints-x' / 'db_desc.npy'})")
