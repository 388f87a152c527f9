"""Triton kernels of the fast path. Each kernel's docstring says what one program instance
computes; the reference check beside each is in tests/test_fast.py.

q_weight and q_scale words are handled as uint32 (logical shifts, no sign extension); offsets
into large tensors are int64. Decoded float16 values are produced by one float32 product rounded
to float16 (round to nearest even, Triton's default for fp32 -> fp16), exactly where spec 6
rounds: the product of two float16 values is exact in float32.

All decoding kernels walk the tile table (:func:`exl2.fast.plan.tile_table`): tiles of 32
stored rows (16 in 2-bit groups) that lie in one group, so a column's scale is computed once per
tile, and start on a word boundary. Kernels: :func:`dequantize_kernel` (bit-exact decode), :func:`gemv_kernel` +
:func:`split_sum_kernel` (M <= 4, every word read once), :func:`matmul_kernel` (fused decode +
tensor-core GEMM), :func:`encode_kernel` and :func:`pack_kernel` (codes and words, bit-exact),
:func:`gptq_group_kernel` (GPTQ's row loop inside one group).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_group_tile(w_ptrs, stride_qw, bits, rows, scale, mn, BLOCK_K: tl.constexpr):
    """float16 ``[BLOCK_K, BLOCK_N]``: the ``rows <= BLOCK_K`` stored rows of one tile of the
    tile table (width ``bits``, one group: ``scale`` is the columns' float16 scale, as float32),
    decoded for the program's columns (spec 5.1, 6.3); rows past ``rows`` and masked columns are 0.
    Row ``j``'s code starts ``j * bits`` bits into the tile; a code that straddles two words takes
    its high bits from the next word (loaded only for those rows)."""
    j = tl.arange(0, BLOCK_K)
    mask = (j < rows)[:, None] & mn[None, :]
    word = ((j * bits) // 32)[:, None]
    shift = ((j * bits) % 32)[:, None]
    lo = tl.load(w_ptrs[None, :] + word * stride_qw, mask=mask, other=0).to(tl.uint32, bitcast=True)
    # the next word only for a straddling code; 0 otherwise, so that the shift below adds nothing
    hi = tl.load(w_ptrs[None, :] + (word + 1) * stride_qw, mask=mask & (shift + bits > 32),
                 other=0).to(tl.uint32, bitcast=True)
    code = (lo >> shift.to(tl.uint32)) | (hi << ((32 - shift) & 31).to(tl.uint32))
    q = (code & ((1 << bits) - 1).to(tl.uint32)).to(tl.int32) - (1 << (bits - 1))
    value = (q.to(tl.float32) * scale[None, :]).to(tl.float16)
    return tl.where(mask, value, 0.0).to(tl.float16)


@triton.jit
def matmul_kernel(x_ptr, stride_xm, qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr,
                  tile_bits_ptr, tile_row_ptr, tile_qrow_ptr, tile_group_ptr, n_tiles, bias_ptr, y_ptr, stride_ym,
                  M, N, HAS_BIAS: tl.constexpr, X_IS_F16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program computes ``y[rm, rn]`` for ``BLOCK_M`` rows of x and ``BLOCK_N`` output columns:
    the sum over the tiles of the tile table (32 stored rows, 16 in 2-bit groups; ``BLOCK_K`` is
    32) of ``x_perm[:, tile] @ B[tile, rn]``, each tile's weights decoded in registers with one
    scale per column (:func:`_decode_group_tile`) and never written out (x is pre-permuted:
    ``x_perm = x[:, q_perm]``), accumulated in float32, plus the bias."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    j = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, n_tiles):
        bits = tl.load(tile_bits_ptr + t)
        rows = tl.where(bits == 2, 16, 32)
        row0 = tl.load(tile_row_ptr + t)
        w_ptrs = qw_ptr + tl.load(tile_qrow_ptr + t).to(tl.int64) * stride_qw + rn
        scale = _column_scales(qs_ptr, stride_qs, smax_ptr, tl.load(tile_group_ptr + t), rn, mn)
        w = _decode_group_tile(w_ptrs, stride_qw, bits, rows, scale, mn, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + row0 + j[None, :], mask=(rm[:, None] < M) & (j < rows)[None, :],
                    other=0.0)
        if X_IS_F16:
            acc += tl.dot(x.to(tl.float16), w, out_dtype=tl.float32)
        else:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & mn[None, :])


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
    q = tl.maximum(tl.minimum(_rint(tl.math.div_rn(w, s)) + zero, maxq), 0.0)  # NaN -> top code, as CUDA fmaxf/fminf
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
def _column_scales(qs_ptr, stride_qs, smax_ptr, group, rn, mn):
    """float32 ``[BLOCK_N]`` holding the float16 scales of ``group`` for columns ``rn`` (spec 6.1,
    6.2): ``half(half(q_scale_max / 256) * (c + 1)^2)``, each product exact in float32, rounded once."""
    word = tl.load(qs_ptr + group * stride_qs + rn // 8, mask=mn, other=0).to(tl.uint32, bitcast=True)
    qs = ((word >> ((rn % 8) * 4).to(tl.uint32)) & 0xF).to(tl.int32) + 1
    m = (tl.load(smax_ptr + group).to(tl.float32) * 0.00390625).to(tl.float16).to(tl.float32)
    return ((qs * qs).to(tl.float32) * m).to(tl.float16).to(tl.float32)


@triton.jit
def _centred(word, w: tl.constexpr, BITS: tl.constexpr):
    """Word ``w`` of a tile (uint32) with the top bit of every ``BITS``-bit code in it flipped: a
    code field then holds ``c ^ z`` (``z = 2^(BITS-1)``), whose ``BITS``-bit two's-complement
    value is ``c - z`` exactly, so :func:`_code_minus_zero` yields the centred code with a signed
    field extraction and no subtraction. Code ``i``'s top bit is bit ``i * BITS + BITS - 1`` of
    the tile's bit string (spec 5.1): in word ``w``, the bits ``k`` with
    ``32 w + k = BITS - 1 (mod BITS)``. One ``LOP3`` per word, a compile-time constant pattern."""
    EVERY: tl.constexpr = ((1 << (BITS * (32 // BITS + 1))) - 1) // ((1 << BITS) - 1)  # bits 0, BITS, 2 BITS, ...
    PATTERN: tl.constexpr = (EVERY << ((BITS - 1 - 32 * w) % BITS)) & 0xFFFFFFFF
    return word ^ PATTERN


@triton.jit
def _first_words(w_ptrs, stride_qw, mn, BITS: tl.constexpr, ROWS: tl.constexpr):
    """The tile's first q_weight word and the next (the same word when the tile has one) of each
    column (``w_ptrs``: the tile's first word of each column), as uint32 and :func:`_centred`:
    the words holding code 0."""
    cur = _centred(tl.load(w_ptrs, mask=mn, other=0).to(tl.uint32, bitcast=True), 0, BITS)
    nxt = cur
    if ROWS * BITS // 32 > 1:
        nxt = _centred(tl.load(w_ptrs + stride_qw, mask=mn, other=0).to(tl.uint32, bitcast=True), 1, BITS)
    return cur, nxt


@triton.jit
def _next_words(cur, nxt, w_ptrs, stride_qw, mn, j: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr):
    """The words holding code ``j > 0`` from those holding code ``j - 1``: code j starts
    ``(j * BITS) // 32`` words into the tile; when that is the next word, shift the pair along and
    load the word after it (each word of the tile is loaded once)."""
    if (j * BITS) // 32 != ((j - 1) * BITS) // 32:
        cur = nxt
        if (j * BITS) // 32 + 1 < ROWS * BITS // 32:
            W: tl.constexpr = (j * BITS) // 32 + 1
            nxt = _centred(tl.load(w_ptrs + W * stride_qw, mask=mn, other=0).to(tl.uint32, bitcast=True), W, BITS)
    return cur, nxt


@triton.jit
def _code_minus_zero(cur, nxt, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of the tile minus the zero point, ``c - z`` (int32), cut from its
    :func:`_centred` words with compile-time shifts (spec 5.1, 6.3): the field starts
    ``(j * BITS) % 32`` bits into ``cur`` and straddles into ``nxt`` when that plus ``BITS``
    passes 32; it is moved to the top of the word and shifted back arithmetically (sign
    extension of ``c ^ z``)."""
    S: tl.constexpr = (j * BITS) % 32
    if S + BITS > 32:
        field = (cur >> S) | (nxt << (32 - S))
    else:
        field = cur >> S
    return (field << (32 - BITS)).to(tl.int32, bitcast=True) >> (32 - BITS)


@triton.jit
def _dequantize_tile(w_ptrs, stride_qw, dest_ptr, out_ptr, stride_out, scale, rn, mn,
                     BITS: tl.constexpr, ROWS: tl.constexpr):
    """Decode one tile of ``ROWS`` stored rows of width ``BITS`` for the program's columns and
    store row ``j`` at input-feature row ``dest[j]`` of ``out`` (spec 6.3): ``half((q - z) * s)``,
    one float32 product of an integer below 2^8 and a float16 value (exact), rounded once."""
    cur, nxt = _first_words(w_ptrs, stride_qw, mn, BITS, ROWS)
    for j in tl.static_range(ROWS):
        if j > 0:
            cur, nxt = _next_words(cur, nxt, w_ptrs, stride_qw, mn, j, BITS, ROWS)
        q = _code_minus_zero(cur, nxt, j, BITS)
        value = (q.to(tl.float32) * scale).to(tl.float16)
        row = tl.load(dest_ptr + j).to(tl.int64)
        tl.store(out_ptr + row * stride_out + rn, value, mask=mn)


@triton.jit
def dequantize_kernel(qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr, dest_ptr,
                      tile_bits_ptr, tile_row_ptr, tile_qrow_ptr, tile_group_ptr,
                      out_ptr, stride_out, N, BLOCK_N: tl.constexpr):
    """One program decodes tile ``pid_t`` of the tile table (32 stored rows, 16 in 2-bit groups,
    inside one group) x columns ``[pid_n * BLOCK_N, +BLOCK_N)`` and writes each stored row ``k``
    to input-feature row ``q_perm[k]`` (``dest``). The scale of each column is computed once per
    tile; every q_weight word is loaded once; the width is a runtime value per tile and each
    branch is :func:`_dequantize_tile` compiled for one width (constant shifts and masks)."""
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    bits = tl.load(tile_bits_ptr + t)
    dest = dest_ptr + tl.load(tile_row_ptr + t)
    w_ptrs = qw_ptr + tl.load(tile_qrow_ptr + t).to(tl.int64) * stride_qw + rn
    scale = _column_scales(qs_ptr, stride_qs, smax_ptr, tl.load(tile_group_ptr + t), rn, mn)
    if bits == 4:
        _dequantize_tile(w_ptrs, stride_qw, dest, out_ptr, stride_out, scale, rn, mn, 4, 32)
    elif bits == 3:
        _dequantize_tile(w_ptrs, stride_qw, dest, out_ptr, stride_out, scale, rn, mn, 3, 32)
    elif bits == 5:
        _dequantize_tile(w_ptrs, stride_qw, dest, out_ptr, stride_out, scale, rn, mn, 5, 32)
    elif bits == 6:
        _dequantize_tile(w_ptrs, stride_qw, dest, out_ptr, stride_out, scale, rn, mn, 6, 32)
    elif bits == 2:
        _dequantize_tile(w_ptrs, stride_qw, dest, out_ptr, stride_out, scale, rn, mn, 2, 16)
    else:
        _dequantize_tile(w_ptrs, stride_qw, dest, out_ptr, stride_out, scale, rn, mn, 8, 32)


@triton.jit
def _x_row(x_ptr, stride_xm, idx, M, m: tl.constexpr):
    """float32 ``x[m, idx]``, 0 for rows ``m >= M`` (a scalar: the same for every thread)."""
    return tl.load(x_ptr + m * stride_xm + idx, mask=m < M, other=0.0).to(tl.float32)


@triton.jit
def _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_ptr, stride_xm, dest_ptr, M, scale, mn,
                  BITS: tl.constexpr, ROWS: tl.constexpr, M_MAX: tl.constexpr, X_PERMUTED: tl.constexpr):
    """``acc_m + x[m, tile] @ B_tile`` for one tile of ``ROWS`` stored rows of width ``BITS`` and
    each row ``m < M_MAX`` of x (spec 5.1, 6.3): each of the tile's ``ROWS * BITS / 32`` q_weight
    words is loaded once (``w_ptrs``: the tile's first word of each column), and code ``j`` is cut
    from it with compile-time shifts (``j * BITS`` bits into the tile, straddling into the next
    word where ``shift + BITS > 32``). Row ``j`` multiplies input feature ``dest[j]`` of x
    (act-order), or with ``X_PERMUTED`` (x already in stored-row order, ``x_ptr`` at the tile's
    first row) ``x_ptr[j]``.

    A tile lies in one group, so each column has one scale ``s``: per weight, the code minus the
    zero point ``q_j - z`` as a float32 (exact: an integer below 2^8) and one multiply-add
    ``x_j (q_j - z)`` per row of x; the scale is applied once per tile and column. The zero
    point is subtracted before any product, so the error of the sum scales with
    ``sum_j |x_j| |q_j - z| s``, i.e. with ``sum |x| |B|`` as spec 8.2.1 bounds it (accumulating
    ``sum x_j q_j - z sum x_j`` instead would cancel terms of size ``z |x_j|`` and lose float32
    steps of that size: issue 11). ``q_j - z`` comes from a signed field extraction of the
    :func:`_centred` words, as cheap as the unsigned one: the zero point costs one ``LOP3`` per
    word, not an instruction per weight. The float16 rounding of each decoded weight (spec 6.3)
    is skipped: it moves each term by at most 2^-11 of ``|x_j| |B_j|`` (scales are multiples of
    2^-24, so products in float16's subnormal range are exact), inside the bound.

    Every tensor here is 1-D over the program's columns, one accumulator per row of x, and x
    values are scalars: a 2-D ``[M, BLOCK_N]`` accumulator would take a layout other than the
    vectorized q_weight loads', and Triton would convert every decoded row through shared
    memory (seen in the compiled code: two barriers per row)."""
    qx0 = tl.zeros_like(acc0)  # sum_j x[m, j] (q_j - z), per row m of x
    qx1 = tl.zeros_like(acc0)
    qx2 = tl.zeros_like(acc0)
    qx3 = tl.zeros_like(acc0)
    cur, nxt = _first_words(w_ptrs, stride_qw, mn, BITS, ROWS)
    for j in tl.static_range(ROWS):
        if j > 0:
            cur, nxt = _next_words(cur, nxt, w_ptrs, stride_qw, mn, j, BITS, ROWS)
        q = _code_minus_zero(cur, nxt, j, BITS).to(tl.float32)  # exact: |q - z| <= 128
        if X_PERMUTED:
            idx = j
        else:
            idx = tl.load(dest_ptr + j)
        qx0 += _x_row(x_ptr, stride_xm, idx, M, 0) * q
        if M_MAX > 1:
            qx1 += _x_row(x_ptr, stride_xm, idx, M, 1) * q
        if M_MAX > 2:
            qx2 += _x_row(x_ptr, stride_xm, idx, M, 2) * q
            qx3 += _x_row(x_ptr, stride_xm, idx, M, 3) * q
    acc0 += qx0 * scale
    if M_MAX > 1:
        acc1 += qx1 * scale
    if M_MAX > 2:
        acc2 += qx2 * scale
        acc3 += qx3 * scale
    return acc0, acc1, acc2, acc3


@triton.jit
def gemv_kernel(x_ptr, stride_xm, dest_ptr, qw_ptr, stride_qw, qs_ptr, stride_qs, smax_ptr,
                tile_bits_ptr, tile_row_ptr, tile_qrow_ptr, tile_group_ptr, part_ptr, M, N, n_tiles,
                tiles_per_program, M_MAX: tl.constexpr, BLOCK_N: tl.constexpr, X_PERMUTED: tl.constexpr):
    """Split-K product for a few rows of x (``M <= M_MAX <= 4``), where the layer is memory bound.
    One program takes tiles ``[pid_k * tiles_per_program, +tiles_per_program)`` of stored rows (32
    rows, 16 for 2-bit groups; each inside one group, see :func:`exl2.fast.plan.tile_table`) and
    columns ``[pid_n * BLOCK_N, +BLOCK_N)``, reads every q_weight word of them exactly once
    (coalesced along N), decodes it in registers and writes the float32 partial product
    ``x @ B[tiles, columns]`` to ``part[pid_k]`` (``[splits, M, N]``). x is read unpermuted
    (stored row ``k`` multiplies feature ``q_perm[k]``, ``dest``), or, with ``X_PERMUTED``, is
    ``x[:, q_perm]`` gathered by the host. The width is a runtime value per tile; each branch is
    the same code, :func:`_tile_product`, compiled for one width."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid_k * tiles_per_program
    for t in range(first, tl.minimum(first + tiles_per_program, n_tiles)):
        bits = tl.load(tile_bits_ptr + t)
        row = tl.load(tile_row_ptr + t)
        w_ptrs = qw_ptr + tl.load(tile_qrow_ptr + t).to(tl.int64) * stride_qw + rn
        scale = _column_scales(qs_ptr, stride_qs, smax_ptr, tl.load(tile_group_ptr + t), rn, mn)
        x_tile = x_ptr
        if X_PERMUTED:
            x_tile = x_ptr + row
        if bits == 4:
            acc0, acc1, acc2, acc3 = _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_tile, stride_xm,
                                                   dest_ptr + row, M, scale, mn, 4, 32, M_MAX, X_PERMUTED)
        elif bits == 3:
            acc0, acc1, acc2, acc3 = _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_tile, stride_xm,
                                                   dest_ptr + row, M, scale, mn, 3, 32, M_MAX, X_PERMUTED)
        elif bits == 5:
            acc0, acc1, acc2, acc3 = _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_tile, stride_xm,
                                                   dest_ptr + row, M, scale, mn, 5, 32, M_MAX, X_PERMUTED)
        elif bits == 6:
            acc0, acc1, acc2, acc3 = _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_tile, stride_xm,
                                                   dest_ptr + row, M, scale, mn, 6, 32, M_MAX, X_PERMUTED)
        elif bits == 2:
            acc0, acc1, acc2, acc3 = _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_tile, stride_xm,
                                                   dest_ptr + row, M, scale, mn, 2, 16, M_MAX, X_PERMUTED)
        else:
            acc0, acc1, acc2, acc3 = _tile_product(acc0, acc1, acc2, acc3, w_ptrs, stride_qw, x_tile, stride_xm,
                                                   dest_ptr + row, M, scale, mn, 8, 32, M_MAX, X_PERMUTED)
    out = part_ptr + pid_k * M * N + rn
    tl.store(out, acc0, mask=mn)
    if M_MAX > 1:
        tl.store(out + N, acc1, mask=mn & (tl.full((BLOCK_N,), 1, tl.int32) < M))
    if M_MAX > 2:
        tl.store(out + 2 * N, acc2, mask=mn & (tl.full((BLOCK_N,), 2, tl.int32) < M))
        tl.store(out + 3 * N, acc3, mask=mn & (tl.full((BLOCK_N,), 3, tl.int32) < M))


@triton.jit
def split_sum_kernel(part_ptr, bias_ptr, y_ptr, SPLITS, MN, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One program sums the ``SPLITS`` float32 partial products of :func:`gemv_kernel` for
    ``BLOCK`` consecutive outputs of ``y`` ``[M, N]`` in a fixed order (so results are
    deterministic), adds the bias and stores in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gptq_group_kernel(w_ptr, u_ptr, stride_u, scale_ptr, code_ptr, err_ptr, R, N, bits,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """GPTQ inside one group (spec 7.3; exllamav2 ``quantize_func``): one program owns columns
    ``[pid * BLOCK_N, +BLOCK_N)`` of the group's ``R <= BLOCK_R`` rows ``w`` (float32 ``[R, N]``),
    held in registers. Row by row: encode row ``r`` under the column scales, store its codes and
    its scaled error ``e = (w_r - value) / u[r, r]``, and feed ``u[r, r'] * e`` back into every
    later row ``r' > r`` of the group. ``u`` is the group's diagonal block of the upper Cholesky
    factor of the inverse Hessian; the update of later groups is one GEMM on the host."""
    rr = tl.arange(0, BLOCK_R)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    mask = (rr[:, None] < R) & mn[None, :]
    w = tl.load(w_ptr + rr[:, None] * N + rn[None, :], mask=mask, other=0.0)
    s = tl.load(scale_ptr + rn, mask=mn, other=1.0)
    zero = (1 << (bits - 1)) * 1.0
    maxq = ((1 << bits) - 1) * 1.0
    for r in range(R):
        row = tl.sum(tl.where(rr[:, None] == r, w, 0.0), axis=0)  # exact: one term, the rest zeros
        q = tl.maximum(tl.minimum(_rint(tl.math.div_rn(row, s)) + zero, maxq), 0.0)
        value = ((q - zero) * s).to(tl.float16).to(tl.float32)
        e = tl.math.div_rn(row - value, tl.load(u_ptr + r * stride_u + r))
        tl.store(code_ptr + r * N + rn, q.to(tl.int64), mask=mn)
        tl.store(err_ptr + r * N + rn, e, mask=mn)
        u_row = tl.load(u_ptr + r * stride_u + rr, mask=(rr > r) & (rr < R), other=0.0)
        w = w - u_row[:, None] * e[None, :]
