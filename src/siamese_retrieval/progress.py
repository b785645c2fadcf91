"""What a run draws on the terminal while it works: a progress bar per long step, and Lightning's model
summary.

    with progress("extracting ORB keypoints", total=len(paths)) as advance:
        chunked_map(counted(work, advance), paths, workers)    # advance(len(chunk)) after each chunk

The bar is drawn with rich on stderr when stderr is a terminal, or when forced with `SIAMESE_PROGRESS=1`
(then also into a pipe or a log file, where rich writes the finished bar once: one line per step).
`SIAMESE_PROGRESS=0` turns bars off. Otherwise `advance` is a no-op and rich is not even imported, so the
steps pay nothing for it. `advance` may be called from worker threads (rich's Progress takes a lock).

Inside another live display on rich's shared console (Lightning's RichProgressBar while it trains), the bar
joins that display below Lightning's bars instead of fighting it for the terminal, and goes away when done.
Ranks > 0 of a distributed run draw nothing.

`ModelSummary` is Lightning's RichModelSummary as it is, imported on first use so that importing this module
stays cheap. Its FLOPs column reads 0: Lightning counts FLOPs only through `example_input_array`, which our
models do not set. Hiding it would take a copy of RichModelSummary.summarize (the one method that draws,
and it adds that column unconditionally), which breaks on Lightning upgrades.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

ENV = "SIAMESE_PROGRESS"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

T = TypeVar("T")
R = TypeVar("R")
Advance = Callable[[int], None]


def _noop(n: int = 1) -> None:
    return None


def _forced() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    return True if value in _ON else False if value in _OFF else None


def _secondary_rank() -> bool:
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return True
    return False


def progress_enabled() -> bool:
    """True when bars are drawn: SIAMESE_PROGRESS=1, or stderr is a terminal (and SIAMESE_PROGRESS is not 0)."""
    forced = _forced()
    if forced is not None:
        return forced
    if _secondary_rank():
        return False
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


@contextmanager
def progress(description: str, total: int, *, console: Any = None, enabled: bool | None = None) -> Iterator[Advance]:
    """A bar for one step of `total` items; yields `advance(n=1)`.

    `enabled` None: `progress_enabled()`. `console`: a rich Console to draw on (default: a stderr console,
    or rich's shared one while it shows a live display). A bar that joins another live display disappears
    when done, a bar of its own stays as one finished line.
    """
    total = int(total)
    if total <= 0 or not (progress_enabled() if enabled is None else enabled):
        yield _noop
        return
    from rich import get_console
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.table import Column

    nested = False
    if console is None:
        shared = get_console()
        nested = bool(getattr(shared, "_live_stack", None))  # e.g. Lightning's progress bar is showing
        # a terminal: its width (a narrow one shortens the description, then the bar); a pipe or a log file:
        # wide enough for one whole line per step
        console = shared if nested else Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    fixed = {"no_wrap": True}
    bar = Progress(
        TextColumn("{task.description}", table_column=Column(min_width=12)),  # wraps in a narrow terminal
        BarColumn(bar_width=20),  # shrinks in a narrow terminal
        MofNCompleteColumn(table_column=Column(**fixed)),
        TimeElapsedColumn(table_column=Column(**fixed)),  # then the time left
        TimeRemainingColumn(table_column=Column(**fixed)),
        console=console,
        transient=nested and _forced() is not True,
        refresh_per_second=4,
    )
    task = bar.add_task(description, total=total)

    def advance(n: int = 1) -> None:
        bar.advance(task, n)

    with bar:
        yield advance


def counted(fn: Callable[[Sequence[T]], R], advance: Advance) -> Callable[[Sequence[T]], R]:
    """`fn` for `parallel.chunked_map`, calling `advance(len(chunk))` after each chunk it finishes."""
    if advance is _noop:
        return fn

    def run(chunk: Sequence[T]) -> R:
        result = fn(chunk)
        advance(len(chunk))
        return result

    return run


# ----------------------------------------------------------------------------------------- model summary


def __getattr__(name: str) -> Any:
    """`ModelSummary` (conf/callbacks: `_target_: siamese_retrieval.progress.ModelSummary`) imports Lightning
    on first use only: this module is imported by the city generator's worker processes."""
    if name == "ModelSummary":
        from pytorch_lightning.callbacks import RichModelSummary

        return RichModelSummary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
