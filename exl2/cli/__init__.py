"""The ``exl2`` command. Each verb lives in its own module and registers itself on :data:`app`.

Bad input ends in one line on stderr naming the file and tensor, and a non-zero exit:
1 when the input breaks a rule of the format, 2 when it cannot be read at all or the usage is
wrong (each error class carries its status: :mod:`exl2.errors`); 3 for a bug of ours, also one
line ("internal error (please report)"). No traceback. Strings from files are printed through
:func:`exl2.errors.printable`, never as rich markup. The table: docs/validating.md.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import Exl2Error, printable
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
    return typer.Exit(error.exit_status)


def internal_error(e: BaseException) -> str:
    """The one line printed for a bug of ours."""
    first = str(e).splitlines()[0] if str(e) else ""
    return printable(f"exl2: internal error (please report): {type(e).__name__}: {first}")


def main() -> None:
    """The ``exl2`` command: runs the verb, and turns every way it can end into one line and an
    exit status (docs/validating.md, "Exit status")."""
    for stream in (sys.stdout, sys.stderr):  # a file name no terminal encoding can show must not crash a print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        sys.exit(_run())
    except BrokenPipeError:  # `exl2 ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _run() -> int:
    try:
        status = app(standalone_mode=False)
    except Exl2Error as e:  # a verb that did not catch its own
        print(f"exl2: error: {e.one_line()}", file=sys.stderr)
        return e.exit_status
    except typer.TyperException as e:  # misuse found by the argument parser: one line, not a usage box
        if type(e).__name__ == "NoArgsIsHelpError":  # `exl2` or `exl2 conformance` alone: the help
            print(e.format_message())
        else:
            print(usage_error(e), file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except (KeyboardInterrupt, typer.Abort):
        print("exl2: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except ModuleNotFoundError as e:  # a verb that needs an extra that is not installed
        hint = missing_extra(e)
        if hint is None:
            print(internal_error(e), file=sys.stderr)
            return 3
        print(f"exl2: error: {hint}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, but say it is one
        print(internal_error(e), file=sys.stderr)
        return 3
    return status if isinstance(status, int) else 0


def usage_error(e: Exception) -> str:
    """One line for an error of the argument parser, pointing at the verb's help."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "exl2"
    first = " ".join(message.split())
    return printable(f"exl2: error: {first} (see: {command} --help)")
