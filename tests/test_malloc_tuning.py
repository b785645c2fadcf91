"""malloc_tuning.py: glibc's mallopt settings apply once, and SIAMESE_RETRIEVAL_MALLOC=default keeps the defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from siamese_retrieval.malloc_tuning import tune_malloc; print(tune_malloc(), tune_malloc())"


def _probe(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("SIAMESE_RETRIEVAL_MALLOC", None)
    if env_value is not None:
        env["SIAMESE_RETRIEVAL_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_settings_apply_on_glibc_and_can_be_turned_off() -> None:
    assert _probe(None) == "True True"
    assert _probe("default") == "False False"
