"""Triton kernels of the fast path. Each kernel's docstring says what one program instance
computes; the reference check beside each is in tests/test_fast.py.

All integer bit work is done in int64 so that unsigned 32-bit words and shifts of up to 32 are
exact; float16 values are produced by one float32 product rounded to float16 (round to nearest
even), exactly where spec 6 rounds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_tile(qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr, qrow_ptr, shift_ptr, bits_ptr, group_ptr,
                 rk, mk, rn, mask):
    """float16 values of stored rows ``rk`` [BLOCK_K] (valid where ``mk``) and columns ``rn``
    [BLOCK_N] (spec 5.1, 6.1-6.3), from the row table (first q_weight row, shift, width, group of
    each stored row). Masked elements decode to 0."""
    qrow = tl.load(qrow_ptr + rk, mask=mk, other=0)
    shift = tl.load(shift_ptr + rk, mask=mk, other=0)
    bits = tl.load(bits_ptr + rk, mask=mk, other=2)
    group = tl.load(group_ptr + rk, mask=mk, other=0)
    qrow2 = qrow[:, None]
    shift2 = shift[:, None].to(tl.int64)
    bits2 = bits[:, None].to(tl.int64)
    lo = tl.load(qw_ptr + qrow2 * stride_qw + rn[None, :], mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    straddles = (shift2 + bits2) > 32
    hi = tl.load(qw_ptr + (qrow2 + 1) * stride_qw + rn[None, :], mask=mask & straddles, other=0).to(tl.int64)
    hi = hi & 0xFFFFFFFF
    ones = tl.full(bits2.shape, 1, tl.int64)
    code = ((lo >> shift2) | (hi << (32 - shift2))) & ((ones << bits2) - 1)
    zero = ones << (bits2 - 1)

    g2 = group[:, None]
    word = tl.load(qs_ptr + g2 * stride_qs + (rn[None, :] // 8), mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    qs = ((word >> ((rn[None, :] % 8) * 4).to(tl.int64)) & 0xF) + 1
    m = (tl.load(smax_ptr + g2, mask=mask, other=0.0).to(tl.float32) * 0.00390625).to(tl.float16).to(tl.float32)
    scale = ((qs * qs).to(tl.float32) * m).to(tl.float16).to(tl.float32)
    value = ((code - zero).to(tl.float32) * scale).to(tl.float16)
    return tl.where(mask, value, 0.0).to(tl.float16)


@triton.jit
def dequantize_kernel(qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr,
                      qrow_ptr, shift_ptr, bits_ptr, group_ptr, dest_ptr,
                      out_ptr, stride_out, K, N,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program decodes stored rows ``[pid_k * BLOCK_K, +BLOCK_K)`` x columns
    ``[pid_n * BLOCK_N, +BLOCK_N)`` and writes them to their input-feature rows ``q_perm[k]``."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mk = rk < K
    mask = mk[:, None] & (rn[None, :] < N)
    dest = tl.load(dest_ptr + rk, mask=mk, other=0)
    v = _decode_tile(qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr, qrow_ptr, shift_ptr, bits_ptr, group_ptr,
                     rk, mk, rn, mask)
    tl.store(out_ptr + dest[:, None] * stride_out + rn[None, :], v, mask=mask)


@triton.jit
def matmul_kernel(x_ptr, stride_xm, qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr,
                  qrow_ptr, shift_ptr, bits_ptr, group_ptr, bias_ptr, y_ptr, stride_ym,
                  M, N, K, HAS_BIAS: tl.constexpr, X_IS_F16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program computes ``y[rm, rn]`` for ``BLOCK_M`` rows of x and ``BLOCK_N`` output columns:
    the sum over stored rows ``k`` of ``x_perm[:, k] * stored[k, rn]``, decoding each
    ``BLOCK_K x BLOCK_N`` tile of the weights on the fly (x is pre-permuted: ``x_perm = x[:, q_perm]``),
    accumulated in float32, plus the bias."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        mask = mk[:, None] & (rn[None, :] < N)
        w = _decode_tile(qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr, qrow_ptr, shift_ptr, bits_ptr, group_ptr,
                         rk, mk, rn, mask)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & mk[None, :], other=0.0)
        if X_IS_F16:
            acc += tl.dot(x.to(tl.float16), w, out_dtype=tl.float32)
        else:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _rint(x):
    """Round to nearest, ties to even (spec 1.3)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def encode_kernel(w_ptr, scale_ptr, code_ptr, value_ptr, R, N, bits,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program encodes a ``BLOCK_R x BLOCK_N`` tile of rows ``w`` under the column scales
    (spec 7.3): ``q = clamp(rint(w / s) + z, 0, 2^b - 1)`` with a correctly rounded float32
    division, and the decoded value ``half((q - z) * s)``."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rr[:, None] < R) & (rn[None, :] < N)
    w = tl.load(w_ptr + rr[:, None] * N + rn[None, :], mask=mask, other=0.0)
    s = tl.load(scale_ptr + rn, mask=rn < N, other=1.0)[None, :]
    zero = (1 << (bits - 1)) * 1.0
    maxq = ((1 << bits) - 1) * 1.0
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(w, s)) + zero, 0.0), maxq)
    value = ((q - zero) * s).to(tl.float16).to(tl.float32)
    tl.store(code_ptr + rr[:, None] * N + rn[None, :], q.to(tl.int64), mask=mask)
    tl.store(value_ptr + rr[:, None] * N + rn[None, :], value, mask=mask)


@triton.jit
def pack_kernel(code_ptr, row0_ptr, word_ptr, out_ptr, W, N, bits, block_rows,
                MAX_CODES: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program packs ``BLOCK_W`` output words x ``BLOCK_N`` columns (spec 5.1): word ``w`` of
    a block gathers every code ``i`` of the block whose bits ``[i*b, i*b + b)`` meet
    ``[32w, 32w + 32)``, shifted to ``i*b - 32w``; at most ``MAX_CODES`` codes meet a word."""
    rw = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mw = rw < W
    row0 = tl.load(row0_ptr + rw, mask=mw, other=0)
    word = tl.load(word_ptr + rw, mask=mw, other=0)
    first = (32 * word) // bits
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.int64)
    for t in range(MAX_CODES):
        i = first + t
        valid = mw & (i < block_rows) & (i * bits < 32 * (word + 1))
        m = valid[:, None] & (rn[None, :] < N)
        c = tl.load(code_ptr + (row0 + i)[:, None].to(tl.int64) * N + rn[None, :], mask=m, other=0)
        off = (i * bits - 32 * word)[:, None].to(tl.int64)
        part = tl.where(off >= 0, c << tl.maximum(off, 0), c >> tl.maximum(-off, 0)) & 0xFFFFFFFF
        acc += tl.where(m, part, 0)
    signed = tl.where(acc >= 2147483648, acc - 4294967296, acc)
    tl.store(out_ptr + rw[:, None] * N + rn[None, :], signed.to(tl.int32), mask=mw[:, None] & (rn[None, :] < N))


@triton.jit
def gemv_kernel(x_ptr, stride_xm, qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr,
                qrow_ptr, shift_ptr, bits_ptr, group_ptr, y_ptr, M, N, K,
                K_PER_PROGRAM: tl.constexpr, M_MAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Split-K product for a few rows of x (M <= M_MAX), where decoding is memory bound: one
    program decodes stored rows ``[pid_k * K_PER_PROGRAM, +K_PER_PROGRAM)`` x ``BLOCK_N`` columns
    once, multiplies them with every row of ``x_perm`` on CUDA cores, and adds its float32 partial
    sums into ``y`` (float32, zero-initialised) atomically. The order of the atomic additions
    varies, so results vary in the last bits, within the bound of spec 8.2.1."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, M_MAX)
    acc = tl.zeros((M_MAX, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * K_PER_PROGRAM, pid_k * K_PER_PROGRAM + K_PER_PROGRAM, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        mask = mk[:, None] & (rn[None, :] < N)
        w = _decode_tile(qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr, qrow_ptr, shift_ptr, bits_ptr, group_ptr,
                         rk, mk, rn, mask).to(tl.float32)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & mk[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    tl.atomic_add(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))
