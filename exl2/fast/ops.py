"""Host side of the fast path: input checks, tables, launches."""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..errors import FormatError
from ..format import BLOCKS
from ..qmatrix import QMatrix
from ..reference import encode as reference_encode
from . import kernels
from .plan import row_table, word_table

#: Above this many rows of x, ``matmul`` dequantizes once and calls ``torch.matmul``. A guess
#: until measured on a GPU (benchmarks/gpu.sh); decoding is memory bound, the fused kernel wins
#: while x is small.
MATMUL_CROSSOVER_M = 32

#: Up to this many rows of x, ``matmul`` uses the split-K GEMV kernel (CUDA cores, atomics);
#: above it, the fused tensor-core kernel.
GEMV_MAX_M = 4
#: Stored rows each GEMV program decodes.
GEMV_K_PER_PROGRAM = 256

BLOCK_K, BLOCK_N = 32, 64


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(t: torch.Tensor) -> None:
    if t.is_cuda == interpreted():
        where = "CPU" if interpreted() else "GPU"
        raise FormatError(f"the fast path needs tensors on the {where} here; move the QMatrix with qm.to(...)")


def check(qm: QMatrix) -> None:
    """Refuse a malformed QMatrix before any launch, with the validator's first error finding."""
    if getattr(qm, "_fast_checked", False):
        return
    from ..conformance.rules import check_qmatrix

    errors = [f for f in check_qmatrix(qm) if f.severity == "error"]
    if errors:
        raise FormatError(f"{errors[0].code}: {errors[0].message}", tensor=errors[0].tensor)
    _check_device(qm.q_weight)
    object.__setattr__(qm, "_fast_checked", True)


def dequantize(qm: QMatrix) -> torch.Tensor:
    """float16 ``[in_features, out_features_padded]``, bit-exact with the reference (spec 6)."""
    check(qm)
    t = row_table(qm)
    k, n = qm.in_features, qm.out_features_padded
    out = torch.empty((k, n), dtype=torch.float16, device=qm.q_weight.device)
    grid = (triton.cdiv(k, BLOCK_K), triton.cdiv(n, BLOCK_N))
    kernels.dequantize_kernel[grid](qm.q_weight, qm.q_weight.stride(0), qm.q_scale, qm.q_scale.stride(0),
                                    qm.q_scale_max, t.qrow, t.shift, t.bits, t.group, t.dest, out, out.stride(0),
                                    k, n, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return out


def matmul(x: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """``x @ B + bias`` for ``x`` ``[..., in_features]``; ``[..., out_features]`` in x's dtype
    (spec 6.5, within the bound of 8.2.1). Three paths by the rows M of x: split-K GEMV for
    M <= :data:`GEMV_MAX_M`, the fused tensor-core kernel up to :data:`MATMUL_CROSSOVER_M`,
    dequantize + ``torch.matmul`` above."""
    check(qm)
    if x.shape[-1] != qm.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {qm.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qm.in_features)
    m, n = x2.shape[0], qm.out_features
    if m > MATMUL_CROSSOVER_M:
        b = dequantize(qm)[:, :n]
        y = (x2.to(torch.float32) @ b.to(torch.float32)) if x2.dtype != torch.float16 else x2 @ b
        if qm.bias is not None:
            y = y + qm.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, n)
    t = row_table(qm)
    x_perm = x2[:, t.dest.to(torch.int64)].contiguous()  # x_perm[:, k] multiplies stored row k
    if m <= GEMV_MAX_M:
        y32 = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(qm.in_features, GEMV_K_PER_PROGRAM))
        kernels.gemv_kernel[grid](x_perm, x_perm.stride(0), qm.q_weight, qm.q_weight.stride(0), qm.q_scale,
                                  qm.q_scale.stride(0), qm.q_scale_max, t.qrow, t.shift, t.bits, t.group, y32, m, n,
                                  qm.in_features, K_PER_PROGRAM=GEMV_K_PER_PROGRAM, M_MAX=GEMV_MAX_M,
                                  BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        if qm.bias is not None:
            y32 += qm.bias.to(torch.float32)
        return y32.to(x.dtype).reshape(*lead, n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    bias = qm.bias if qm.bias is not None else y
    kernels.matmul_kernel[grid](x_perm, x_perm.stride(0), qm.q_weight, qm.q_weight.stride(0), qm.q_scale,
                                qm.q_scale.stride(0), qm.q_scale_max, t.qrow, t.shift, t.bits, t.group, bias, y,
                                y.stride(0), m, n, qm.in_features, HAS_BIAS=qm.bias is not None,
                                X_IS_F16=x.dtype == torch.float16, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.reshape(*lead, n)


def encode_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`exl2.reference.encode_rows`, on a Triton kernel: codes (int64) and decoded values."""
    w2 = w.reshape(-1, w.shape[-1]).to(torch.float32).contiguous()
    r, n = w2.shape
    codes = torch.empty((r, n), dtype=torch.int64, device=w.device)
    values = torch.empty((r, n), dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(r, 16), triton.cdiv(n, BLOCK_N))
    kernels.encode_kernel[grid](w2, scale.to(torch.float32).contiguous(), codes, values, r, n, bits,
                                BLOCK_R=16, BLOCK_N=BLOCK_N)
    return codes.reshape(w.shape), values.reshape(w.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """As :func:`exl2.reference.pack_codes`, on a Triton kernel: q_weight words of one group."""
    rows, n = codes.shape
    blk = BLOCKS[bits]
    if rows % blk.rows:
        raise ValueError(f"{rows} rows is not a whole number of {blk.rows}-row blocks")
    row0, word = word_table(rows, bits, codes.device)
    w = row0.numel()
    out = torch.empty((w, n), dtype=torch.int32, device=codes.device)
    grid = (triton.cdiv(w, 16), triton.cdiv(n, BLOCK_N))
    kernels.pack_kernel[grid](codes.to(torch.int64).contiguous(), row0, word, out, w, n, bits, blk.rows,
                              MAX_CODES=18, BLOCK_W=16, BLOCK_N=BLOCK_N)
    return out


#: The reference's encoder (scale search, act-order, GPTQ) running codes and packing on kernels.
quantize = functools.wraps(reference_encode.quantize)(
    functools.partial(reference_encode.quantize, encode=encode_rows, pack_group=pack_codes))
