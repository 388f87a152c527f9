"""exllamav2's own CUDA kernels, through its extension built ahead of time (needs a GPU).

``benchmarks/build_exllamav2.sh`` builds ``exllamav2_ext`` (pinned exllamav2 release, sm_90,
CPython 3.12, torch 2.11 + CUDA 13) into ``./.exllamav2/``; set ``EXLLAMAV2_EXT_DIR`` to use
another folder. Nothing of exllamav2 is in this repository: this module loads the extension and
prepares a layer's tensors the way exllamav2's Python side does before calling it.

Used by ``golden_fixtures.py`` (fixtures from exllamav2's packing, reconstruct and matmul),
``gpu_bench.py`` (exllamav2's ``gemm_half_q_half`` side by side with ours), and as a conformance
backend, which runs exllamav2 itself through the conformance suite::

    exl2 conformance run --backend benchmarks.exllamav2_kernels

Loading a layer follows, in order (paths in exllamav2's source):

- ``exllamav2/module.py`` ``load_weight``: ``q_perm = argsort(q_invperm)`` (int32), whatever the
  file holds;
- ``exllamav2/ext.py`` ``make_q_matrix``: ``q_scale_max *= 1 / 256`` on the float16 tensor,
  ``q_perm`` and ``q_invperm`` narrowed with ``.short()``, the group map from the extension's
  ``make_group_map`` (C++, on the CPU), then the extension's ``make_q_matrix`` with every tensor
  on the GPU (the ``QMatrix`` constructor copies ``q_groups`` back to the host and shuffles
  ``q_weight`` in place, so the layer keeps its own copy);
- ``exllamav2_ext/ext_qmatrix.cpp`` ``make_q_matrix`` requires a bias as wide as ``q_weight``
  (the padded width): a bias of ``out_features`` entries is padded with zeros, which leaves the
  real columns unchanged.

``temp_dq`` holds the whole decoded matrix (``max_dq_rows`` = in_features), so
``gemm_half_q_half`` takes exllamav2's own choice of path: its kernel for M <= 32
(``MAX_Q_GEMM_ROWS``, ``exllamav2_ext/config.h``), reconstruct + cuBLAS above.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
#: Where build_exllamav2.sh puts the extension.
DEFAULT_DIR = ROOT / ".exllamav2"
#: The conformance harness runs backends on this device.
DEVICE = "cuda"

_ext = None


def extension_dir() -> Path:
    return Path(os.environ.get("EXLLAMAV2_EXT_DIR") or DEFAULT_DIR)


def extension():
    """The ``exllamav2_ext`` module (imported once, after torch, from :func:`extension_dir`).
    Raises ImportError with one line saying what to do when it is not there."""
    global _ext
    if _ext is None:
        directory = extension_dir()
        if not any(directory.glob("exllamav2_ext*.so")):
            raise ImportError(f"no exllamav2_ext*.so in {directory}: build it with "
                              "`bash benchmarks/build_exllamav2.sh` (or set EXLLAMAV2_EXT_DIR)")
        sys.path.insert(0, str(directory))
        try:
            import exllamav2_ext
        finally:
            sys.path.remove(str(directory))
        _ext = exllamav2_ext
    return _ext


def available() -> tuple[bool, str]:
    """Whether exllamav2's kernels can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no GPU"
    try:
        extension()
    except ImportError as e:
        return False, str(e).splitlines()[0]
    return True, ""


class Exllamav2Layer:
    """One EXL2 layer loaded by exllamav2's extension (see the module docstring). ``tensors``
    holds the layer's tensors under their bare names (``q_weight``, ... and optionally ``bias``).
    Use as a context manager, or call :meth:`close`, to free exllamav2's ``QMatrix``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: str = "cuda") -> None:
        ext = extension()
        w = {name: tensors[name].to(device).clone()
             for name in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")}
        width = w["q_weight"].shape[1]
        self.in_features = int(w["q_invperm"].numel())
        self.width = width
        q_perm = torch.argsort(w["q_invperm"]).to(torch.int)
        w["q_scale_max"] *= 1 / 256
        w["q_perm"] = q_perm.short()
        w["q_invperm"] = w["q_invperm"].short()
        w["q_group_map"] = ext.make_group_map(w["q_groups"].cpu(), w["q_weight"].shape[0]).to(device)
        none = torch.empty((1, 1), device="meta")
        bias = tensors.get("bias")
        if bias is not None:
            padded = torch.zeros(width, dtype=torch.float16, device=device)
            padded[: bias.numel()] = bias.to(device=device, dtype=torch.float16)
            bias = padded
        w["bias"] = bias if bias is not None else none
        w["temp_dq"] = torch.empty(self.in_features * width, dtype=torch.float16, device=device)
        self._tensors = w  # exllamav2's QMatrix keeps pointers into these
        self.handle = ext.make_q_matrix(w["q_weight"], w["q_perm"], w["q_invperm"], w["q_scale"], w["q_scale_max"],
                                        w["q_groups"], w["q_group_map"], none, none, none, w["bias"], w["temp_dq"],
                                        self.in_features)

    def reconstruct(self) -> torch.Tensor:
        """exllamav2's ``reconstruct``: float16 ``[in_features, width]``, rows in input order."""
        out = torch.empty((self.in_features, self.width), dtype=torch.float16, device=self._tensors["q_weight"].device)
        extension().reconstruct(self.handle, out)
        return out

    def gemm(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """exllamav2's ``gemm_half_q_half`` (``force_cuda`` off): float16 ``[M, width]``, bias added."""
        x = x.reshape(-1, self.in_features)
        if out is None:
            out = torch.empty((x.shape[0], self.width), dtype=torch.float16, device=x.device)
        extension().gemm_half_q_half(x, self.handle, out, False)
        return out

    def close(self) -> None:
        if self.handle:
            extension().free_q_matrix(self.handle)
            self.handle = 0

    def __enter__(self) -> "Exllamav2Layer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pack_columns(codes: np.ndarray, out_rows: int, bits: int) -> np.ndarray:
    """exllamav2's ``pack_columns`` kernel: int16 codes ``[rows, columns]`` -> int32 ``[out_rows, columns]``
    (the signature of ``tests.exllamav2_emulation.pack_columns_kernel``)."""
    inp = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int16)).to(DEVICE)
    out = torch.zeros((out_rows, inp.shape[1]), dtype=torch.int32, device=DEVICE)
    extension().pack_columns(inp, out, bits)
    return out.cpu().numpy()


def pack_rows_4(codes: np.ndarray) -> np.ndarray:
    """exllamav2's ``pack_rows_4`` kernel: int16 scale codes ``[rows, columns]`` -> int32 ``[rows, columns/8]``."""
    inp = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int16)).to(DEVICE)
    out = torch.zeros((inp.shape[0], inp.shape[1] // 8), dtype=torch.int32, device=DEVICE)
    extension().pack_rows_4(inp, out)
    return out.cpu().numpy()


# -- the conformance harness's backend interface (exl2.conformance.harness) -------------------


def dequantize(qm) -> torch.Tensor:
    """float16 ``[in_features, out_features_padded]`` by exllamav2's ``reconstruct``."""
    with Exllamav2Layer(qm.to_tensors()) as layer:
        return layer.reconstruct()


def matmul(x: torch.Tensor, qm) -> torch.Tensor:
    """``x @ B + bias`` by exllamav2's ``gemm_half_q_half``, ``[..., out_features]`` in float16."""
    with Exllamav2Layer(qm.to_tensors()) as layer:
        y = layer.gemm(x.to(torch.float16))
    return y[:, : qm.out_features].reshape(*x.shape[:-1], qm.out_features)
