"""The optional dependencies of exl2 and the extra that installs each (pyproject.toml).

The core library (:mod:`exl2`, :mod:`exl2.io`, :mod:`exl2.reference`, ...) needs only torch,
numpy and safetensors; the rest comes with extras: ``cli`` (the ``exl2`` command), ``conformance``
(strategies, harness, pytest plugin), ``fast`` (Triton kernels), ``models`` (Hugging Face
checkpoints). This module imports nothing, so that a missing package can be named in one line.
"""

from __future__ import annotations

#: Top-level module -> the extra that installs it.
EXTRA_OF = {
    "typer": "cli",
    "rich": "cli",
    "pydantic": "cli",
    "hypothesis": "conformance",
    "triton": "fast",
    "transformers": "models",
    "tokenizers": "models",
}


def install_hint(module: str) -> str:
    """``"<module> is not installed: pip install 'exl2[<extra>]'"``."""
    return f"{module} is not installed: pip install 'exl2[{EXTRA_OF[module]}]'"


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The install hint when ``error`` is about an optional dependency of exl2; None otherwise."""
    module = (error.name or "").partition(".")[0]
    return install_hint(module) if module in EXTRA_OF else None
