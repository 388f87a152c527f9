"""Errors raised for malformed input. Each names the file and tensor it is about, so that the
CLI can print it as one line."""

from __future__ import annotations


class Exl2Error(Exception):
    """Base of every error this package raises for bad input."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 code: str | None = None) -> None:
        self.message = message
        self.file = file
        self.tensor = tensor
        self.code = code  # the finding code of the broken rule (spec/findings.md), when there is one
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ": ".join(p for p in (self.file, self.tensor) if p)
        message = f"{self.message} [{self.code}]" if self.code else self.message
        return f"{where}: {message}" if where else message

    def at(self, *, file: str | None = None, tensor: str | None = None) -> "Exl2Error":
        """The same error with the file (and tensor, if not yet known) filled in."""
        return type(self)(self.message, file=self.file or file, tensor=self.tensor or tensor, code=self.code)


class FormatError(Exl2Error):
    """The tensors break a rule of the EXL2 spec."""


class ContainerError(Exl2Error):
    """The file is not a readable safetensors file, or the path holds no model."""
