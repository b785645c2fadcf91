"""Thread-pool map over consecutive chunks of a sequence, and OpenCV's threading turned off meanwhile.

Threads, not processes: OpenCV (decoding, ORB, RANSAC) and FAISS release the GIL, so threads use
every core without copying inputs, and a process pool would pay its start-up on every call.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def chunked_map(
    fn: Callable[[Sequence[T]], R],
    items: Sequence[T],
    workers: int,
    max_chunk: int = 64,
    pool_context: Callable[[], ContextManager] | None = None,
) -> list[R]:
    """`[fn(chunk) for chunk in consecutive slices of items]`, on `workers` threads; results in order.

    About 4 chunks per worker, each at most `max_chunk` items (1: one item per call). With
    `workers <= 1` or a single chunk, runs inline. Otherwise the pool runs inside `pool_context()`
    when given (e.g. `opencv_single_threaded`). The first failing chunk's exception is raised.
    """
    chunk = max(1, min(max_chunk, -(-len(items) // max(1, workers * 4))))
    chunks = [items[s : s + chunk] for s in range(0, len(items), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    context = pool_context() if pool_context is not None else nullcontext()
    with context, ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, chunks))


@contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV runs single-threaded (parallel over items, not inside each call); its setting is restored after."""
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # a global setting
    try:
        yield
    finally:
        cv2.setNumThreads(previous)
