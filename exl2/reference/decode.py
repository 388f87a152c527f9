"""Decoding (spec 6): from a QMatrix to its float16 weights, and the layer's product.

Every float16 rounding point of exllamav2's reconstruct kernel is reproduced explicitly: each
arithmetic step is done in float32, where it is exact, and rounded to float16 once, exactly where
the CUDA code rounds. The result is bit-identical to exllamav2.
"""

from __future__ import annotations

import torch

from ..format import zero_point
from ..qmatrix import QMatrix
from .packing import unpack_codes, unpack_scales


def group_max_scales(qm: QMatrix) -> torch.Tensor:
    """float16 ``[G]``: ``q_scale_max / 256``, rounded once to float16 (spec 6.1).

    exllamav2 multiplies the float16 tensor by ``1/256`` in float32 (exact) before use
    (``ext.py``, ``make_q_matrix``); small maxima become float16 subnormals and lose bits here."""
    return (qm.q_scale_max.to(torch.float32) / 256).to(torch.float16)


def column_scales(qm: QMatrix) -> torch.Tensor:
    """float16 ``[G, N]``: the scale of each group and column (spec 6.2).

    ``scale = half((c + 1)^2 * max)`` with ``c`` the 4-bit code and ``max`` from
    :func:`group_max_scales` (``qdq_util.cuh``, ``dq_scale``): ``(c + 1)^2 <= 256`` is exact in
    float16 and the product of two float16 values is exact in float32, so one rounding."""
    squares = (unpack_scales(qm.q_scale) + 1).square().to(torch.float32)
    return (squares * group_max_scales(qm).to(torch.float32)[:, None]).to(torch.float16)


def group_values(qm: QMatrix):
    """Per group: the group and its float16 values ``[rows, N]`` in stored order (spec 6.3).

    ``half((q - 2^(b-1)) * scale)``: ``q - 2^(b-1)`` is a small integer and the scale a float16
    value, so their float32 product is exact and the conversion to float16 is the one rounding,
    as ``__hmul2`` rounds in exllamav2's reconstruct kernel. One group at a time keeps the
    float32 intermediates small."""
    scales = column_scales(qm).to(torch.float32)
    for g in qm.groups:
        codes = unpack_codes(qm.q_weight[g.qrow:g.qrow + g.qrows], g.bits, dtype=torch.int32)[:g.rows]
        values = codes.to(torch.float32).sub_(zero_point(g.bits)).mul_(scales[g.index])
        yield g, values.to(torch.float16)


def dequantize_stored(qm: QMatrix) -> torch.Tensor:
    """float16 ``[in_features, N]`` in stored (act-order) row order (spec 6.3)."""
    out = torch.empty((qm.in_features, qm.out_features_padded), dtype=torch.float16, device=qm.q_weight.device)
    for g, values in group_values(qm):
        out[g.row:g.row + g.rows] = values
    return out


def dequantize(qm: QMatrix) -> torch.Tensor:
    """float16 ``B`` ``[in_features, out_features_padded]``, rows in input-feature order (spec 6.4).

    Stored row ``k`` is input feature ``q_perm[k]``: ``B[q_perm[k]] = stored[k]``, equivalently
    ``B[j] = stored[q_invperm[j]]``. Bit-identical to exllamav2's ``QMatrix::reconstruct``."""
    out = torch.empty((qm.in_features, qm.out_features_padded), dtype=torch.float16, device=qm.q_weight.device)
    q_perm = qm.q_perm.to(device=out.device, dtype=torch.int64)
    for g, values in group_values(qm):
        out.index_copy_(0, q_perm[g.row:g.row + g.rows], values)
    return out


def matmul(x: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """``y = x @ B + bias`` for ``x`` ``[..., in_features]``, accumulated in float32 (spec 6.5).

    Returns ``[..., out_features]`` in ``x``'s dtype; padded columns (and bias entries) are dropped."""
    if x.shape[-1] != qm.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {qm.in_features}")
    b = dequantize(qm)[:, :qm.out_features].to(torch.float32)
    y = x.to(torch.float32) @ b
    if qm.bias is not None:
        y = y + qm.output_bias.to(torch.float32)
    return y.to(x.dtype)
