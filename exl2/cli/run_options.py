"""Options and helpers shared by the verbs that run a model (eval, generate): the device, the
float dtype, and the step log for runs without a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TypeVar

import typer

T = TypeVar("T")

DTYPES = ("float16", "bfloat16", "float32")


def quiet_transformers() -> None:
    """The command's own output only: no transformers progress bars or advice on stderr."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def device_of(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        print(f"exl2: error: --device {device}: use auto, cpu or cuda", file=sys.stderr)
        raise typer.Exit(2)
    return device


def dtype_of(name: str):
    import torch

    if name not in DTYPES:
        print(f"exl2: error: --dtype {name}: use one of {', '.join(DTYPES)}", file=sys.stderr)
        raise typer.Exit(2)
    return getattr(torch, name)


def steps(items: list[T], description: str) -> Iterator[T]:
    """A progress bar on a terminal; elsewhere one log line per step on stderr."""
    if sys.stderr.isatty():
        from .common import progress

        yield from progress(items, len(items), description)
        return
    for i, item in enumerate(items, 1):
        yield item
        print(f"{description}: step {i}/{len(items)} done", file=sys.stderr, flush=True)
