"""`python train.py ckpt_path=last` continues the newest unfinished run of the same overrides, in its own run
directory and W&B run (resume.py, cli.OutputDirCheck)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import Callback

from siamese_retrieval.errors import UserError
from siamese_retrieval.resume import (
    comparable_overrides,
    find_unfinished_run,
    resolve_ckpt_path,
    runs_root,
    wandb_run_id,
)
from tests.conftest import ROOT
from tests.wandb_offline import read_offline_run

OLD_PATTERN = "${paths.log_dir}/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
NEW_PATTERN = "${paths.log_dir}/${task_name}/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}"


def fake_run(root: Path, name: str, overrides: list[str], last: bool = True, status: str | None = None,
             mtime: float | None = None) -> Path:
    """A run directory as train.py leaves it: .hydra/overrides.yaml, maybe last.ckpt and metrics.json."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides) or "[]\n")
    if last:
        (run / "checkpoints").mkdir()
        ckpt = run / "checkpoints" / "last.ckpt"
        ckpt.write_bytes(b"ckpt")
        if mtime is not None:
            os.utime(ckpt, (mtime, mtime))
    if status is not None:
        (run / "metrics.json").write_text(json.dumps({"status": status}))
    return run


def test_run_selection_newest_unfinished_run_of_the_same_overrides(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    same = ["data=synth_tiny", "trainer.max_epochs=3"]
    t = time.time() - 1000
    fake_run(root, "2026-01-01/10-00-00", same, status="ok", mtime=t + 500)  # finished
    older = fake_run(root, "2026-01-01/11-00-00", same, mtime=t + 100)  # killed, no metrics.json
    failed = fake_run(root, "2026-01-02/09-00-00", [*same, "ckpt_path=last"], status="failed", mtime=t + 200)
    fake_run(root, "2026-01-02/10-00-00", ["data=synth_tiny", "trainer.max_epochs=4"], mtime=t + 900)  # other run
    fake_run(root, "2026-01-02/11-00-00", same, last=False)  # died before its first checkpoint
    fake_run(root, "2026-01-02/12-00-00", [*same, "seed=1"], mtime=t + 900)  # one override more

    # ckpt_path=... and hydra.* overrides are ignored; the order of overrides does not matter
    assert find_unfinished_run(root, 2, ["trainer.max_epochs=3", "data=synth_tiny", "ckpt_path=last",
                                         "hydra.run.dir=x"]) == failed
    os.utime(older / "checkpoints" / "last.ckpt", (t + 300, t + 300))  # written after the failed run's
    assert find_unfinished_run(root, 2, [*same, "ckpt_path=last"]) == older
    (older / "metrics.json").write_text(json.dumps({"status": "ok"}))  # it finished
    assert find_unfinished_run(root, 2, same) == failed
    assert find_unfinished_run(root, 2, ["data=synth_tiny", "trainer.max_epochs=5"]) is None
    assert find_unfinished_run(root, 2, ["data=synth_tiny"]) is None
    assert find_unfinished_run(tmp_path / "nowhere", 2, same) is None
    assert comparable_overrides(["b=1", "+ckpt_path=x", "a=2", "hydra.run.dir=y"]) == ["a=2", "b=1"]


def test_runs_root_follows_the_run_dir_pattern(tmp_path: Path) -> None:
    log_dir = tmp_path / "outputs"
    old = log_dir / "runs" / "2026-01-01" / "10-00-00"
    assert runs_root(OLD_PATTERN, old) == (log_dir / "runs", 2)
    new = log_dir / "train" / "runs" / "2026-01-01" / "10-00-00"
    assert runs_root(NEW_PATTERN, new) == (log_dir / "train" / "runs", 2)
    resolve = {"${paths.log_dir}/${task_name}/runs": str(log_dir / "train" / "runs")}.__getitem__
    assert runs_root(NEW_PATTERN, new, resolve) == (log_dir / "train" / "runs", 2)
    assert runs_root("${paths.log_dir}/run", log_dir / "run") is None


def test_resolve_ckpt_path_last_run_dir_and_file(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "run", [])
    last = run / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, run) is None
    assert resolve_ckpt_path("last", run) == str(last)
    assert resolve_ckpt_path(str(run), tmp_path / "other") == str(last)
    assert resolve_ckpt_path(str(last), tmp_path / "other") == str(last)
    with pytest.raises(UserError, match="holds no checkpoints/last.ckpt"):
        resolve_ckpt_path(str(tmp_path), run)
    with pytest.raises(UserError, match="not found"):
        resolve_ckpt_path("last", tmp_path)


def test_wandb_run_id_reads_the_newest_run_name(tmp_path: Path) -> None:
    assert wandb_run_id(tmp_path) is None
    wandb = tmp_path / "wandb"
    for name, run_id in [("offline-run-20260101_100000-aaaa1111", "aaaa1111"),
                         ("run-20260102_100000-bbbb2222", "bbbb2222")]:
        (wandb / name).mkdir(parents=True)
        (wandb / name / f"run-{run_id}.wandb").write_bytes(b":W&B")
    (wandb / "offline-run-20260103_100000-cccc3333").mkdir()  # no .wandb file: not a run
    assert wandb_run_id(tmp_path) == "bbbb2222"
    (wandb / "latest-run").symlink_to("offline-run-20260101_100000-aaaa1111")
    assert wandb_run_id(tmp_path) == "aaaa1111"


# ------------------------------------------------------------------------------------------- the CLI


def train_env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def train(args: list[str], cache_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=train_env(cache_dir))


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted(p.parent for p in log_dir.rglob(".hydra"))


def last_line(stderr: str) -> str:
    return [ln for ln in stderr.strip().splitlines() if ln.strip()][-1]


@pytest.mark.parametrize("pattern", [OLD_PATTERN, NEW_PATTERN], ids=["runs-pattern", "task-runs-pattern"])
def test_ckpt_path_last_without_a_run_to_continue_is_one_line(pattern: str, tmp_path: Path, cache_dir: Path) -> None:
    """The runs folder is read from the run-dir pattern (hydra.run.dir here; the default in the slow test)."""
    log_dir = tmp_path / "out"
    common = ["data=synth_tiny", "logger=none", f"paths.log_dir={log_dir}", f"hydra.run.dir={pattern}"]
    runs = log_dir / "runs" if pattern == OLD_PATTERN else log_dir / "train" / "runs"
    killed = fake_run(runs, "2026-01-01/10-00-00", [*common, "trainer.max_epochs=3"])

    proc = train([*common, "trainer.max_epochs=4", "ckpt_path=last"], cache_dir, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (f"error: ckpt_path=last: no unfinished run of these overrides under {runs}; "
                                      f"start one without ckpt_path")
    assert "Traceback" not in proc.stderr
    assert run_dirs(log_dir) == [killed]  # no new run directory either


def test_ckpt_path_run_dir_without_last_ckpt_is_one_line(tmp_path: Path, cache_dir: Path) -> None:
    log_dir, not_a_run = tmp_path / "out", tmp_path / "not_a_run"
    not_a_run.mkdir()
    proc = train(["data=synth_tiny", "logger=none", f"paths.log_dir={log_dir}", f"ckpt_path={not_a_run}"], cache_dir,
                 timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr) == f"error: ckpt_path: run directory {not_a_run} holds no checkpoints/last.ckpt"
    assert run_dirs(log_dir) == [] and run_dirs(not_a_run) == []


@pytest.mark.slow
def test_kill_9_then_ckpt_path_last_resumes_the_same_run_dir_and_wandb_run(tmp_path: Path, cache_dir: Path) -> None:
    log_dir = tmp_path / "out"
    command = ["data=synth_tiny", "trainer.max_epochs=3", "logger=wandb", f"paths.log_dir={log_dir}"]
    stderr_file = tmp_path / "first.stderr"
    with stderr_file.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *command], stdout=subprocess.DEVNULL,
                                stderr=stderr, cwd=ROOT, env=train_env(cache_dir), start_new_session=True)
    try:
        wait_for_last_ckpt(log_dir, proc, stderr_file)  # epoch 0 done, the second epoch started
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its W&B service, like `kill -9` of the job
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    [run] = run_dirs(log_dir)
    epoch = int(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"])
    assert epoch <= 1, "the run finished its epochs before it was killed"
    assert not (run / "metrics.json").exists()
    first_ids = wandb_ids(run)
    assert len(first_ids) == 1

    other = train([*command[:1], "trainer.max_epochs=4", *command[2:], "ckpt_path=last"], cache_dir)
    assert other.returncode == 2, other.stderr[-3000:]
    assert last_line(other.stderr) == (f"error: ckpt_path=last: no unfinished run of these overrides under "
                                       f"{run.parent.parent}; start one without ckpt_path")

    resumed = train([*command, "ckpt_path=last"], cache_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert run_dirs(log_dir) == [run]  # the same run directory, no new one
    result = json.loads((run / "metrics.json").read_text())
    assert result["status"] == "ok" and result["epochs"] == 3
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
    ids = wandb_ids(run)
    assert len(ids) == 2 and set(ids) == set(first_ids), ids  # a second W&B session of the same run
    assert wandb_run_id(run) == first_ids[0]
    # the second session trained from the epoch after the killed run's last.ckpt on, not from scratch
    second = read_offline_run(max(run.glob("wandb/offline-run-*/run-*.wandb"), key=lambda f: f.parent.name))
    assert min(row["epoch"] for row in second.history if "epoch" in row) == epoch + 1


def wait_for_last_ckpt(log_dir: Path, proc: subprocess.Popen, stderr_file: Path, timeout: float = 300) -> int:
    """Poll until some run's checkpoints/last.ckpt loads (an epoch done) and the log has started; its epoch."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, stderr_file.read_text()[-3000:]
        assert time.monotonic() < deadline, "training never finished an epoch"
        for last in log_dir.rglob("checkpoints/last.ckpt"):
            log_file = last.parent.parent / "train.log"
            try:
                epoch = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
            except Exception:  # noqa: BLE001 - being written right now
                continue
            if log_file.is_file() and log_file.stat().st_size > 0:
                return epoch
        time.sleep(0.05)


def wandb_ids(run: Path) -> list[str]:
    """The run ids in the names of the offline W&B files: wandb/offline-run-<time>-<id>/run-<id>.wandb."""
    return sorted(f.name.removeprefix("run-").removesuffix(".wandb") for f in run.glob("wandb/offline-run-*/run-*.wandb"))


def test_last_ckpt_is_the_last_epoch_even_when_the_best_is_older(tmp_path: Path, cache_dir: Path) -> None:
    """ckpt_path=last resumes from last.ckpt, so it must hold the newest epoch. With lr=0 every epoch validates
    the same, so the best checkpoint stays epoch 0; last.ckpt must still be epoch 2 (Lightning's own save_last
    copy is written only when a best checkpoint is)."""
    from siamese_retrieval.train import train
    from tests.conftest import compose_config

    out = tmp_path / "run"
    cfg = compose_config("train", ["data=synth_tiny", "trainer.max_epochs=3", "+trainer.limit_train_batches=2",
                                   "logger=none", "model.module.optimizer.lr=0"], out, cache_dir)
    result = train(cfg)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["epoch00.ckpt", "last.ckpt"], ckpts
    assert Path(result["checkpoint"]).name == "epoch00.ckpt"
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6, (last["epoch"], last["global_step"])


class CtrlCInTheSecondEpoch(Callback):
    """Ctrl-C as Lightning sees it: a KeyboardInterrupt during training, here after the first epoch's checkpoint."""

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_says_where_training_stopped_and_how_to_continue(tmp_path: Path, cache_dir: Path) -> None:
    """Lightning answers Ctrl-C with exit 1 and no word on the console; train() raises a KeyboardInterrupt that
    names the epoch and the last.ckpt that `ckpt_path=last` continues from (cli.py prints it, exit 130), and
    leaves no metrics.json, so the run stays unfinished."""
    from siamese_retrieval.train import train
    from tests.conftest import compose_config

    out = tmp_path / "run"
    cfg = compose_config("train", ["data=synth_tiny", "trainer.max_epochs=3", "+trainer.limit_train_batches=2",
                                   "logger=none", f"+callbacks.ctrl_c._target_={__name__}.CtrlCInTheSecondEpoch"],
                         out, cache_dir)
    with pytest.raises(KeyboardInterrupt) as info:
        train(cfg)
    last = out / "checkpoints" / "last.ckpt"
    assert str(info.value) == (f"training stopped in epoch 2 of 3; the same command with ckpt_path=last continues "
                               f"this run from {last} (its last finished epoch)")
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (out / "metrics.json").exists()


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture) -> None:
    from siamese_retrieval import cli

    def main() -> None:
        raise KeyboardInterrupt("training stopped in epoch 2 of 3")

    with pytest.raises(SystemExit) as info:
        cli.run_entry_point(main)
    assert info.value.code == 130
    assert capsys.readouterr().err == "interrupted: training stopped in epoch 2 of 3\n"
