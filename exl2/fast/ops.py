"""Host side of the fast path: input checks, tables, launches."""

from __future__ import annotations

import torch
import triton

from ..format import BLOCKS
from ..layer_rules import layer_rules, run
from ..qmatrix import QMatrix, refuse
from . import kernels
from .plan import cached, permutation, tile_table, word_table
from .tuning import (DEQUANT_BLOCK_N, DEQUANT_WARPS, ENCODE_BLOCK_N, FUSED_BLOCK_K, FUSED_BLOCK_M, FUSED_BLOCK_N,
                     GEMV_CONFIGS, GEMV_MAX_M, MATMUL_CROSSOVER_M, GemvConfig)


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (decided when triton decorated them,
    from ``TRITON_INTERPRET`` at that time: :func:`exl2.fast.use_interpreter`)."""
    return not isinstance(kernels.dequantize_kernel, triton.runtime.JITFunction)


#: How to run without a GPU, for error messages.
HOW_TO_INTERPRET = ("without a GPU, opt in to Triton's interpreter (slow) before anything imports triton: "
                    "call exl2.fast.use_interpreter(), or set TRITON_INTERPRET=1")


def check_device(t: torch.Tensor, what: str = "the QMatrix") -> None:
    """Compiled kernels need GPU tensors; Triton's interpreter (opted into before triton was
    imported) needs CPU tensors. Anything else is refused before a launch, saying what to do."""
    if interpreted() and t.device.type != "cpu":
        raise RuntimeError(f"exl2.fast runs under Triton's interpreter in this process (TRITON_INTERPRET=1) and "
                           f"needs CPU tensors; {what} is on {t.device}")
    if not interpreted() and not t.is_cuda:
        gpu = torch.cuda.is_available()
        raise RuntimeError(f"exl2.fast needs GPU tensors ({what} is on {t.device}); "
                           + ("move it with .to('cuda')" if gpu else f"no GPU is visible: {HOW_TO_INTERPRET}"))


def check(qm: QMatrix) -> None:
    """Refuse a malformed QMatrix before any launch: the first error of the format's rule table
    (:mod:`exl2.layer_rules`, e.g. padded columns that do not decode to 0) as a FormatError with
    its code, then the device and the layout. The QMatrix ran the same table when it was built;
    running it again per contents catches tensors edited in place since. Done once per contents."""
    cached(qm, "_fast_checked", _check)


def _check(qm: QMatrix) -> bool:
    run(layer_rules(qm.to_tensors(), qm.out_features), refuse)
    check_device(qm.q_weight)
    if not all(t.is_contiguous() for t in (qm.q_weight, qm.q_scale, qm.q_scale_max, qm.q_invperm)):
        raise ValueError("exl2.fast needs contiguous QMatrix tensors (as read from a file); use .contiguous()")
    return True


def dequantize(qm: QMatrix) -> torch.Tensor:
    """float16 ``[in_features, out_features_padded]``, bit-exact with the reference (spec 6): one
    program per tile of the tile table and :data:`DEQUANT_BLOCK_N` columns."""
    check(qm)
    t = tile_table(qm)
    k, n = qm.in_features, qm.out_features_padded
    out = torch.empty((k, n), dtype=torch.float16, device=qm.q_weight.device)
    grid = (t.count, triton.cdiv(n, DEQUANT_BLOCK_N))
    kernels.dequantize_kernel[grid](qm.q_weight, qm.q_weight.stride(0), qm.q_scale, qm.q_scale.stride(0),
                                    qm.q_scale_max, permutation(qm), t.bits, t.row, t.qrow, t.group, out,
                                    out.stride(0), n, BLOCK_N=DEQUANT_BLOCK_N, num_warps=DEQUANT_WARPS)
    return out


def matmul(x: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """``x @ B + bias`` for ``x`` ``[..., in_features]``; ``[..., out_features]`` in x's dtype
    (spec 6.5, within the bound of 8.2.1). Three paths by the rows M of x: :func:`gemv` for
    M <= :data:`GEMV_MAX_M`, :func:`fused_matmul` up to :data:`MATMUL_CROSSOVER_M`,
    :func:`dequantize_matmul` above."""
    check(qm)
    if x.shape[-1] != qm.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {qm.in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, is {x.dtype}")
    if x.device != qm.q_weight.device:
        raise ValueError(f"x is on {x.device}, the layer on {qm.q_weight.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qm.in_features).contiguous()
    m = x2.shape[0]
    if m == 0:
        y = x.new_empty((0, qm.out_features))
    elif m <= GEMV_MAX_M:
        y = gemv(x2, qm)
    elif m <= MATMUL_CROSSOVER_M:
        y = fused_matmul(x2, qm)
    else:
        y = dequantize_matmul(x2, qm)
    return y.reshape(*lead, qm.out_features)


def dequantize_matmul(x2: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """``x2 @ B + bias`` for ``x2`` ``[M, K]`` through :func:`dequantize` and ``torch.matmul``
    (float32 accumulation: float16 and bfloat16 GEMMs accumulate in float32, float32 x multiplies
    in float32)."""
    b = dequantize(qm)[:, :qm.out_features]
    y = x2 @ b.to(x2.dtype)  # bfloat16 x: the weights rounded to bfloat16, inside its bound (8.2.1)
    if qm.bias is not None:
        y = y + qm.output_bias.to(y.dtype)
    return y


def fused_matmul(x2: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """``x2 @ B + bias`` for ``x2`` ``[M, K]`` with the fused tensor-core kernel
    (:func:`kernels.matmul_kernel`): weights decoded tile by tile, never written out."""
    check(qm)
    m, n = x2.shape[0], qm.out_features
    t = tile_table(qm)
    x_perm = in_stored_order(x2, qm)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, FUSED_BLOCK_M), triton.cdiv(n, FUSED_BLOCK_N))
    bias = qm.bias if qm.bias is not None else y
    kernels.matmul_kernel[grid](x_perm, x_perm.stride(0), qm.q_weight, qm.q_weight.stride(0), qm.q_scale,
                                qm.q_scale.stride(0), qm.q_scale_max, t.bits, t.row, t.qrow, t.group, t.count, bias, y,
                                y.stride(0), m, n, HAS_BIAS=qm.bias is not None, X_IS_F16=x2.dtype == torch.float16,
                                BLOCK_M=FUSED_BLOCK_M, BLOCK_N=FUSED_BLOCK_N, BLOCK_K=FUSED_BLOCK_K)
    return y


def in_stored_order(x2: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """``x2[:, q_perm]``, contiguous: column ``k`` is the input feature that stored row ``k`` multiplies."""
    return x2.index_select(1, permutation(qm))  # the cached int32 permutation, no index conversion per call


def gemv_splits(tiles: int, column_blocks: int, programs_per_sm: int, device: torch.device) -> int:
    """How many parts the GEMV splits K into: enough programs to fill the GPU (``programs_per_sm``
    per multiprocessor), at most one per tile. Under the interpreter, as if there were 2
    multiprocessors (so tests cover the split)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(tiles, triton.cdiv(programs_per_sm * sms, column_blocks)))


def gemv(x2: torch.Tensor, qm: QMatrix, splits: int | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``x2 @ B + bias`` for ``x2`` ``[M, K]`` with ``M <= GEMV_MAX_M``: split-K partial products
    (:func:`kernels.gemv_kernel`), then their sum in a fixed order plus the bias
    (:func:`kernels.split_sum_kernel`): two launches (three with ``permute_x``), deterministic.
    ``splits`` overrides :func:`gemv_splits`; ``config`` overrides :data:`GEMV_CONFIGS`."""
    check(qm)
    if x2.dim() != 2 or not 0 < x2.shape[0] <= GEMV_MAX_M or x2.shape[1] != qm.in_features:
        raise ValueError(f"gemv takes x [1..{GEMV_MAX_M}, {qm.in_features}], not {list(x2.shape)}")
    if x2.device != qm.q_weight.device:
        raise ValueError(f"x is on {x2.device}, the layer on {qm.q_weight.device}")
    m, n = x2.shape[0], qm.out_features
    m_max = triton.next_power_of_2(m)
    cfg = config or GEMV_CONFIGS[m_max]
    t = tile_table(qm)
    dest = permutation(qm)
    x2 = in_stored_order(x2, qm) if cfg.permute_x else x2.contiguous()
    column_blocks = triton.cdiv(n, cfg.block_n)
    splits = splits or gemv_splits(t.count, column_blocks, cfg.programs_per_sm, x2.device)
    per_program = triton.cdiv(t.count, splits)
    splits = triton.cdiv(t.count, per_program)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
    kernels.gemv_kernel[(column_blocks, splits)](
        x2, x2.stride(0), dest, qm.q_weight, qm.q_weight.stride(0), qm.q_scale, qm.q_scale.stride(0), qm.q_scale_max,
        t.bits, t.row, t.qrow, t.group, part, m, n, t.count, per_program,
        M_MAX=m_max, BLOCK_N=cfg.block_n, X_PERMUTED=cfg.permute_x, num_warps=cfg.warps)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    block = 1024
    bias = qm.bias if qm.bias is not None else y
    kernels.split_sum_kernel[(triton.cdiv(m * n, block),)](part, bias, y, splits, m * n, n,
                                                          HAS_BIAS=qm.bias is not None, BLOCK=block)
    return y


def encode_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`exl2.reference.encode_rows`, on a Triton kernel: codes (int64) and decoded values."""
    check_device(w, "w")
    w2 = w.reshape(-1, w.shape[-1]).to(torch.float32).contiguous()
    r, n = w2.shape
    codes = torch.empty((r, n), dtype=torch.int64, device=w.device)
    values = torch.empty((r, n), dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(r, 16), triton.cdiv(n, ENCODE_BLOCK_N))
    kernels.encode_kernel[grid](w2, scale.to(torch.float32).contiguous(), codes, values, r, n, bits,
                                BLOCK_R=16, BLOCK_N=ENCODE_BLOCK_N)
    return codes.reshape(w.shape), values.reshape(w.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """As :func:`exl2.reference.pack_codes`, on a Triton kernel: q_weight words of one group."""
    check_device(codes, "codes")
    rows, n = codes.shape
    blk = BLOCKS[bits]
    if rows % blk.rows:
        raise ValueError(f"{rows} rows is not a whole number of {blk.rows}-row blocks")
    row0, word = word_table(rows, bits, codes.device)
    w = row0.numel()
    out = torch.empty((w, n), dtype=torch.int32, device=codes.device)
    grid = (triton.cdiv(w, 16), triton.cdiv(n, ENCODE_BLOCK_N))
    kernels.pack_kernel[grid](codes.to(torch.int64).contiguous(), row0, word, out, w, n, bits, blk.rows,
                              MAX_CODES=18, BLOCK_W=16, BLOCK_N=ENCODE_BLOCK_N)
    return out


