"""Calibration activations kept off the device between uses: in CPU memory or on disk.

Between blocks the converter keeps each calibration batch's hidden states (``[1, length, h]``,
float32): the block's inputs, its outputs and, while measuring or aiming at the float model, the
float model's. At the default 128 rows x 128 tokens that is 3 x 16,384 x h x 4 bytes (0.8 GB for
h = 4096, 1.6 GB for 8192): the ``12 T h`` term of :mod:`exl2.model.memory`. With a
:class:`Store` of kind ``cpu`` or ``disk`` they are held in CPU memory (for ``--device cuda``) or
in files of the job folder, and come back to the device one batch at a time as the block runs
over them, so the device holds a batch or two instead of all of them.

The stored values are the float32 bytes themselves (a copy to the CPU; a safetensors file), so
the conversion computes with the same bits and writes the same output whichever kind holds them.
A batch's other arguments (the attention mask, position embeddings: small beside the hidden
states at the default length) stay where they are.
"""

from __future__ import annotations

import itertools
import os
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

#: Where activations can be kept: on the device itself (as computed), in CPU memory, on disk.
KINDS = ("device", "cpu", "disk")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:  # the folder was removed with the job: nothing left to free
        pass


class _Entry:
    """One batch's arguments with the hidden states (the first) held off the device: a CPU
    tensor, or a file deleted once no :class:`Batches` holds this entry any more."""

    __slots__ = ("rest", "tensor", "path", "__weakref__")

    def __init__(self, store: Store, args: tuple) -> None:
        self.rest = tuple(args[1:])
        hidden = args[0].detach()
        self.tensor: torch.Tensor | None = None
        self.path: str | None = None
        if store.kind == "disk":
            from safetensors.torch import save_file

            self.path = str(store.next_path())
            save_file({"hidden": hidden.contiguous().cpu()}, self.path)
            weakref.finalize(self, _unlink, self.path)
        else:
            self.tensor = hidden.to("cpu", copy=True) if hidden.device.type != "cpu" else hidden

    def load(self, device: torch.device | str) -> tuple:
        if self.path is not None:
            from safetensors.torch import load_file

            hidden = load_file(self.path, device=str(device))["hidden"]
        else:
            hidden = self.tensor.to(device)
        return (hidden,) + self.rest


class Batches:
    """A block's positional arguments, one tuple per calibration batch, as a list of them would
    be (``len``, iteration, an index, a slice, ``append``), with each batch's hidden states held
    by ``store`` and loaded back onto the store's device when asked for."""

    def __init__(self, store: Store, entries: list[_Entry] | None = None) -> None:
        self.store = store
        self._entries = entries if entries is not None else []

    def append(self, args: tuple) -> None:
        self._entries.append(_Entry(self.store, args))

    def empty(self) -> Batches:
        """A new, empty sequence held the same way."""
        return Batches(self.store)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple]:
        for entry in self._entries:
            yield entry.load(self.store.device)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Batches(self.store, self._entries[index])  # shares the entries: no copy
        return self._entries[index].load(self.store.device)


class Store:
    """Where a run keeps its activations: ``kind`` one of :data:`KINDS`; ``device`` the device
    the block computes on; ``folder`` (kind ``disk``) a folder of its own, emptied when the
    store is made and removed by :meth:`close`."""

    def __init__(self, kind: str, device: str, folder: Path | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown activation store {kind!r} ({', '.join(KINDS)})")
        if kind == "disk" and folder is None:
            raise ValueError("an activation store on disk needs a folder")
        self.kind, self.device, self.folder = kind, torch.device(device), folder
        self._count = itertools.count()
        if kind == "disk":
            shutil.rmtree(folder, ignore_errors=True)  # a crashed run's batches: never read again
            folder.mkdir(parents=True)

    def next_path(self) -> Path:
        return self.folder / f"{next(self._count):08}.safetensors"

    def batches(self) -> list | Batches:
        """An empty sequence for a block's arguments: a plain list when on the device."""
        return [] if self.kind == "device" else Batches(self)

    def close(self) -> None:
        if self.kind == "disk":
            shutil.rmtree(self.folder, ignore_errors=True)


def empty_like(args) -> list | Batches:
    """An empty sequence of block arguments held as ``args`` is."""
    return args.empty() if isinstance(args, Batches) else []


def available_bytes(device: str) -> int | None:
    """Memory free for the run on ``device``: the GPU's free memory, or the system's
    ``MemAvailable``; None where it cannot be read."""
    if torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose(requested: str, device: str, peak_on_device: int, peak_offloaded: int, activation_bytes: int,
           available: int | None, cpu_available: int | None) -> tuple[str, str]:
    """The store kind for ``--activations requested`` (``auto`` or one of :data:`KINDS`) and why.

    ``auto`` keeps the activations on the device when the estimated peak with them there
    (``peak_on_device``) fits in the ``available`` memory (or that is unknown); otherwise, when
    offloading brings the peak (``peak_offloaded``) down, a GPU run keeps them in CPU memory if
    ``activation_bytes`` fit in ``cpu_available``, and on disk else; a CPU run keeps them on
    disk."""
    gb = 1e9
    if requested != "auto":
        return requested, "as asked (--activations)"
    if available is None or peak_on_device <= available or peak_offloaded >= peak_on_device:
        return "device", "they fit"
    why = f"the estimated peak {peak_on_device / gb:.1f} GB is more than the {available / gb:.1f} GB available"
    if torch.device(device).type == "cuda" and (cpu_available is None or activation_bytes <= cpu_available):
        return "cpu", why
    return "disk", why
