"""glibc malloc settings for PyTorch on the CPU: keep freed activation memory instead of handing it back.

PyTorch's CPU allocator is plain malloc. With glibc's defaults every activation larger than the (dynamic,
at most 32 MB) mmap threshold is a fresh mmap, and freed heap memory is trimmed back to the kernel, so each
training step faults its activations in again page by page: ~75,000 minor page faults and ~0.12 s of
kernel time per cnn_snn step of 64 images on 2 cores, a fifth of the run's CPU time. Raising the mmap
threshold to its maximum and the trim threshold far above a step's working set lets malloc reuse the pages:
faults drop 10-15x (experiments/benchmarks/glibc_malloc.py measures it). The threshold cannot go above 32 MiB,
and keypoint_set's (128, 256, 512) pooling activations are 67 MB each: every one was still a fresh mmap
(~230,000 faults and 0.5 s of kernel time per step). So mmap is switched off for ordinary allocations
(M_MMAP_MAX = 0): large blocks come from the heap and are reused too. glibc still falls back to mmap when the
heap cannot grow (a thread arena's 64 MiB heap limit, a failed brk), so no allocation fails for it. jemalloc or tcmalloc via
LD_PRELOAD do the same but must be installed and preloaded before Python starts; this needs neither.

Set SIAMESE_RETRIEVAL_MALLOC=default to keep glibc's defaults. Elsewhere than glibc (macOS, musl) a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4  # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap at the top instead of returning it
TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps
MMAP_MAX = 0  # no mmap-served blocks: the heap serves (and reuses) large ones too


@functools.cache
def tune_malloc() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    if os.environ.get("SIAMESE_RETRIEVAL_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
            (M_MMAP_MAX, MMAP_MAX)))
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("glibc mallopt refused a setting; keeping its defaults where it did")
    return ok
