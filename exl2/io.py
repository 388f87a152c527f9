"""Reading and writing EXL2 files (spec 2): safetensors only, never pickle.

Reading is lazy: :class:`Model` indexes the headers of every ``*.safetensors`` file of a folder
(or one file) and loads a tensor only when asked, through memory-mapped ``safe_open``.
Writing is atomic: bytes go to a temporary file beside the target, which is renamed into place
only once complete, so an interrupted or failed write leaves nothing at the target.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ContainerError, Exl2Error, FormatError
from .qmatrix import QMatrix

#: safetensors dtype names and torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: Largest safetensors header this package reads (the format's own reference limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives, from its file's header."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins. Reads only the
    header's bytes, after checking its declared length against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ContainerError("is too short to be a safetensors file", file=str(path))
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ContainerError(f"declares a {n}-byte header in a {size}-byte file", file=str(path))
            header = json.loads(f.read(n))
    except OSError as e:
        raise ContainerError(f"cannot be read ({e.strerror})", file=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ContainerError("has a header that is not valid JSON", file=str(path)) from None
    if not isinstance(header, dict):
        raise ContainerError("has a header that is not a JSON object", file=str(path))
    return header, 8 + n


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
    return [path]


def config_path(path: Path) -> Path:
    """Where a model's config.json is: in the folder, or beside the single file."""
    return (path if path.is_dir() else path.parent) / "config.json"


class Model(Mapping[str, torch.Tensor]):
    """A model folder or a single safetensors file, read lazily. A read-only mapping from tensor
    name to tensor; ``config`` is ``config.json`` (``{}`` when there is none)."""

    def __init__(self, path: str | os.PathLike, files: list[Path] | None = None) -> None:
        self.path = Path(path)
        self.files = shard_files(self.path) if files is None else files
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            header, _ = read_header(f)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
                    raise ContainerError("has a malformed header entry", file=str(f), tensor=name)
                if name in self.tensors:
                    raise ContainerError(f"is also in {self.tensors[name].file.name}", file=str(f), tensor=name)
                self.tensors[name] = TensorInfo(name, f, str(entry.get("dtype")), tuple(entry["shape"]))
        self._handles: dict[Path, object] = {}

    @functools.cached_property
    def config(self) -> dict:
        """config.json beside the weights (``{}`` when there is none); read on first use."""
        return self._read_config()

    def _read_config(self) -> dict:
        cfg = config_path(self.path)
        if not cfg.is_file():
            return {}
        try:
            data = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ContainerError("is not valid JSON", file=str(cfg)) from None
        return data if isinstance(data, dict) else {}

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) else None

    # -- mapping ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ContainerError(f"cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                 file=str(info.file), tensor=name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    # -- layers ----------------------------------------------------------------------------

    def layer_keys(self) -> list[str]:
        """Prefixes of the quantized layers (every ``K`` with a ``K.q_weight``), in file order."""
        return [n[: -len(".q_weight")] for n in self.tensors if n.endswith(".q_weight")]

    def layer_tensor_names(self, key: str) -> list[str]:
        return [n for n in self.tensors if n.startswith(key + ".") and "." not in n[len(key) + 1:]]

    def qmatrix(self, key: str) -> QMatrix:
        """The layer ``key`` as a QMatrix; errors name the file and tensor."""
        file = str(self.tensors[key + ".q_weight"].file) if key + ".q_weight" in self.tensors else str(self.path)
        try:
            return QMatrix.from_tensors(self, key)
        except Exl2Error as e:
            where = self.tensors.get(e.tensor or "")
            raise e.at(file=str(where.file) if where else file) from None

    def qmatrices(self) -> Iterator[tuple[str, QMatrix]]:
        for key in self.layer_keys():
            yield key, self.qmatrix(key)


def open_model(path: str | os.PathLike) -> Model:
    """Open a model folder or a single ``.safetensors`` file."""
    return Model(path)


# -- writing -------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, on any
    error remove it. Works for files and folders."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any new file
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        raise


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
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._file = open(self._tmp, "wb")
        self._file.write(self._header)
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
        self._file.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


__all__ = ["DTYPES", "FormatError", "Model", "SafetensorsWriter", "TensorInfo", "atomic_path", "open_model",
           "read_header", "save_qmatrix", "save_tensors", "shard_files"]
