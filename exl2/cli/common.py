"""Helpers shared by the verbs: terminal detection, progress bars, the console."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr when it is a terminal, silently otherwise."""
    if not sys.stderr.isatty():
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
