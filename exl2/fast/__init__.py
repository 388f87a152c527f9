"""The fast path: the reference's functions as Triton kernels.

- :func:`dequantize` — bit-exact with :func:`exl2.reference.dequantize` (spec 8.1);
- :func:`matmul` — three paths by the rows M of x: a split-K GEMV that reads every q_weight
  word once (M <= :data:`GEMV_MAX_M`), a fused decode + tensor-core GEMM (up to
  :data:`MATMUL_CROSSOVER_M`), dequantize then ``torch.matmul`` above; float32 accumulation,
  within the spec's bound (8.2.1);
- :func:`quantize` — the reference's algorithm (scale search, RTN or GPTQ) with codes, packing
  and GPTQ's row loop on Triton kernels (:mod:`exl2.fast.gptq`): packed words and codes given the
  scales bit-exact (8.1), GPTQ within its bound (8.2.3).

One kernel design serves every width and mixed groups: the per-column little-endian bit string
of spec 5.1, with the width a runtime value per row or per tile, driven by small tables derived
from the group table (:mod:`exl2.fast.plan`). The file's q_weight is used as it is; nothing is
repacked.

On CUDA or ROCm tensors the kernels are compiled. Without a GPU they run under Triton's
interpreter on CPU tensors: correct, and slow. This module sets ``TRITON_INTERPRET=1`` when no
GPU is visible, before Triton is first imported (so import it before anything imports triton);
:func:`backend_note` returns the line to show users then. ``python exl2/fast/aot_check.py``
compiles every kernel for a GPU target on a machine without one.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .gptq import quantize  # noqa: E402
from .ops import GEMV_MAX_M, MATMUL_CROSSOVER_M, dequantize, encode_rows, interpreted, matmul, pack_codes  # noqa: E402


def backend_note() -> str | None:
    """A note for users when the kernels will run interpreted (no GPU); None otherwise."""
    if interpreted():
        return ("no GPU found: the Triton fast path runs under Triton's interpreter on the CPU, "
                "bit-exact but much slower than the reference backend")
    return None


__all__ = ["GEMV_MAX_M", "MATMUL_CROSSOVER_M", "backend_note", "dequantize", "encode_rows", "interpreted", "matmul", "pack_codes",
           "quantize"]
