"""The one strict parser of safetensors headers (spec 2.2), used by the reader (:mod:`exl2.io`)
and the validator (:mod:`exl2.conformance.container`).

Everything in a header is hostile data. Only the 8-byte length and the header's own bytes are
read, after the length is checked against the file size and the 100 MB limit. The JSON is not
handed whole to ``json.loads``: the top level and ``__metadata__`` are walked pair by pair, each
entry is parsed from a slice of at most :data:`MAX_ENTRY_CHARS` characters, and the walk stops at
the first pair over a limit (:data:`MAX_TENSORS` entries, :data:`MAX_METADATA` metadata pairs). A
100 MB header of millions of empty objects therefore costs no more than :data:`MAX_TENSORS` real
entries, not gigabytes of Python objects. Nesting deeper than JSON parsing allows, numbers longer
than Python converts (4300 digits), ``NaN``/``Infinity``, text that is not UTF-8, lone surrogates,
names given twice (at any depth), control characters in tensor names and entries that are not
exactly ``dtype``/``shape``/``data_offsets`` are refused; shapes are multiplied as Python integers
and compared with the bytes the entry spans, and the byte ranges must tile the data area.

Each broken rule goes to ``report(code, tensor, message)`` with its finding code
(spec/findings.md): the reader raises at the first, the validator collects them all (at most
:data:`MAX_REPORTS` per file: a header whose entries are all broken is not walked to its end).
"""

from __future__ import annotations

import json
import math
import operator
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ContainerError

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: Largest header read: the safetensors library's own limit (``MAX_HEADER_SIZE``, 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Most tensors one file may declare: bounds the time and memory a header costs.
MAX_TENSORS = 1_000_000
#: Longest entry read, in characters of JSON text: a real one (8 dimensions of 20 digits) is
#: under 300. Each entry is parsed from a slice this long, so that one hostile value costs at most
#: this much text's worth of Python objects.
MAX_ENTRY_CHARS = 4096
#: Most ``__metadata__`` pairs (real files have a handful).
MAX_METADATA = 100_000
#: Findings reported per file; the walk stops at the entry that reaches this many.
MAX_REPORTS = 100
#: Characters a tensor name must not hold: C0 and C1 controls and DEL.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: ``report(code, tensor, message)``: receives every broken rule.
Report = Callable[[str, "str | None", str], None]


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: ``begin``/``end`` are offsets into the data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A header that passed every check: tensors in header order, the data area's start."""

    path: Path
    size: int  #: bytes of the file
    data_start: int  #: 8 + the header's length: where tensor bytes begin
    metadata: dict[str, str] | None
    entries: tuple[Entry, ...]


class _Refused(ValueError):
    """JSON text the parser refuses (``EXL2-C002``), raised from the walk or the decoder's hooks."""


def _object(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook``: a JSON object with no name given twice and no lone surrogate."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"names {_short(dup)} twice in one object")
    for k in obj:
        if not k.isascii():
            _no_surrogate(k)
    return obj


def _no_surrogate(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(f"holds a lone surrogate in {_short(s)} (not Unicode; the safetensors library "
                           f"refuses it)") from None


def _constant(name: str) -> float:
    raise _Refused(f"holds {name}, which is not JSON")


class _Reporter:
    """Passes the first :data:`MAX_REPORTS` findings on and counts the rest, per code."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.count = 0
        self.unlisted: dict[str, int] = {}

    def __call__(self, code: str, tensor: str | None, message: str) -> None:
        self.count += 1
        if self.count <= MAX_REPORTS:
            self.report(code, tensor, message)
        else:
            self.unlisted[code] = self.unlisted.get(code, 0) + 1

    @property
    def failed(self) -> bool:
        return self.count > 0

    @property
    def full(self) -> bool:
        return self.count >= MAX_REPORTS

    def close(self) -> None:
        for code, n in self.unlisted.items():
            self.report(code, None, f"{n:,} more findings of this code in this header (not listed)")


def read_raw_header(path: Path, report: Report) -> tuple[bytes, int] | None:
    """The header's bytes and the file size, after checking the declared length against both;
    None (after reporting ``EXL2-C001``) when it does not fit. Raises :class:`ContainerError`
    when the system cannot read the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                report("EXL2-C001", None, f"file has {size} bytes, fewer than the 8-byte header length")
                return None
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                report("EXL2-C001", None, f"header length {n} exceeds the file ({size} bytes) or the "
                                          f"{MAX_HEADER_BYTES}-byte limit")
                return None
            raw = f.read(n)
    except OSError as e:
        raise ContainerError(f"cannot be read ({e.strerror or type(e).__name__})", file=str(path)) from None
    if len(raw) != n:  # the file shrank since stat()
        report("EXL2-C001", None, f"header length {n} exceeds the file")
        return None
    return raw, size


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)


def parse_entries(raw: bytes, data_size: int, report: Report) -> tuple[dict | None, list[Entry]] | None:
    """``__metadata__`` and the entries of the header ``raw`` (whose file has ``data_size`` bytes
    after it), or None after reporting why not: ``EXL2-C002`` when it is not UTF-8 JSON text of
    one object (names given twice at any depth, ``NaN``, numbers beyond Python's 4300 digits, lone
    surrogates and nesting deeper than JSON parsing allows included), ``EXL2-C003``/``EXL2-C004``
    for each broken entry (:func:`_entry`), ``EXL2-C003`` for more than :data:`MAX_TENSORS`
    tensors, an entry longer than :data:`MAX_ENTRY_CHARS` or a ``__metadata__`` that is not a map
    of strings.

    The top level and ``__metadata__`` are walked pair by pair, each entry parsed from a bounded
    slice and checked at once (only its :class:`Entry` is kept), and the walk stops at the first
    pair over a limit or at the :data:`MAX_REPORTS`-th finding: a hostile header costs no more
    time and memory than :data:`MAX_TENSORS` real entries, whatever its 100 MB hold."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report("EXL2-C002", None, f"header is not UTF-8 (byte {e.start})")
        return None
    try:
        return _walk(text, data_size, report)
    except _Refused as e:
        report("EXL2-C002", None, f"header {e}")
    except RecursionError:
        report("EXL2-C002", None, "header is nested deeper than JSON parsing allows (a header needs 3 levels)")
    except json.JSONDecodeError as e:
        report("EXL2-C002", None, f"header is not valid JSON: {e.msg} at character {e.pos}")
    except ValueError as e:  # an integer beyond Python's conversion limit (4300 digits)
        report("EXL2-C002", None, f"header is not usable JSON: {str(e).splitlines()[0][:100]}")
    return None


def _walk(text: str, data_size: int, report: _Reporter) -> tuple[dict | None, list[Entry]] | None:
    """The top-level object, pair by pair (see :func:`parse_entries`)."""
    names: set[str] = set()
    metadata: dict | None = None
    entries: list[Entry] = []
    pairs = _Pairs(text, _SPACE.match(text).end(), "header")
    for name, pos in pairs:
        if name in names:
            raise _Refused(f"names {_short(name)} twice in one object")
        names.add(name)
        if name == "__metadata__":
            metadata, end = _metadata(text, pos, report)
        elif len(entries) == MAX_TENSORS:
            report("EXL2-C003", None, f"declares more than {MAX_TENSORS:,} tensors")
            return None
        else:
            value, end = _bounded_value(text, pos, name, report)
            entry = _entry(name, value, data_size, report) if end is not None else None
            if entry is not None:
                entries.append(entry)
        if end is None:
            return None
        if report.full:
            report.report("EXL2-C003", None, f"{MAX_REPORTS} broken entries: the rest of the header is not checked")
            return None
        pairs.end = end
    return metadata, entries


class _Pairs:
    """The pairs of the JSON object at ``pos`` in ``text``: iterating yields ``(name, where its
    value starts)``; the consumer parses the value and sets :attr:`end` to where it ends before
    asking for the next pair. Checks the names, colons, commas and the closing brace, and for
    the header that nothing follows it; after the loop :attr:`end` is where the object ends."""

    def __init__(self, text: str, pos: int, what: str) -> None:
        if not text.startswith("{", pos):
            raise _Refused(f"is not a JSON object ({what} starts with {text[pos:pos + 10]!r})")
        self.text, self.end, self.what = text, pos + 1, what

    def __iter__(self):
        text = self.text
        pos = _SPACE.match(text, self.end).end()
        if not text.startswith("}", pos):
            while True:
                if not text.startswith('"', pos):
                    raise _Refused(f"is not valid JSON: expecting a name in double quotes at character {pos}")
                name, pos = _DECODER.raw_decode(text, pos)
                _no_surrogate(name)
                pos = _SPACE.match(text, pos).end()
                if not text.startswith(":", pos):
                    raise _Refused(f"is not valid JSON: expecting ':' at character {pos}")
                yield name, _SPACE.match(text, pos + 1).end()
                pos = _SPACE.match(text, self.end).end()
                if not text.startswith(",", pos):
                    break
                pos = _SPACE.match(text, pos + 1).end()
        if not text.startswith("}", pos):
            raise _Refused(f"is not valid JSON: expecting ',' or '}}' at character {pos}")
        self.end = pos + 1
        if self.what == "header" and _SPACE.match(text, self.end).end() != len(text):
            raise _Refused(f"is not valid JSON: text after the object at character {self.end}")


def _bounded_value(text: str, pos: int, name: str, report: Report) -> tuple[object, int | None]:
    """The JSON value at ``pos`` and where it ends, parsed from at most :data:`MAX_ENTRY_CHARS`
    characters; ``(None, None)`` after reporting ``EXL2-C003`` when it does not end within them."""
    chunk = text[pos:pos + MAX_ENTRY_CHARS]
    try:
        value, end = _DECODER.raw_decode(chunk)
    except json.JSONDecodeError:
        if pos + len(chunk) == len(text):
            raise  # the whole rest was there: a syntax error
        report("EXL2-C003", name, f"entry is not a JSON value of at most {MAX_ENTRY_CHARS} characters")
        return None, None
    return value, pos + end


def _metadata(text: str, pos: int, report: Report) -> tuple[dict | None, int | None]:
    """``__metadata__`` at ``pos``: null, or an object of at most :data:`MAX_METADATA` string
    pairs; ``(None, None)`` after reporting ``EXL2-C003`` otherwise."""
    if text.startswith("null", pos):
        return None, pos + 4
    if not text.startswith("{", pos):
        report("EXL2-C003", None, "__metadata__ must map strings to strings")
        return None, None
    meta: dict[str, str] = {}
    pairs = _Pairs(text, pos, "__metadata__")
    for key, at in pairs:
        if key in meta:
            raise _Refused(f"names {_short(key)} twice in one object")
        if len(meta) == MAX_METADATA or not text.startswith('"', at):
            report("EXL2-C003", None, f"__metadata__ must map strings to strings (at most {MAX_METADATA:,})")
            return None, None
        value, pairs.end = _DECODER.raw_decode(text, at)  # a string: it costs what its bytes cost
        _no_surrogate(value)
        meta[key] = value
    return meta, pairs.end


def parse_header(path: str | Path, report: Report) -> Header | None:
    """Check ``path``'s safetensors header against every rule of spec 2.2 (codes C001 to C005);
    each broken rule goes to ``report``. Returns the header when every rule holds, else None.
    Raises :class:`ContainerError` only when the system cannot read the file."""
    path = Path(path)
    rep = _Reporter(report)
    got = read_raw_header(path, rep)
    if got is None:
        return None
    raw, size = got
    data_size = size - 8 - len(raw)
    parsed = parse_entries(raw, data_size, rep)
    if parsed is None:
        rep.close()
        return None
    metadata, entries = parsed
    if not rep.failed:
        _check_tiling(entries, data_size, rep)
    rep.close()
    if rep.failed:
        return None
    return Header(path, size, 8 + len(raw), metadata, tuple(entries))


def _entry(name: str, e: object, data_size: int, report: Report) -> Entry | None:
    """The entry ``name: e``, or None after reporting its first broken rule."""
    def bad(code: str, message: str) -> None:
        report(code, name, message)

    if CONTROL.search(name):
        bad("EXL2-C003", "tensor name holds a control character")
        return None
    if not isinstance(e, dict) or len(e) != 3 or not {"dtype", "shape", "data_offsets"} <= e.keys():
        bad("EXL2-C003", "entry must have exactly dtype, shape and data_offsets")
        return None
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        bad("EXL2-C003", f"unknown dtype {_short(dtype)}")
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
        bad("EXL2-C004", f"{dtype} {_short(shape)} needs {nbytes} bytes, data_offsets span {end - begin}")
        return None
    return Entry(name, dtype, tuple(shape), begin, end)


def _check_tiling(entries: list[Entry], data_size: int, report: Report) -> None:
    """The byte ranges must tile the data area exactly, as safetensors readers require."""
    pos = 0
    failed = False
    for e in sorted(entries, key=operator.attrgetter("begin", "end")):
        if e.begin != pos:
            what = "overlaps the tensor before it" if e.begin < pos else f"leaves a gap of {e.begin - pos} bytes before it"
            report("EXL2-C005", e.name, f"byte range [{e.begin}, {e.end}) {what}")
            failed = True
        pos = max(pos, e.end)
    if not failed and pos != data_size:
        report("EXL2-C005", None, f"{data_size - pos} bytes after the last tensor")


def _short(value: object) -> str:
    """A JSON value from a header, shown in at most about 40 characters."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["DTYPE_SIZES", "Entry", "Header", "MAX_HEADER_BYTES", "MAX_TENSORS", "Report", "parse_header"]
