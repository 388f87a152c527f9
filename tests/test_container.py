"""The safetensors header checker (spec 2.2): each malformed header gets its code and names the
tensor, only header bytes are read, no allocation follows an unchecked header value, and a file
it accepts is one the safetensors library itself loads (an independent reader)."""

from __future__ import annotations

import json
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from exl2 import header as header_parser
from exl2.conformance.container import check_file


def tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(6, dtype=torch.int32).reshape(2, 3), "b": torch.ones(5, dtype=torch.float16),
            "c": torch.zeros(0, 4, dtype=torch.int16)}


def raw(path: Path, header: object, data: bytes = b"", text: bytes | None = None) -> Path:
    body = json.dumps(header).encode() if text is None else text
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def codes(path: Path) -> set[tuple[str, str | None]]:
    return {(f.code, f.tensor) for f in check_file(path).findings}


@pytest.fixture
def valid(tmp_path) -> Path:
    p = tmp_path / "v.safetensors"
    save_file(tensors(), str(p), metadata={"format": "pt"})  # written by the safetensors library itself
    return p


def test_file_written_by_safetensors_is_accepted(valid):
    check = check_file(valid)
    assert check.findings == [] and check.ok
    assert {e.name: (e.dtype, e.shape) for e in check.entries} == {
        "a": ("I32", (2, 3)), "b": ("F16", (5,)), "c": ("I16", (0, 4))}
    assert check.size == valid.stat().st_size


# 24 data bytes: "x" is I32 [2, 3] at [0, 24)
GOOD = {"x": entry("I32", [2, 3], 0, 24)}


@pytest.mark.parametrize("case,header,data,expected", [
    ("no length", None, b"\x01\x02", ("EXL2-C001", None)),
    ("length past the end", "LONG", b"", ("EXL2-C001", None)),
    ("not utf-8", b"\xff\xfe{}", b"", ("EXL2-C002", None)),
    ("not json", b"{\"x\": ", b"", ("EXL2-C002", None)),
    ("a list", [1, 2], b"", ("EXL2-C002", None)),
    ("duplicate tensor", b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                         b'"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', bytes(2), ("EXL2-C002", None)),
    ("duplicate field", b'{"x": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1),
     ("EXL2-C002", None)),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, b"", ("EXL2-C002", None)),
    ("missing field", {"x": {"dtype": "I32", "shape": [2, 3]}}, bytes(24), ("EXL2-C003", "x")),
    ("extra field", {"x": GOOD["x"] | {"y": 1}}, bytes(24), ("EXL2-C003", "x")),
    ("entry not an object", {"x": [1]}, b"", ("EXL2-C003", "x")),
    ("unknown dtype", {"x": entry("Q4", [2, 3], 0, 24)}, bytes(24), ("EXL2-C003", "x")),
    ("negative dim", {"x": entry("I32", [-2, -3], 0, 24)}, bytes(24), ("EXL2-C003", "x")),
    ("float dim", {"x": entry("I32", [2.0, 3], 0, 24)}, bytes(24), ("EXL2-C003", "x")),
    ("bool dim", {"x": entry("U8", [True], 0, 1)}, bytes(1), ("EXL2-C003", "x")),
    ("nine dims", {"x": entry("U8", [1] * 9, 0, 1)}, bytes(1), ("EXL2-C003", "x")),
    ("reversed offsets", {"x": entry("I32", [2, 3], 24, 0)}, bytes(24), ("EXL2-C003", "x")),
    ("negative offset", {"x": entry("U8", [0], -1, -1)}, b"", ("EXL2-C003", "x")),
    ("metadata not strings", {"__metadata__": {"a": 1}} | GOOD, bytes(24), ("EXL2-C003", None)),
    ("bytes past the end", GOOD, bytes(20), ("EXL2-C004", "x")),
    ("length not dtype x shape", {"x": entry("I32", [2, 2], 0, 24)}, bytes(24), ("EXL2-C004", "x")),
    ("huge shape", {"x": entry("F16", [2**62, 2**62, 2**62], 0, 24)}, bytes(24), ("EXL2-C004", "x")),
    ("overlap", {"x": entry("U8", [4], 0, 4), "y": entry("U8", [4], 2, 6)}, bytes(6), ("EXL2-C005", "y")),
    ("gap", {"x": entry("U8", [4], 0, 4), "y": entry("U8", [2], 6, 8)}, bytes(8), ("EXL2-C005", "y")),
    ("trailing bytes", GOOD, bytes(30), ("EXL2-C005", None)),
])
def test_malformed_header_gets_its_code(tmp_path, case, header, data, expected):
    p = tmp_path / "x.safetensors"
    if header is None:
        p.write_bytes(data)
    elif header == "LONG":
        p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif isinstance(header, bytes):
        raw(p, None, data, text=header)
    else:
        raw(p, header, data)
    found = check_file(p).findings
    assert {(f.code, f.tensor) for f in found} == {expected}, [(f.code, f.tensor, f.message) for f in found]
    assert all(f.file == str(p) and f.severity == "error" for f in found)


def test_header_length_is_bounded_before_reading(tmp_path):
    # a 200 MB sparse file declaring a 150 MB header: refused from the 8 length bytes alone
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(200_000_000)
    tracemalloc.start()
    found = check_file(p).findings
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [f.code for f in found] == ["EXL2-C001"]
    assert peak < 1_000_000


def test_only_header_bytes_are_read(valid, monkeypatch):
    (n,) = struct.unpack("<Q", valid.read_bytes()[:8])
    read = []

    class Spy:
        def __init__(self, *a, **k):
            self.f = open(*a, **k)

        def read(self, size=-1):
            assert size >= 0  # never "read everything"
            out = self.f.read(size)
            read.append(len(out))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(header_parser, "open", Spy, raising=False)
    assert check_file(valid).ok
    assert sum(read) == 8 + n < valid.stat().st_size


def test_absurd_tensor_counts_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(header_parser, "MAX_TENSORS", 3)
    header = {f"t{i}": entry("U8", [1], i, i + 1) for i in range(4)}
    p = raw(tmp_path / "many.safetensors", header, bytes(4))
    assert codes(p) == {("EXL2-C003", None)}


def test_unreadable_file_is_a_finding(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    assert codes(d) == {("EXL2-C009", None)}


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    b = bytearray(data)
    if kind == 0:  # bytes of the header (and its length)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(min(len(b), 200))] = rng.randrange(256)
    elif kind == 1:
        return bytes(b[: rng.randrange(len(b))])
    elif kind == 2:
        return bytes(b) + bytes(rng.randint(1, 16))
    else:  # swap two digits of the header: shapes and offsets change
        (n,) = struct.unpack("<Q", data[:8])
        digits = [i for i in range(8, 8 + n) if chr(b[i]).isdigit()]
        i = rng.choice(digits)
        b[i] = ord(str(rng.randrange(10)))
    return bytes(b)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32))
def test_accepted_files_load_in_the_safetensors_library(tmp_path_factory, seed):
    """Independent oracle: whatever check_file accepts, safetensors' own reader loads, with the
    entries check_file reported."""
    folder = tmp_path_factory.mktemp("m")
    src = folder / "src.safetensors"
    save_file(tensors(), str(src))
    p = folder / "m.safetensors"
    p.write_bytes(mutate(src.read_bytes(), random.Random(seed)))
    check = check_file(p)
    for f in check.findings:
        assert f.severity == "error" and f.file == str(p)
    if check.ok:
        with safe_open(str(p), framework="pt") as st_file:
            for e in check.entries:
                t = st_file.get_tensor(e.name)
                assert tuple(t.shape) == e.shape
