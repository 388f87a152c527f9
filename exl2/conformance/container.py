"""Strict checks of a safetensors file's header, run before any tensor byte is read (spec 2.2):
the findings of :func:`exl2.header.parse_header`, the one parser the reader uses too.

Only the 8-byte length and the header bytes are read. Every size is checked against the file
size before it is used, so no allocation is ever sized by an unchecked header value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ContainerError
from ..header import DTYPE_SIZES, MAX_HEADER_BYTES, MAX_TENSORS, Entry, parse_header
from .findings import Finding, finding

#: Largest header read (safetensors' own limit is 100 MB).
MAX_HEADER = MAX_HEADER_BYTES


@dataclass
class ContainerCheck:
    """The result of checking one file: findings, and the entries when the header is usable."""

    path: Path
    findings: list[Finding]
    entries: list[Entry]
    size: int = 0  #: bytes of the file (0 when it cannot be read)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def check_file(path: Path) -> ContainerCheck:
    """Check ``path``'s safetensors header. Never raises for any content of the file."""
    file = str(path)
    out = ContainerCheck(path, [], [])

    def report(code: str, tensor: str | None, message: str) -> None:
        out.findings.append(finding(code, file=file, tensor=tensor, message=message))

    try:
        header = parse_header(path, report)
    except ContainerError as e:
        report("EXL2-C009", None, e.message)
        return out
    try:
        out.size = path.stat().st_size
    except OSError:
        pass
    if header is not None:
        out.entries = list(header.entries)
    return out


__all__ = ["DTYPE_SIZES", "MAX_HEADER", "MAX_TENSORS", "ContainerCheck", "Entry", "check_file"]
