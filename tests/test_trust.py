"""The trust boundary: a checkpoint or saved config never makes this package call a foreign `_target_`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siamese_retrieval.checkpoints import load_checkpoint
from siamese_retrieval.errors import UserError
from siamese_retrieval.trust import check_targets, is_allowed
from tests.conftest import ROOT

FOREIGN = {
    "builtins.open": lambda victim: {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
    "numpy.savetxt": lambda victim: {"_target_": "numpy.savetxt", "fname": str(victim), "X": [[1.0]]},
    "shutil.copyfile": lambda victim: {"_target_": "shutil.copyfile", "src": "/etc/hostname", "dst": str(victim)},
    "os.system": lambda victim: {"_target_": "os.system", "command": f"echo pwned > {victim}"},
}


@pytest.fixture
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def poisoned(checkpoint: Path, where: str, node: dict, out: Path) -> Path:
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hp = raw["hyper_parameters"]
    if where == "loss":
        hp["loss"] = node
    elif where == "nested":  # deep inside an allowed target's arguments
        hp["loss"] = {"_target_": "siamese_retrieval.models.losses.SumOfLosses", "terms": {"x": node}}
    elif where == "inputs":
        hp["inputs"] = node
    elif where == "optimizer":
        hp["optimizer"] = {**node, "_partial_": True}
    torch.save(raw, out)
    return out


@pytest.mark.parametrize("target", list(FOREIGN))
@pytest.mark.parametrize("where", ["loss", "nested", "inputs", "optimizer"])
def test_foreign_targets_are_refused_before_anything_is_built(checkpoint: Path, tmp_path: Path, target: str,
                                                              where: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    bad = poisoned(checkpoint, where, FOREIGN[target](victim), tmp_path / "bad.ckpt")
    with pytest.raises(UserError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert message.startswith(f"checkpoint {bad}: refusing to instantiate ") and repr(target) in message
    assert "\n" not in message
    assert victim.read_text() == "precious"


def test_lightnings_own_loader_checks_the_targets_too(checkpoint: Path, tmp_path: Path) -> None:
    """SiameseModule.load_from_checkpoint (Lightning's API, for whoever calls it directly) refuses the same files."""
    from siamese_retrieval.models.siamese import SiameseModule

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    bad = poisoned(checkpoint, "loss", FOREIGN["builtins.open"](victim), tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match=r"refusing to instantiate loss\._target_='builtins\.open'"):
        SiameseModule.load_from_checkpoint(bad, weights_only=True)
    assert victim.read_text() == "precious"
    assert SiameseModule.load_from_checkpoint(checkpoint, weights_only=True).hparams.model_name == "keypoint_snn"


def test_allowlist_accepts_the_projects_own_targets_only() -> None:
    assert is_allowed("torch.optim.AdamW") and is_allowed("torch.optim.lr_scheduler.CosineAnnealingLR")
    assert is_allowed("siamese_retrieval.models.cnn.PlainCNN")
    for bad in ("torch.optim.Optimizer", "torch.optim.lr_scheduler.LRScheduler", "torch.optim._functional",
                "torch.optim.lr_scheduler.warnings", "siamese_retrieval.io_utils.atomic_write_text", "torch.load",
                "builtins.eval", 3, None, "torch.optim.AdamW.__init__"):
        assert not is_allowed(bad), bad
    check_targets({"a": [{"b": {"_target_": "torch.optim.SGD"}}]}, "x")  # nested lists and dicts are walked
    with pytest.raises(UserError, match=r"x: refusing to instantiate a\[0\]\.b\._target_='os\.system'"):
        check_targets({"a": [{"b": {"_target_": "os.system"}}]}, "x")


class UserEncoder:  # a class of the researcher's own (importable as tests.test_trust.UserEncoder)
    pass


def user_function() -> None:
    pass


def test_trust_allow_accepts_named_classes_only() -> None:
    user = "tests.test_trust.UserEncoder"
    assert not is_allowed(user)  # neither registered nor allowed
    assert is_allowed(user, allow=[user])
    # functions, builtins and operating-system classes are refused whatever the list says
    for never in ("tests.test_trust.user_function", "builtins.open", "builtins.eval", "os.system",
                  "subprocess.Popen", "shutil.copyfile", "pathlib.Path", "numpy.savetxt", "tests.test_trust.__class__"):
        assert not is_allowed(never, allow=[never]), never
    with pytest.raises(UserError) as info:
        check_targets({"encoder": {"_target_": user}}, "checkpoint x.ckpt", allow=["a.B"])
    assert str(info.value) == ("checkpoint x.ckpt: refusing to instantiate encoder._target_='tests.test_trust.UserEncoder': "
                               "it is not a registered component of this package; if you trust that class, add "
                               "trust.allow=[a.B,tests.test_trust.UserEncoder]")
    with pytest.raises(UserError, match="only classes can be allowed"):
        check_targets({"loss": {"_target_": "os.system"}}, "x", allow=["os.system"])


def test_the_allowlist_is_the_registries() -> None:
    """Every registered component may be named by a file; its registry is where it was defined."""
    from siamese_retrieval.registry import ENCODERS, INPUTS, LOSSES

    assert {"plain_cnn", "keypoint_mlp", "keypoint_set"} <= set(ENCODERS.names())
    assert {"images", "keypoints", "keypoint_sets"} <= set(INPUTS.names())
    for registry in (ENCODERS, INPUTS, LOSSES):
        for entry in registry.entries():
            assert is_allowed(entry.target), entry.target
    assert ENCODERS.entry("plain_cnn").target == "siamese_retrieval.models.cnn.PlainCNN"
    # what is chosen by name (layout readers, re-ranker and head builders: functions) is never a `_target_`
    from siamese_retrieval.registry import AGGREGATIONS, LAYOUTS, RERANKERS

    for registry in (AGGREGATIONS, LAYOUTS, RERANKERS):
        for entry in registry.entries():
            assert not is_allowed(entry.target), entry.target


def run_cli(script: str, args: list[str], cache_dir: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, script, *args, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("script,args", [  # evaluate / retrieve: also in-process in tests/test_refusal_table.py
    pytest.param("evaluate.py", ["data=synth_tiny"], marks=pytest.mark.slow),
    pytest.param("retrieve.py", ["data=synth_tiny", "query=QUERY"], marks=pytest.mark.slow),
    ("train.py", ["data=synth_tiny", "logger=none", "trainer.max_epochs=1"]),
])
def test_every_entry_point_refuses_a_poisoned_checkpoint(checkpoint: Path, tmp_path: Path, cache_dir: Path,
                                                         script: str, args: list[str]) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    bad = poisoned(checkpoint, "loss", FOREIGN["builtins.open"](victim), tmp_path / "bad.ckpt")
    query = next(cache_dir.glob("synth-*/query/images/*.jpg"))
    args = [a.replace("QUERY", str(query)) for a in args]
    proc = run_cli(script, [*args, f"ckpt_path={bad}"], cache_dir, tmp_path / "run")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines[-1] == (f"error: checkpoint {bad}: refusing to instantiate loss._target_='builtins.open': it is not "
                         "a registered component of this package; only classes can be allowed, never functions, "
                         "builtins or operating-system modules")
    assert victim.read_text() == "precious"


def test_a_saved_config_next_to_the_checkpoint_is_never_read(checkpoint: Path, tmp_path: Path, cache_dir: Path) -> None:
    """evaluate.py needs only the checkpoint: a hostile .hydra/config.yaml beside it changes nothing."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "someone_elses_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(checkpoint.read_bytes())
    (run / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: keypoint_snn\n  inputs:\n    _target_: builtins.open\n    file: {victim}\n    mode: w\n")
    proc = run_cli("evaluate.py", ["data=synth_tiny", f"ckpt_path={ckpt}"], cache_dir, tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert victim.read_text() == "precious"
