"""Bad input through the real command lines: one `error:` line on stderr, exit code 2, no traceback.

Each case is (id, entry point, arguments, expected last stderr line or a regex). Config faults fail before
torch is imported; checkpoint faults are caught by the one checked loader (checkpoints.py) in every entry
point. Dataset and compare.py faults have their own tables (test_bad_datasets.py, test_bad_compare.py), the
schema's full table is test_bad_configs.py, untrusted targets are test_trust.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

CONFIG_CASES = [
    ("batch_size_abc", "train.py", ["model.batch_size=abc"], "error: model.batch_size=abc: must be an integer >= 1"),
    ("batch_size_0", "train.py", ["model.batch_size=0"], "error: model.batch_size=0: must be an integer >= 1"),
    ("seed_x", "train.py", ["seed=x"], "error: seed=x: must be an integer in [0, 4294967295]"),
    ("max_epochs_abc", "train.py", ["trainer.max_epochs=abc"], "error: trainer.max_epochs=abc: must be an integer >= -1"),
    ("lr_abc", "train.py", ["model=cnn_snn", "model.module.optimizer.lr=abc"],
     "error: model.module.optimizer.lr=abc: must be a number > 0"),
    ("top_k_abc", "retrieve.py", ["top_k=abc"], "error: top_k=abc: must be an integer >= 1"),
    ("top_ks_0", "evaluate.py", ["top_ks=[0]"], "error: top_ks=[0]: every entry must be an integer >= 1"),
    ("method_bogus", "evaluate.py", ["method=bogus"], "error: method='bogus': must be one of model, orb_ransac, orb_bow"),
    ("preset_bogus", "train.py", ["data.pairs.preset=bogus"], "error: data.pairs.preset='bogus': must be one of study, default, light"),
    ("unknown_key", "train.py", ["foo=1"],
     "error: Could not override 'foo': key 'foo' is not in struct; to append to your config use +foo=1"),
    ("unknown_model", "train.py", ["model=nope"],
     "error: In 'train': Could not find 'model/nope'; available options in 'model': backbone_snn, cnn_snn, cnn_snn_pairs, "
     "keypoint_set, keypoint_snn"),
]


def run(script: str, args: list[str], tmp_path: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, script, *args, f"paths.log_dir={tmp_path / 'outputs'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def assert_one_line(proc: subprocess.CompletedProcess, expected: str | re.Pattern) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and lines, proc.stderr[-2000:]
    if isinstance(expected, str):
        assert lines[-1] == expected
        assert len([ln for ln in lines if ln.startswith("error:")]) == 1
    else:
        assert expected.search(proc.stderr), proc.stderr[-2000:]


@pytest.mark.parametrize("case,script,args,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_override_is_one_line_before_torch(case, script, args, expected, tmp_path: Path, cache_dir: Path) -> None:
    started = time.perf_counter()
    proc = run(script, args, tmp_path, cache_dir)
    elapsed = time.perf_counter() - started
    assert_one_line(proc, expected)
    assert elapsed < 10, f"{case} took {elapsed:.1f} s"  # measured ~0.5 s; generous for a loaded machine
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert not any("/runs/" in p for p in left), f"a refused run left its directory: {left}"


@pytest.fixture
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def _truncated(ckpt: Path, dst: Path) -> Path:
    dst.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return dst


def _random_bytes(ckpt: Path, dst: Path) -> Path:
    dst.write_bytes(os.urandom(4096))
    return dst


def _other_version(ckpt: Path, dst: Path) -> Path:
    """A checkpoint of the same model from a code version with other layer sizes."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["hyper_parameters"]["encoder"]["hidden"] = [64, 50]
    raw["state_dict"] = {k: (torch.zeros(64, *v.shape[1:]) if k.endswith("0.weight") else v)
                         for k, v in raw["state_dict"].items()}
    torch.save(raw, dst)
    return dst


def _no_inputs(ckpt: Path, dst: Path) -> Path:
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    del raw["hyper_parameters"]["inputs"]
    torch.save(raw, dst)
    return dst


CKPT_CASES = [
    ("train_truncated", "train.py", _truncated, r"error: checkpoint {p} is not a loadable torch checkpoint \(.+\)"),
    ("train_random_bytes", "train.py", _random_bytes, r"error: checkpoint {p} is not a loadable torch checkpoint \(.+\)"),
    ("train_other_version", "train.py", _other_version,
     r"error: ckpt_path: checkpoint {p} does not fit this model: .+ has shape \(64, .+\), the model \(100, .+\) "
     r"\(another model config\)"),
    ("evaluate_other_version", "evaluate.py", _other_version,
     r"error: checkpoint {p} \(model_name='keypoint_snn'\) does not fit this code: encoder\..+ has shape "
     r"\(.+\), the model \(.+\) \(another model config\)"),
    ("evaluate_truncated", "evaluate.py", _truncated, r"error: checkpoint {p} is not a loadable torch checkpoint \(.+\)"),
    ("retrieve_no_inputs", "retrieve.py", _no_inputs,
     r"error: checkpoint {p} has no input builder config \(hyper_parameters.inputs\): it was made by an older "
     r"siamese-retrieval; retrain it with this version"),
]


# the same check as train_truncated with other files, or train_truncated itself, whose refusal the refusal table
# also makes through evaluate and a resumed run (script_module_main_truncated_ckpt, resume_damaged_last_ckpt)
SLOW_CKPT_CASES = {"train_random_bytes", "evaluate_truncated", "train_truncated"}


@pytest.mark.parametrize("case,script,make,expected", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CKPT_CASES else []) for c in CKPT_CASES])
def test_bad_checkpoint_is_one_line(case, script, make, expected, checkpoint: Path, tmp_path: Path,
                                    cache_dir: Path) -> None:
    bad = make(checkpoint, tmp_path / "bad.ckpt")
    args = ["data=synth_tiny", f"ckpt_path={bad}"]
    if script == "retrieve.py":
        args.append(f"query={next(cache_dir.glob('synth-*/query/images/*.jpg'))}")
    proc = run(script, args, tmp_path, cache_dir)
    assert_one_line(proc, re.compile("^" + expected.format(p=re.escape(str(bad))) + "$", re.M))
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_two_runs_started_in_the_same_second_keep_both(tmp_path: Path, cache_dir: Path) -> None:
    """The run dir is named by the year here, so both runs surely share it: the second takes `<dir>-1`."""
    args = ["debug=fast", "logger=none", "hydra.run.dir=${paths.log_dir}/runs/${now:%Y}"]
    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "train.py", *args, f"paths.log_dir={tmp_path}", f"seed={seed}"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    year = time.strftime("%Y")
    dirs = sorted(d.name for d in (tmp_path / "runs").iterdir())
    assert dirs == [year, f"{year}-1"]
    import json

    seeds = sorted(json.loads((tmp_path / "runs" / d / "metrics.json").read_text())["seed"] for d in dirs)
    assert seeds == [1, 2]
    for d in dirs:  # each run's config sits beside its own metrics
        overrides = (tmp_path / "runs" / d / ".hydra" / "overrides.yaml").read_text()
        seed = json.loads((tmp_path / "runs" / d / "metrics.json").read_text())["seed"]
        assert f"seed={seed}" in overrides


def test_only_the_claimed_run_directory_of_a_refused_run_is_removed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What Hydra wrote before a refusal goes with it; a directory holding anything else, or one this process
    did not claim (hydra.run.dir=, a resumed run), stays as it is."""
    from siamese_retrieval import cli

    def made(name: str, *files: str) -> Path:
        run_dir = tmp_path / "runs" / "2026-12-07" / name
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
        for file in ("train.log", *files):
            (run_dir / file).write_text("x")
        return run_dir

    refused, named = made("10-00-00"), made("named")
    monkeypatch.setattr(cli, "_claimed_run_dir", str(refused))
    monkeypatch.setattr(cli, "_created_parents", [])
    cli.remove_unused_run_dir(str(named))  # not the claimed one
    cli.remove_unused_run_dir(str(refused))
    assert not refused.exists() and named.exists()

    fresh = tmp_path / "new" / "outputs" / "eval" / "runs" / "2026-12-07" / "10-00-00"  # claimed in a new folder
    monkeypatch.setattr(cli, "_claimed_run_dir", str(fresh))
    monkeypatch.setattr(cli, "_created_parents", [p for p in fresh.parents if not p.exists()])
    (fresh / ".hydra").mkdir(parents=True)
    cli.remove_unused_run_dir(str(fresh))
    assert not (tmp_path / "new").exists()  # every folder the claim made went with it, and no other

    used = made("10-00-01", "metrics.json")
    monkeypatch.setattr(cli, "_claimed_run_dir", str(used))
    cli.remove_unused_run_dir(str(used))
    assert (used / "metrics.json").is_file()
    monkeypatch.setattr(cli, "_claimed_run_dir", None)  # resumed: nothing was claimed
    cli.remove_unused_run_dir(str(named))
    assert named.exists()


def test_only_a_name_no_registry_holds_gets_the_imports_hint(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint naming a head this process never imported is told `imports=[...]`; a value that is simply out of
    its choices (no module could add it) is not."""
    from siamese_retrieval.checkpoints import load_checkpoint
    from siamese_retrieval.errors import UnknownComponent, UserError
    from siamese_retrieval.models.cnn import PlainCNN

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    raw["hyper_parameters"]["encoder"]["activation_name"] = "bogus"
    torch.save(raw, bad := tmp_path / "bad.ckpt")
    with pytest.raises(UserError) as info:
        load_checkpoint(bad)
    assert str(info.value) == (f"checkpoint {bad} (model_name='keypoint_snn') does not fit this code: "
                               "encoder.activation_name='bogus': must be one of sigmoid, relu, tanh, gelu")

    with pytest.raises(UnknownComponent) as unknown:  # what a cnn_snn checkpoint with a user's head raises inside
        PlainCNN(widths=(8,), aggregation="mac")
    try:
        raise RuntimeError("Error in call to target 'siamese_retrieval.models.cnn.PlainCNN':") from unknown.value
    except RuntimeError as wrapped:
        from siamese_retrieval.checkpoints import _root_cause

        assert _root_cause(wrapped) == ("aggregation.name='mac': must be one of netvlad, convap, gem, mixvpr, boq, "
                                        "salad; a component registered by your own module loads with "
                                        "imports=[your_module]")
