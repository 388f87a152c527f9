"""Reading and writing EXL2 files (spec 2): safetensors only, never pickle.

Reading is lazy: :class:`Model` indexes the headers of every ``*.safetensors`` file of a folder
(or one file) with the strict parser :func:`exl2.header.parse_header` (the validator's), and reads
a tensor's bytes only when asked, at the offsets that parser checked. It holds at most one open
file; ``close()`` (or ``with``) releases it.
Writing is atomic: bytes go to a temporary file or folder beside the target, fsynced, and renamed
into place only once complete; a folder being replaced is first renamed aside and removed only
after the new one is in place, so a failure at any step leaves either the old or the new target.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ContainerError, Exl2Error, FormatError, UsageError
from .header import DTYPE_SIZES, Header, parse_header
from .layer_rules import layer_keys
from .qmatrix import QMatrix

#: safetensors dtype names and torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives, from its file's header: ``offset`` is the file position of its
    first byte, ``nbytes`` its length."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of a safetensors file (:func:`exl2.header.parse_header`). Raises
    :class:`FormatError` naming the file and tensor at the first broken rule of spec 2.2, with its
    finding code, and :class:`ContainerError` when the file cannot be read."""
    path = Path(path)

    def refuse(code: str, tensor: str | None, message: str) -> None:
        raise FormatError(f"{message} [{code}]", file=str(path), tensor=tensor)

    header = parse_header(path, refuse)
    assert header is not None  # refuse() raised otherwise
    return header


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a model: ``path`` itself, or every ``*.safetensors`` in the folder,
    sorted (exllamav2 indexes all of them and ignores ``model.safetensors.index.json``)."""
    if not path.exists():
        raise ContainerError("does not exist", file=str(path))
    if path.is_dir():
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if not files:
            raise ContainerError("holds no .safetensors file", file=str(path))
        return files
    if path.suffix != ".safetensors":
        raise ContainerError("is not a .safetensors file or a model folder", file=str(path))
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ContainerError("is not a regular file", file=str(path))
    return [path]


def config_path(path: Path) -> Path:
    """Where a model's config.json is: in the folder, or beside the single file."""
    return (path if path.is_dir() else path.parent) / "config.json"


class Model(Mapping[str, torch.Tensor]):
    """A model folder or a single safetensors file, read lazily. A read-only mapping from tensor
    name to tensor; ``config`` is ``config.json`` (``{}`` when there is none). Use it in a
    ``with`` block, or call :meth:`close`, to release the open file."""

    def __init__(self, path: str | os.PathLike, files: list[Path] | None = None) -> None:
        self.path = Path(path)
        self.files = shard_files(self.path) if files is None else files
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            header = read_header(f)
            for e in header.entries:
                if e.name in self.tensors:
                    raise FormatError(f"is also in {self.tensors[e.name].file.name} [EXL2-C006]", file=str(f),
                                      tensor=e.name)
                self.tensors[e.name] = TensorInfo(e.name, f, e.dtype, e.shape, header.data_start + e.begin,
                                                  e.end - e.begin)
        self._open: tuple[Path, object] | None = None  # the one file kept open: (path, file object)
        self._lock = threading.Lock()  # reads from several threads share that file's position

    def close(self) -> None:
        """Close the open file, if any (the model stays usable: the next read reopens it)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close()

    @functools.cached_property
    def config(self) -> dict:
        """config.json beside the weights (``{}`` when there is none); read on first use."""
        return self._read_config()

    def _read_config(self) -> dict:
        cfg = config_path(self.path)
        if not cfg.is_file():
            return {}
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise FormatError("is not valid JSON [EXL2-K001]", file=str(cfg)) from None
        if not isinstance(data, dict):
            raise FormatError(f"is a JSON {type(data).__name__}, not an object [EXL2-K001]", file=str(cfg))
        return data

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) else None

    # -- mapping ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            with self._lock:
                f = self._file(info.file)
                f.seek(info.offset)
                got = f.readinto(memoryview(buf.numpy())) if info.nbytes else 0
        except OSError as e:
            raise ContainerError(f"cannot be read ({e.strerror or type(e).__name__})", file=str(info.file),
                                 tensor=name) from None
        if got != info.nbytes:  # the file shrank since its header was read
            raise ContainerError(f"cannot be read: {got} of its {info.nbytes} bytes are in the file",
                                 file=str(info.file), tensor=name)
        if sys.byteorder == "big" and DTYPE_SIZES[info.dtype] > 1:  # safetensors stores little-endian values
            buf = buf.view(-1, DTYPE_SIZES[info.dtype]).flip(-1).reshape(-1)
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def _file(self, path: Path):
        if self._open is None or self._open[0] != path:
            self._close()
            self._open = (path, open(path, "rb"))
        return self._open[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    # -- layers ----------------------------------------------------------------------------

    def layer_keys(self) -> list[str]:
        """Prefixes of the quantized layers, in file order: every ``K`` with one of the layer's own
        tensors (:func:`exl2.layer_rules.layer_keys`), so that a layer which lost its q_weight is
        refused by :meth:`qmatrix` rather than skipped."""
        return layer_keys(self.tensors)

    def layer_tensor_names(self, key: str) -> list[str]:
        return [n for n in self.tensors if n.startswith(key + ".") and "." not in n[len(key) + 1:]]

    def qmatrix(self, key: str) -> QMatrix:
        """The layer ``key`` as a QMatrix; errors name the file and tensor."""
        try:
            return QMatrix.from_tensors(self, key)
        except Exl2Error as e:
            # the file of the tensor at fault, else of the layer's q_weight, else of any of its
            # tensors (a layer may lack q_weight); looked up only on this error path
            names = [e.tensor or "", key + ".q_weight", *self.layer_tensor_names(key)]
            file = next((str(self.tensors[n].file) for n in names if n in self.tensors), str(self.path))
            raise e.at(file=file) from None

    def qmatrices(self) -> Iterator[tuple[str, QMatrix]]:
        for key in self.layer_keys():
            yield key, self.qmatrix(key)


def open_model(path: str | os.PathLike) -> Model:
    """Open a model folder or a single ``.safetensors`` file."""
    return Model(path)


# -- writing -------------------------------------------------------------------------------


def _read_umask() -> int:
    """The process's umask, read once at import: from /proc where Linux offers it, else by the
    only portable means, setting and restoring it (before any thread of ours exists)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The umask at import: new files get 0o666 & ~UMASK, new folders 0o777 & ~UMASK, as ``open`` and
#: ``mkdir`` would give them (``mkstemp``/``mkdtemp`` make them private).
UMASK = _read_umask()


def fsync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and everything in it) to the disk."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            fsync_tree(child)
        _fsync_dir(path)
    elif path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames in it); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def unwritable(error: OSError, target: str | os.PathLike) -> UsageError:
    """The one-line error for an output the system refuses to write (no space, no permission)."""
    return UsageError(f"cannot be written ({error.strerror or type(error).__name__})", file=str(target))


def _check_parents(target: Path) -> None:
    for parent in [target.parent, *target.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"cannot be written: {parent} is not a folder", file=str(target))
            return


def check_writable(target: str | os.PathLike, *, folder: bool) -> None:
    """Refuse with :class:`UsageError`, before anything is written, an output ``target`` under a
    path that is not a folder, or of the other kind (a folder where a file is to be written, or
    the reverse): replacing it would destroy what the user did not ask to replace."""
    target = Path(target)
    _check_parents(target)
    if target.is_dir() and not folder:
        raise UsageError("is a folder; give the name of a file to write", file=str(target))
    if target.exists() and not target.is_dir() and folder:
        raise UsageError("is a file; give the name of a folder to write", file=str(target))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "", *, folder: bool = False):
    """Yield a temporary path beside ``target``: a new empty file, or with ``folder`` a new empty
    folder. When the block succeeds, its contents are fsynced and it is renamed onto ``target``;
    on any error it is removed and ``target`` is untouched.

    A folder that already exists at ``target`` is renamed aside first, the new one renamed into
    place, and only then the old one removed; if the second rename fails the old one is renamed
    back. A file target is replaced by one atomic rename. A target of the other kind (a folder
    where a file is asked for, or the reverse) is never replaced: with ``folder`` it is refused
    before anything is written (:func:`check_writable`), otherwise at the rename, when the caller
    has made the temporary path a folder itself. A place that cannot be written raises
    :class:`UsageError`."""
    target = Path(target)
    if folder:
        check_writable(target, folder=True)
    else:
        _check_parents(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix, tmp_suffix = f".{target.name}.", suffix + ".tmp"
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=tmp_suffix, dir=target.parent))
            os.chmod(tmp, 0o777 & ~UMASK)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=tmp_suffix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~UMASK)
    except OSError as e:
        raise unwritable(e, target) from None
    try:
        yield tmp
        try:
            fsync_tree(tmp)
            _replace(tmp, target)
        except OSError as e:
            raise unwritable(e, target) from None
    except BaseException:
        _remove(tmp)
        raise


def _replace(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``, never losing both: an existing folder (which a rename
    cannot replace) is moved aside first and removed last. Never replaces one kind by the other."""
    if target.exists() and new.is_dir() != target.is_dir():
        raise UsageError(f"is a {'folder' if target.is_dir() else 'file'}; it is not replaced by a "
                         f"{'folder' if new.is_dir() else 'file'}", file=str(target))
    if not (target.is_dir() and not target.is_symlink()):
        os.replace(new, target)
        _fsync_dir(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, old)  # onto the empty folder mkdtemp made: a folder may replace an empty one
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


class SafetensorsWriter:
    """Streams tensors into a safetensors file whose entries are declared up front, so that only
    one tensor at a time needs to be in memory. Written atomically (see :func:`atomic_path`).

    >>> with SafetensorsWriter(path, [("a", torch.float16, (2, 3))]) as w:
    ...     w.write("a", torch.zeros(2, 3, dtype=torch.float16))
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in entries:
            if name in self.entries:
                raise ValueError(f"tensor {name} declared twice")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.entries[name] = (dtype, tuple(shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self._header = struct.pack("<Q", len(raw)) + raw
        self._order = list(self.entries)
        self._next = 0

    def __enter__(self) -> "SafetensorsWriter":
        check_writable(self.path, folder=False)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(self._header)
        except OSError as e:
            self._ctx.__exit__(type(e), e, None)
            raise unwritable(e, self.path) from None
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; tensors must come in the declared order, with the declared
        dtype and shape."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise ValueError(f"tensor {name} written out of order")
        dtype, shape = self.entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}")
        t = tensor.detach().to("cpu").contiguous()
        try:
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        except OSError as e:  # a full disk, a quota
            raise unwritable(e, self.path) from None
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._file.close()
        if exc_type is None and self._next != len(self._order):
            exc = ValueError(f"only {self._next} of {len(self._order)} tensors were written")
            self._ctx.__exit__(type(exc), exc, None)
            raise exc
        self._ctx.__exit__(exc_type, exc, tb)
        return False


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to one safetensors file, atomically."""
    with SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata) as w:
        for n, t in tensors.items():
            w.write(n, t)


def save_qmatrix(path: str | os.PathLike, qm: QMatrix, key: str) -> None:
    """Write one layer to a safetensors file under ``key`` (``key.q_weight`` ...), atomically."""
    save_tensors(path, qm.to_tensors(key))


__all__ = ["DTYPES", "FormatError", "Model", "SafetensorsWriter", "TensorInfo", "atomic_path", "check_writable",
           "fsync_tree", "open_model", "read_header", "save_qmatrix", "save_tensors", "shard_files"]
