"""The reader and the writers of exl2.io: the strict header parser on every hostile header (the
same verdict as the validator's container check, one printable line, bounded time and memory),
Model's tensors against the safetensors library (an independent reader) and its open files,
and atomic writes that lose nothing when a rename fails."""

from __future__ import annotations

import os
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exl2 import io as exl2_io
from exl2.conformance.container import check_file
from exl2.conformance.fuzz import LAYER, seed_file
from exl2.conformance.hostile import empty_objects_header, hostile_files
from exl2.errors import ContainerError, FormatError, UsageError
from exl2.header import MAX_HEADER_BYTES
from exl2.io import Model, atomic_path, read_header, save_tensors


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("seed") / "seed.safetensors"
    seed_file(p)
    return p.read_bytes()


HOSTILE_TENSOR = LAYER + ".q_scale"


def test_hostile_headers_get_the_validators_verdict(seed, tmp_path):
    """Every hostile variant: the reader refuses it (FormatError with the finding code, one
    printable line naming the file) exactly when the validator's container check finds an error;
    nothing else is ever raised."""
    p = tmp_path / "x.safetensors"
    variants = list(hostile_files(seed, HOSTILE_TENSOR))
    assert len(variants) > 300
    refused = 0
    for label, data in variants:
        p.write_bytes(data)
        check = check_file(p)
        try:
            read_header(p)
        except FormatError as e:
            refused += 1
            assert not check.ok, label
            line = e.one_line()
            assert line.isprintable() and str(p) in line and "[EXL2-C00" in line, (label, line)
            assert {f.code for f in check.findings if f.severity == "error"} >= {line[-10:-1]}, (label, line)
        else:
            assert check.ok, (label, [(f.code, f.message) for f in check.findings])
    assert refused > 0.9 * len(variants)


@pytest.mark.parametrize("label,expected", [
    ("duplicate name", "EXL2-C002"), ("duplicate field", "EXL2-C002"), ("extra entry key", "EXL2-C003"),
    ("nesting 200k deep", "EXL2-C002"), ("integer of 5000 digits", "EXL2-C003"), ("NaN offset", "EXL2-C002"),
    ("encoded surrogate", "EXL2-C002"), ("huge shape product", "EXL2-C004"), ("header is a list", "EXL2-C002"),
])
def test_named_hostile_headers(seed, tmp_path, label, expected):
    from exl2.conformance.hostile import raw_headers

    p = tmp_path / "x.safetensors"
    p.write_bytes(raw_headers(seed, HOSTILE_TENSOR)[label])
    with pytest.raises(FormatError, match=expected):
        read_header(p)
    assert expected in {f.code for f in check_file(p).findings}


@pytest.mark.parametrize("name,expected", [("a\x00b", "EXL2-C003"), ("x\ny", "EXL2-C003"), ("\x1b[31m", "EXL2-C003"),
                                           ("\ud800", "EXL2-C002"), ("x\udcff", "EXL2-C002"), ("[/]", None)])
def test_tensor_names(seed, tmp_path, name, expected):
    from exl2.conformance.hostile import renamed

    p = tmp_path / "x.safetensors"
    p.write_bytes(renamed(seed, "model.norm.weight", name))
    if expected is None:  # markup characters are legal in a name: read and kept as they are
        assert name in Model(p)
        assert check_file(p).ok
        return
    with pytest.raises(FormatError, match=expected) as e:
        read_header(p)
    assert e.value.one_line().isprintable()


def test_dtype_of_any_json_type_is_refused(seed, tmp_path):
    from exl2.conformance.hostile import wrong_value

    p = tmp_path / "x.safetensors"
    for raw in ('["F16"]', '{"F16": 1}', "16", "null", "true", '"f16"'):
        p.write_bytes(wrong_value(seed, HOSTILE_TENSOR, "dtype", raw))
        with pytest.raises(FormatError, match="unknown dtype .*EXL2-C003"):
            read_header(p)


def write_chunked(path: Path, header_bytes: int, entry: bytes) -> None:
    """A file whose header repeats ``entry % i`` (distinct names) for ``header_bytes`` bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_bytes))
        f.write(b"{")
        size, i = 1, 0
        chunk = []
        while size < header_bytes - 32:
            part = entry % i
            chunk.append(part)
            size += len(part)
            i += 1
            if len(chunk) == 100_000:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))
        f.write(b'"end":{}}'.ljust(header_bytes - size))


@pytest.mark.parametrize("entry", [b'"%x":{},', b'"%040x":1,', b'"%x":{"dtype":"U8","shape":[0],"data_offsets":[0,1]},'])
def test_100_mb_header_of_broken_entries_is_cheap(tmp_path, entry):
    """A header just under the 100 MB limit, of millions of distinct broken entries: refused at
    the first entry, in well under a second of parsing and without building them (a parser that
    does needs gigabytes)."""
    p = tmp_path / "big.safetensors"
    write_chunked(p, MAX_HEADER_BYTES - 1000, entry)
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(FormatError, match="EXL2-C00[34]"):
        read_header(p)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.2 * MAX_HEADER_BYTES  # the header's bytes and their text, nothing per entry
    assert seconds < 20  # reading and decoding 100 MB on a loaded machine; the walk stops at once
    check = check_file(p)
    assert not check.ok and len(check.findings) <= 110


def test_empty_objects_header_from_the_issue(tmp_path):
    p = tmp_path / "empty-objects.safetensors"
    p.write_bytes(empty_objects_header(2_000_000))
    with pytest.raises(FormatError, match="exactly dtype, shape and data_offsets"):
        read_header(p)


# -- Model ----------------------------------------------------------------------------------------


ALL_DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
              "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
              "u16": torch.uint16, "u32": torch.uint32, "u64": torch.uint64, "bool": torch.bool,
              "f8e4m3": torch.float8_e4m3fn, "f8e5m2": torch.float8_e5m2}


def random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for i, (name, dtype) in enumerate(ALL_DTYPES.items()):
        shape = [(2, 3), (), (0, 4), (5,), (1, 1, 7)][i % 5]
        bits = torch.randint(0, 256, (torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(),),
                             dtype=torch.uint8, generator=g)
        t = bits.view(dtype).reshape(shape)
        out[name] = t if dtype != torch.bool else t.to(torch.uint8).bitwise_and(1).to(torch.bool)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def test_model_reads_what_the_safetensors_library_reads(tmp_path):
    p = tmp_path / "all.safetensors"
    save_file(random_tensors(), str(p), metadata={"format": "pt"})  # written by the library itself
    with safe_open(str(p), framework="pt") as ref, Model(p) as m:
        assert set(m) == set(ref.keys())
        for name in ref.keys():
            assert same_bits(m[name], ref.get_tensor(name)), name


def test_writer_output_loads_in_the_safetensors_library(tmp_path):
    t = random_tensors()
    p = tmp_path / "w.safetensors"
    save_tensors(p, t, metadata={"format": "pt"})
    with safe_open(str(p), framework="pt") as ref:
        for name, tensor in t.items():
            assert same_bits(ref.get_tensor(name), tensor), name
        assert ref.metadata() == {"format": "pt"}


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_model_keeps_at_most_one_file_open_and_closes_it(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"output-0000{i + 1}-of-00003.safetensors")
        save_tensors(files[-1], {f"t{i}": torch.full((4,), i, dtype=torch.int32)})
    with Model(tmp_path) as m:
        for i in range(3):
            assert torch.equal(m[f"t{i}"], torch.full((4,), i, dtype=torch.int32))
            assert sum(str(f) in open_fds() for f in files) == 1
        m.close()
        assert not any(str(f) in open_fds() for f in files)
        assert m["t0"].tolist() == [0] * 4  # usable after close: reopens
    assert not any(str(f) in open_fds() for f in files)


def in_threads(fn, n: int) -> None:
    """Run ``fn(0) .. fn(n - 1)`` at once, each in its own thread, and wait for all."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_model_reads_from_several_threads(tmp_path):
    expected = {}
    for i in range(2):
        t = {f"s{i}.t{j}": torch.arange(1000, dtype=torch.int32) * (i * 10 + j) for j in range(8)}
        save_tensors(tmp_path / f"output-0000{i + 1}-of-00002.safetensors", t)
        expected |= t
    bad = []
    with Model(tmp_path) as m:
        def read(k):
            for _ in range(20):
                for name in (sorted(expected) if k % 2 else sorted(expected, reverse=True)):
                    if not torch.equal(m[name], expected[name]):
                        bad.append(name)

        in_threads(read, 4)
    assert bad == []


def test_tensor_in_two_shards_is_a_rule(tmp_path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(1)})
    save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(FormatError, match=r"is also in a.safetensors \[EXL2-C006\]") as e:
        Model(tmp_path)
    assert e.value.tensor == "x" and e.value.file.endswith("b.safetensors")


def test_file_shrunk_after_indexing_is_unreadable(tmp_path):
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"a": torch.zeros(4), "b": torch.zeros(64)})
    m = Model(p)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    with pytest.raises(ContainerError, match="cannot be read") as e:
        m["b"]
    assert e.value.tensor == "b"


def test_config_that_is_not_an_object_is_a_rule(tmp_path):
    save_tensors(tmp_path / "output.safetensors", {"a": torch.zeros(1)})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="EXL2-K001"):
        Model(tmp_path).config
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # beyond what JSON parsing allows
    with pytest.raises(FormatError, match="EXL2-K001"):
        Model(tmp_path).config


# -- atomic writes --------------------------------------------------------------------------------


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) and its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def failing_replace(fail_on: int):
    """An os.replace that raises on its ``fail_on``-th call (1-based) and works otherwise."""
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_on:
            raise OSError(28, "No space left on device (simulated)")
        return real(src, dst)

    return replace, calls


def write_folder(tmp: Path, marker: bytes) -> None:
    (tmp / "sub").mkdir()
    (tmp / "a.bin").write_bytes(marker * 10)
    (tmp / "sub" / "b.bin").write_bytes(marker)


@pytest.mark.parametrize("fail_on", [1, 2])
def test_failed_rename_of_a_folder_loses_nothing(tmp_path, monkeypatch, fail_on):
    """Replacing a folder takes two renames (old aside, new into place): whichever fails, the old
    folder is there afterwards with every byte, and no temporary folder is left beside it."""
    target = tmp_path / "model"
    target.mkdir()
    write_folder(target, b"old")
    before = tree(target)
    replace, calls = failing_replace(fail_on)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UsageError, match="cannot be written .*No space left"):
        with atomic_path(target, folder=True) as tmp:
            write_folder(tmp, b"new")
    assert len(calls) >= fail_on
    assert tree(target) == before
    assert os.listdir(tmp_path) == ["model"]


def test_failed_rename_of_a_file_loses_nothing(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    save_tensors(target, {"a": torch.ones(3)})
    before = target.read_bytes()
    replace, _ = failing_replace(1)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UsageError, match="No space left"):
        save_tensors(target, {"a": torch.zeros(3)})
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    write_folder(target, b"old")
    (target / "stale.bin").write_bytes(b"x")
    with atomic_path(target, folder=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        write_folder(tmp, b"new")
    assert tree(target) == {"a.bin": b"new" * 10, "sub/b.bin": b"new"}
    assert os.listdir(tmp_path) == ["model"]


def test_error_in_the_block_leaves_the_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    write_folder(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, folder=True) as tmp:
            write_folder(tmp, b"new")
            raise RuntimeError("interrupted")
    assert tree(target) == {"a.bin": b"old" * 10, "sub/b.bin": b"old"}
    assert os.listdir(tmp_path) == ["model"]


def test_kinds_are_never_swapped(tmp_path):
    folder, file = tmp_path / "d", tmp_path / "f.safetensors"
    folder.mkdir()
    (folder / "keep").write_bytes(b"k")
    file.write_bytes(b"f")
    with pytest.raises(UsageError, match="is a folder"):
        save_tensors(folder, {"a": torch.zeros(1)})
    with pytest.raises(UsageError, match="is a file"):
        with atomic_path(file, folder=True):
            pass
    with pytest.raises(UsageError, match="is a file; it is not replaced by a folder"):  # a caller's own folder
        with atomic_path(file) as tmp:
            tmp.unlink()
            tmp.mkdir()
    assert (folder / "keep").read_bytes() == b"k" and file.read_bytes() == b"f"
    assert sorted(os.listdir(tmp_path)) == ["d", "f.safetensors"]


def test_path_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(UsageError, match="plain is not a folder"):
        save_tensors(tmp_path / "plain" / "sub" / "w.safetensors", {"a": torch.zeros(1)})


def test_unwritable_place_is_refused(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(exl2_io.tempfile, "mkstemp", denied)
    with pytest.raises(UsageError, match="cannot be written .*Permission denied"):
        save_tensors(tmp_path / "w.safetensors", {"a": torch.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_modes_follow_the_umask_without_changing_it(tmp_path, monkeypatch):
    """New files and folders get the modes open() and mkdir() would give, and no write calls
    os.umask (a process-wide setting: flipping it races with every other thread)."""
    def no_umask(*a):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", no_umask)
    results = []

    def write(i):
        save_tensors(tmp_path / f"{i}.safetensors", {"a": torch.zeros(1)})
        with atomic_path(tmp_path / f"d{i}", folder=True) as tmp:
            (tmp / "x").write_bytes(b"x")
        results.append(i)

    in_threads(write, 4)
    assert sorted(results) == [0, 1, 2, 3]
    for i in range(4):
        assert (tmp_path / f"{i}.safetensors").stat().st_mode & 0o777 == 0o666 & ~exl2_io.UMASK
        assert (tmp_path / f"d{i}").stat().st_mode & 0o777 == 0o777 & ~exl2_io.UMASK


def test_umask_is_read_from_the_process(tmp_path):
    import subprocess
    import sys

    code = "import os; os.umask(0o027); from exl2 import io; print(oct(io.UMASK))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "0o27", r.stderr


def test_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    order = []
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(len(synced)), real_replace(a, b)))
    with atomic_path(tmp_path / "model", folder=True) as tmp:
        write_folder(tmp, b"new")
    names = [Path(s).name for s in synced]
    assert "a.bin" in names and "b.bin" in names and "sub" in names
    assert order and order[0] >= 4  # both files, sub and the folder itself before the rename
    assert synced[-1] == str(tmp_path)  # and the parent after it
