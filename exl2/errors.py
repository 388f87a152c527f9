"""Errors raised for bad input or a request that cannot be carried out. Each names the file and
tensor it is about, so that the CLI can print it as one line, and carries the exit status the CLI
gives it (README's contract: 1 the input breaks a rule of the format, 2 it cannot be read or the
command is misused; docs/validating.md has the table)."""

from __future__ import annotations


#: Longest text shown from a file: longer strings keep their start and end around a count.
MAX_SHOWN = 1000


def printable(text: object) -> str:
    """``text`` as one printable line: controls, line breaks, lone surrogates (from undecodable
    file names or JSON escapes) and every other character Python does not count as printable
    (format characters such as U+202E reorder a terminal's line) escaped as ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN``. Every string that comes from a file goes through this before
    it is printed, so that it can neither break the one-line contract, raise UnicodeEncodeError,
    nor drive the terminal. Text longer than :data:`MAX_SHOWN` keeps its start and end."""
    s = str(text)
    if len(s) > MAX_SHOWN:  # a 100 MB tensor name is legal; a 100 MB error line is not useful
        s = f"{s[:MAX_SHOWN - 200]}...({len(s) - MAX_SHOWN + 100:,} characters)...{s[-100:]}"
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


class Exl2Error(Exception):
    """Base of every error this package raises for bad input. Raised as such, it means that what
    was asked cannot be done (a target out of range, an option that does not apply): exit 2."""

    #: The exit status of the ``exl2`` command for this error.
    exit_status = 2

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 code: str | None = None) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        self.code = code  # the finding code of the broken rule (spec/findings.md), when there is one
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """``file: tensor: message [code]`` on one printable line (see :func:`printable`)."""
        where = ": ".join(printable(p) for p in (self.file, self.tensor) if p)
        message = printable(f"{self.message} [{self.code}]" if self.code else self.message)
        return f"{where}: {message}" if where else message

    def at(self, *, file: str | None = None, tensor: str | None = None) -> "Exl2Error":
        """The same error with the file (and tensor, if not yet known) filled in."""
        return type(self)(self.message, file=self.file or file, tensor=self.tensor or tensor, code=self.code)


class FormatError(Exl2Error):
    """The input breaks a rule of the EXL2 spec (safetensors container rules of spec 2.2
    included): the validator reports the same input with a finding code. Exit 1."""

    exit_status = 1


class ContainerError(Exl2Error):
    """The input cannot be read at all: the path does not exist, is not a model folder or a
    ``.safetensors`` file, or the system refuses to read it. Exit 2."""


class UsageError(Exl2Error):
    """The command is misused: an option out of range, an output that cannot be written where it
    was asked for, a backend that is not installed. Exit 2."""
