"""Strict checks of a safetensors file's header, run before any tensor byte is read (spec 2.2).

Only the 8-byte length and the header bytes are read. Every size is checked against the file
size before it is used, so no allocation is ever sized by an unchecked header value.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .findings import Finding, finding

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: Largest header read (safetensors' own limit is 100 MB).
MAX_HEADER = 100_000_000
#: Most tensors one file may declare: keeps the time per file bounded.
MAX_TENSORS = 1_000_000


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate name {dup!r}")
    return dict(pairs)


def check_file(path: Path) -> ContainerCheck:
    """Check ``path``'s safetensors header. Never raises."""
    file = str(path)
    out = ContainerCheck(path, [], [])

    def fail(code: str, message: str, tensor: str | None = None) -> ContainerCheck:
        out.findings.append(finding(code, file=file, tensor=tensor, message=message))
        return out

    try:
        size = out.size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return fail("EXL2-C001", f"file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                return fail("EXL2-C001", f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as e:
        return fail("EXL2-C009", f"cannot be read ({e.strerror or e})")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return fail("EXL2-C002", f"header is not valid JSON: {str(e).splitlines()[0][:120]}")
    if not isinstance(header, dict):
        return fail("EXL2-C002", f"header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        fail("EXL2-C003", "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        return fail("EXL2-C003", f"declares {len(header)} tensors, more than {MAX_TENSORS}")

    data_size = size - 8 - n
    for name, e in header.items():
        entry = _entry(name, e, data_size, out, file)
        if entry is not None:
            out.entries.append(entry)
    if not out.ok:
        return out
    # The byte ranges must tile the data area exactly, as safetensors readers require.
    pos = 0
    for e in sorted(out.entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the tensor before it" if e.begin < pos else f"leaves a gap of {e.begin - pos} bytes before it"
            fail("EXL2-C005", f"byte range [{e.begin}, {e.end}) {what}", tensor=e.name)
        pos = max(pos, e.end)
    if out.ok and pos != data_size:
        fail("EXL2-C005", f"{data_size - pos} bytes after the last tensor")
    return out


def _entry(name: str, e: object, data_size: int, out: ContainerCheck, file: str) -> Entry | None:
    def bad(code: str, message: str) -> None:
        out.findings.append(finding(code, file=file, tensor=name, message=message))

    if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
        bad("EXL2-C003", "entry must have exactly dtype, shape and data_offsets")
        return None
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPE_SIZES:
        bad("EXL2-C003", f"unknown dtype {str(dtype)[:20]!r}")
        return None
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
        bad("EXL2-C003", "shape must be a list of at most 8 non-negative integers")
        return None
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        bad("EXL2-C003", "data_offsets must be two integers 0 <= begin <= end")
        return None
    begin, end = offsets
    if end > data_size:
        bad("EXL2-C004", f"data_offsets end {end} beyond the {data_size} data bytes of the file")
        return None
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != end - begin:
        bad("EXL2-C004", f"{dtype} {shape} needs {nbytes} bytes, data_offsets span {end - begin}")
        return None
    return Entry(name, dtype, tuple(shape), begin, end)
