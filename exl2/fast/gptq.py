"""``exl2.fast.quantize``: the reference encoder's algorithm (spec 7) with its inner loops on
Triton kernels.

- scale search: the reference's :func:`exl2.reference.find_scales`, vectorized torch over the
  97-point grid, on the weight's device;
- round-to-nearest codes and packing: :func:`~exl2.fast.ops.encode_rows` and
  :func:`~exl2.fast.ops.pack_codes` (bit-exact given the scales, spec 8.1);
- GPTQ: one :func:`~exl2.fast.kernels.gptq_group_kernel` launch per group runs the row loop with
  its error feedback inside the group; the feedback into later groups is one GEMM per group
  (within the bound of spec 8.2.3). Groups larger than :data:`~exl2.fast.ops.GPTQ_GROUP_MAX_ROWS`
  rows run row by row.
"""

from __future__ import annotations

import torch
import triton

from ..qmatrix import QMatrix
from ..qparams import QParams
from ..reference import encode as reference_encode
from ..reference.encode import find_scales, pack
from . import kernels
from .ops import GPTQ_BLOCK_N, GPTQ_GROUP_MAX_ROWS, check_device, encode_rows, pack_codes


def gptq_group(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64) and scaled errors (float32) of one group's rows ``w`` ``[R, N]`` under GPTQ,
    ``u`` the group's ``[R, R]`` diagonal block of the inverse-Hessian factor; ``w`` is not changed."""
    r, n = w.shape
    w = w.contiguous()
    codes = torch.empty((r, n), dtype=torch.int64, device=w.device)
    err = torch.empty((r, n), dtype=torch.float32, device=w.device)
    if r <= GPTQ_GROUP_MAX_ROWS:
        kernels.gptq_group_kernel[(triton.cdiv(n, GPTQ_BLOCK_N),)](
            w, u.contiguous(), r, scale.contiguous(), codes, err, r, n, bits,
            BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_N=GPTQ_BLOCK_N,
            enable_fp_fusion=False)  # a product, then a difference, as the reference (torch) rounds them
        return codes, err
    w = w.clone()
    for i in range(r):
        codes[i], value = encode_rows(w[i], scale, bits)
        err[i] = (w[i] - value) / u[i, i]
        w[i + 1:] -= u[i, i + 1:, None] * err[i][None, :]
    return codes, err


def quantize(weight: torch.Tensor, qparams: QParams, hessian: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> QMatrix:
    """As :func:`exl2.reference.quantize` (same signature and steps), on the fast path's kernels.
    ``weight`` on a GPU (on the CPU under Triton's interpreter)."""
    check_device(weight, "weight")
    if hessian is None:
        return reference_encode.quantize(weight, qparams, None, bias, encode=encode_rows, pack_group=pack_codes)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, has shape {list(weight.shape)}")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}], has {list(hessian.shape)}")
    w = weight.detach().to(torch.float32).T.contiguous()  # [K, N]
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or Inf")
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)  # act-order
    u = reference_encode._inverse_hessian_factor(h[perm][:, perm])
    w = w[perm]

    plan = qparams.plan(in_features)
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)
    scale_codes, scale_maxes = [], []
    for bits, a, n in plan.groups:
        b = a + n
        found = find_scales(w[a:b], bits)
        scale_codes.append(found.codes)
        scale_maxes.append(found.scale_max)
        codes[a:b], err = gptq_group(w[a:b], u[a:b, a:b], found.scale, bits)
        w[b:] -= u[a:b, b:].T @ err  # feedback into every later group
    return pack(codes, plan.groups, torch.stack(scale_codes), torch.stack(scale_maxes),
                torch.argsort(perm).to(torch.int32), out_features, bias, pack_group=pack_codes)
