"""Progress of the long stages of ``exl2 quantize`` as plain log lines, one per block.

For a run whose stderr is not a terminal (a log file, a batch job): each finished block prints
``quantize: measure block 3/32, elapsed 0:12:30, ETA 1:10:00`` so that a long run is never
silent for long. A terminal gets a progress bar instead (``exl2/cli/quantize.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02}:{s % 60:02}"


def log_lines(write: Callable[[str], None], now: Callable[[], float] = time.monotonic):
    """A progress wrapper (``wrap(items, total, phase)``) that calls ``write`` with one line per item."""

    def wrap(items: Iterable[T], total: int, phase: str) -> Iterator[T]:
        start = now()
        for done, item in enumerate(items, 1):
            yield item
            elapsed = now() - start
            eta = elapsed / done * (total - done)
            write(f"quantize: {phase} block {done}/{total}, elapsed {clock(elapsed)}, ETA {clock(eta)}")

    return wrap
