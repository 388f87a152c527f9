"""The fast path: the reference's functions as Triton kernels.

- :func:`dequantize` — bit-exact with :func:`exl2.reference.dequantize` (spec 8.1);
- :func:`matmul` — a fused dequantize + GEMM for small batches, dequantize then ``torch.matmul``
  above :data:`MATMUL_CROSSOVER_M` rows; within the spec's bound (8.2.1);
- :func:`quantize` — the reference's algorithm (scale search, RTN or GPTQ) with codes and packing
  on Triton kernels: packed words and codes given the scales bit-exact (8.1).

One kernel design serves every width and mixed groups: the per-column little-endian bit string
of spec 5.1, driven by a small per-row table derived from the group table (:mod:`exl2.fast.plan`).
The file's q_weight is used as it is; nothing is repacked.

On CUDA or ROCm tensors the kernels are compiled. Without a GPU they run under Triton's
interpreter on CPU tensors: correct, and slow. This module sets ``TRITON_INTERPRET=1`` when no
GPU is visible, before Triton is first imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .ops import GEMV_MAX_M, MATMUL_CROSSOVER_M, dequantize, encode_rows, interpreted, matmul, pack_codes, quantize  # noqa: E402


def backend_note() -> str | None:
    """A note for users when the kernels will run interpreted (no GPU); None otherwise."""
    if interpreted():
        return ("no GPU found: the Triton fast path runs under Triton's interpreter on the CPU, "
                "bit-exact but much slower than the reference backend")
    return None


__all__ = ["GEMV_MAX_M", "MATMUL_CROSSOVER_M", "backend_note", "dequantize", "encode_rows", "interpreted", "matmul", "pack_codes",
           "quantize"]
