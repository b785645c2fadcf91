"""examples/: extending the framework from outside the package, run as each README types it.

Each example folder is copied out of the repository (so nothing but the installed package and the folder itself
is on hand) and its README's commands are run there as typed, in order, with a bash shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"


def readme_commands(readme: Path) -> list[str]:
    """The commands of the README's ```bash blocks, in order (comment lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def run_in(folder: Path, command: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("PROJECT_ROOT", "PYTHONPATH", "HYDRA_FULL_ERROR"):  # as a user's shell: no test settings
        env.pop(key, None)
    return subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_custom_encoder_trains_and_its_checkpoint_needs_trust(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "custom_encoder"
    shutil.copytree(EXAMPLES / "custom_encoder", folder)
    train, refused, allowed = readme_commands(folder / "README.md")

    proc = run_in(folder, train, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = folder / "outputs" / "tiny_custom" / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["encoder"]["_target_"] == "tiny_encoder.TinyEncoder"
    assert any(k.startswith("encoder.net.") for k in raw["state_dict"])  # the user's module was trained

    proc = run_in(folder, refused, cache_dir)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines == [f"error: checkpoint outputs/tiny_custom/checkpoints/last.ckpt: refusing to instantiate "
                     f"encoder._target_='tiny_encoder.TinyEncoder': it is not a registered component of this "
                     f"package; if you trust that class, add trust.allow=[tiny_encoder.TinyEncoder]"]

    proc = run_in(folder, allowed, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (folder / "outputs" / "tiny_custom_eval" / "metrics.json").read_text()
    assert '"model": "tiny_custom"' in metrics and '"test/recall@1"' in metrics
