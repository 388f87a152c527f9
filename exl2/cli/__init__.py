"""The ``exl2`` command. Each verb lives in its own module and registers itself on :data:`app`.

Bad input ends in one line on stderr naming the file and tensor, and a non-zero exit:
1 when the input breaks a rule of the format, 2 when it cannot be read at all or the usage is
wrong. No traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import ContainerError, Exl2Error
from ..extras import missing_extra

app = typer.Typer(
    name="exl2",
    help="EXL2, the weight format of exllamav2: inspect, dequantize, validate, quantize and plan models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Each module adds its verbs to ``app`` when imported.
from . import inspect as _inspect  # noqa: E402,F401
from . import dequantize as _dequantize  # noqa: E402,F401
from . import extra as _extra  # noqa: E402,F401


def fail(error: Exl2Error) -> "typer.Exit":
    """Print ``error`` as one line on stderr and return the exit to raise."""
    print(f"exl2: error: {error.one_line()}", file=sys.stderr)
    return typer.Exit(2 if isinstance(error, ContainerError) else 1)


def main() -> None:
    try:
        app()
    except Exl2Error as e:  # a verb that did not catch its own
        print(f"exl2: error: {e.one_line()}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ContainerError) else 1)
    except KeyboardInterrupt:
        print("exl2: interrupted", file=sys.stderr)
        sys.exit(130)
    except ModuleNotFoundError as e:  # a verb that needs an extra that is not installed
        hint = missing_extra(e)
        if hint is None:
            print(f"exl2: internal error (please report): ModuleNotFoundError: {e}", file=sys.stderr)
            sys.exit(3)
        print(f"exl2: error: {hint}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug of ours: still one line, but say it is one
        print(f"exl2: internal error (please report): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        sys.exit(3)
