"""``exl2.fast.quantize``: the reference encoder's algorithm (spec 7) with its inner loops on
Triton kernels.

- scale search: the reference's :func:`exl2.reference.find_scales`, vectorized torch over the
  97-point grid, on the weight's device;
- round-to-nearest codes and packing: :func:`~exl2.fast.ops.encode_rows` and
  :func:`~exl2.fast.ops.pack_codes` (bit-exact given the scales, spec 8.1);
- GPTQ: one :func:`~exl2.fast.kernels.gptq_group_kernel` launch per group runs the row loop with
  its error feedback inside the group; the feedback into later groups is one GEMM per group
  (within the bound of spec 8.2.3). Groups larger than :data:`~exl2.fast.tuning.GPTQ_GROUP_MAX_ROWS`
  rows run row by row.
"""

from __future__ import annotations

import torch
import triton

from ..qmatrix import QMatrix
from ..qparams import QParams
from ..reference import encode as reference_encode
from . import kernels
from .ops import check_device, encode_rows, pack_codes
from .tuning import GPTQ_BLOCK_N, GPTQ_GROUP_MAX_ROWS


def gptq_group(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64) and scaled errors (float32) of one group's rows ``w`` ``[R, N]`` under GPTQ,
    ``u`` the group's ``[R, R]`` diagonal block of the inverse-Hessian factor; ``w`` is not changed."""
    r, n = w.shape
    if r > GPTQ_GROUP_MAX_ROWS:  # too many rows for registers: the row loop, one encode launch per row
        return reference_encode.gptq_group(w, u, scale, bits, encode=encode_rows)
    w = w.contiguous()
    codes = torch.empty((r, n), dtype=torch.int64, device=w.device)
    err = torch.empty((r, n), dtype=torch.float32, device=w.device)
    kernels.gptq_group_kernel[(triton.cdiv(n, GPTQ_BLOCK_N),)](
        w, u.contiguous(), r, scale.contiguous(), codes, err, r, n, bits,
        BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_N=GPTQ_BLOCK_N,
        enable_fp_fusion=False)  # a product, then a difference, as the reference (torch) rounds them
    return codes, err


def quantize(weight: torch.Tensor, qparams: QParams, hessian: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> QMatrix:
    """As :func:`exl2.reference.quantize` (same signature and steps), on the fast path's kernels.
    ``weight`` on a GPU (on the CPU under Triton's interpreter)."""
    check_device(weight, "weight")
    return reference_encode.quantize(weight, qparams, hessian, bias, encode=encode_rows, pack_group=pack_codes,
                                     group_loop=gptq_group)
