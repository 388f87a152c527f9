"""The final model folder of ``exl2 quantize``, assembled tensor by tensor.

The quantized layers come from the job folder (``layers/KEY.safetensors``), the unquantized
tensors from the source, one tensor at a time: every shard's header is declared up front
(:class:`exl2.io.SafetensorsWriter`), so no more than one tensor is ever in memory. Shards are
size-limited as exllamav2 cuts them: a new shard starts when the next tensor would pass the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..io import SafetensorsWriter, open_model

Entry = tuple[str, torch.dtype, tuple[int, ...]]


def nbytes(entry: Entry) -> int:
    _, dtype, shape = entry
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """``entries`` cut in order into shards of at most ``limit`` bytes (a larger tensor alone)."""
    out, current, size = [], [], 0
    for e in entries:
        n = nbytes(e)
        if current and size + n > limit:
            out.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    out.append(current)
    return out


def shard_name(i: int, count: int) -> str:
    return "output.safetensors" if count == 1 else f"output-{i + 1:05}-of-{count:05}.safetensors"


def layer_entries(files: list[Path]) -> tuple[list[Entry], dict[str, Path]]:
    """The tensors of the job's layer files (in file order, each file's own order), and where each is."""
    from ..io import DTYPES

    entries, where = [], {}
    for f in files:
        m = open_model(f)
        for name, info in m.tensors.items():
            entries.append((name, DTYPES[info.dtype], tuple(info.shape)))
            where[name] = f
    return entries, where


def write_shards(folder: Path, entries: list[Entry], read: Callable[[str], torch.Tensor], limit: int) -> list[Path]:
    """Write ``entries`` into size-limited shards in ``folder``; ``read(name)`` gives each tensor."""
    cut = shards(entries, limit)
    paths = []
    for i, shard in enumerate(cut):
        path = folder / shard_name(i, len(cut))
        with SafetensorsWriter(path, shard) as w:
            for name, _, _ in shard:
                w.write(name, read(name))
        paths.append(path)
    return paths
