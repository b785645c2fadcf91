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


FAULTS = """
import resource, sys, torch
from siamese_retrieval.malloc_tuning import tune_malloc
tune_malloc()
def churn(n):  # what training steps do: allocate large activations, touch them, free them
    for _ in range(n):
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB: above glibc's largest mmap threshold
        x.add_(1.0)
        del x
churn(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_reused_instead_of_faulted_in_again() -> None:
    """64 MiB freed and allocated again, 8 times: with glibc's defaults each block is a fresh mmap (16,384 faults
    each, 131,072 in all); with the settings the heap keeps its pages (measured: 0-3 of the 8 fault again, as
    the host's memory reclaim takes some back)."""
    env = dict(os.environ)
    env.pop("SIAMESE_RETRIEVAL_MALLOC", None)
    tuned = int(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env,
                               check=True).stdout.strip())
    default = int(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                                 env={**env, "SIAMESE_RETRIEVAL_MALLOC": "default"}, check=True).stdout.strip())
    assert default > 120_000, default
    assert tuned < default / 2, (tuned, default)
