"""Helpers shared by the verbs: terminal detection, progress bars, the console, and text from
files shown as text (never as rich markup, every invisible character escaped)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from ..errors import printable

T = TypeVar("T")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def plain(value: object) -> Text:
    """``value`` (a string from a file: a path, a tensor name, a message quoting either) as rich
    text that is shown literally: ``[/]`` stays ``[/]``, controls and lone surrogates are escaped."""
    return Text(printable(value))


#: Deepest JSON value from a file that the verbs print: deeper ones (legal JSON, but hostile)
#: would exhaust the stack of a recursive printer.
MAX_SHOWN_DEPTH = 64


def nested_deeper_than(value: object, limit: int = MAX_SHOWN_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and objects more than ``limit`` deep; iterative."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def json_text(data: object) -> str:
    """``data`` as strict JSON text for stdout: non-finite floats (a config.json may hold NaN)
    become null, and every non-ASCII character, lone surrogates of undecodable file names
    included, becomes a ``\\u`` escape, so that printing it never raises."""
    def finite(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(data), indent=2, ensure_ascii=True, allow_nan=False)


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
