"""Coordinate descent after GPTQ: the codes re-chosen one row at a time, the scales kept.

GPTQ visits each input row once, in act-order, and rounds it knowing only the rows before it;
its damping (12 % of the mean Hessian diagonal, exllamav2's) also makes it solve a smoothed
problem. What the layer's output error actually is, on the calibration inputs, is the quadratic
``L = tr(D^T H D)`` with ``D = W - W_hat`` (``[K, N]``, rows = input features) and ``H`` the
Hessian (or covariance, :mod:`exl2.model.centering`). With every row but ``r`` fixed, ``L`` is
``H_rr ||D_r - t_r||^2 + const`` with ``t_r = D_r - (H D)_r / H_rr``: separable in the columns,
so the code nearest to ``W_r - t_r`` on row ``r``'s grid (its group's width and column scales,
clamped to the code range) is the exact minimiser over that row. Sweeping the rows so never
raises ``L``; a few sweeps take GPTQ's result to a local minimum of the true objective
(QuantEase, Behdin et al. 2023, is this method with its own scales; here the scales stay GPTQ's
so that the format and the stored scales are unchanged).

The rows are swept in blocks of :data:`BLOCK`: within a block only the block's rows of ``H D``
are kept current (rank-1 updates), the rest once per block (one matrix product), as GPTQ's lazy
batches do; the result is the same as row by row over all of ``H D`` (float32, ``H D``
recomputed at each sweep).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..format import zero_point
from ..qmatrix import QMatrix
from ..reference.decode import column_scales
from ..reference.packing import pack_codes, unpack_codes

#: Sweeps over the rows (each lowers the objective; the third changes little, measured in
#: docs/results/ablation.json).
SWEEPS = 3
#: Damping of the Hessian for the descent, a fraction of its mean diagonal: small, to keep a
#: direction the calibration inputs never excite from being set by rounding noise alone.
DAMP = 0.01
BLOCK = 128


def refine(qm: QMatrix, weight: torch.Tensor, hessian: torch.Tensor, sweeps: int = SWEEPS,
           damp: float = DAMP) -> QMatrix:
    """``qm`` with its codes re-chosen by coordinate descent on ``tr(D^T H D)``; its scales,
    groups, permutation and bias unchanged. ``weight`` ``[out_features, in_features]`` is what
    ``qm`` encodes and ``hessian`` ``[in_features, in_features]`` the matrix GPTQ was given."""
    if sweeps <= 0:
        return qm
    n = qm.out_features
    perm = qm.q_perm.to(torch.int64)
    w = weight.detach().to(torch.float32).T[perm]  # [K, N], stored (act-order) rows
    h = torch.empty((len(perm), len(perm)))  # permuted a slice of rows at a time: one [K, K] buffer
    for a in range(0, len(perm), 1024):
        h[a:a + 1024] = hessian.detach()[perm[a:a + 1024]].to(torch.float32)[:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    diag = h.diagonal().clone()
    if not bool((diag > 0).all()):
        return qm  # a row no input reaches: nothing to descend on
    k = w.shape[0]

    scales = column_scales(qm).to(torch.float32)[:, :n]  # [G, N]
    group_of = torch.empty(k, dtype=torch.int64)  # each stored row's group
    high, zero = torch.empty(k), torch.empty(k)
    codes = torch.empty((k, qm.out_features_padded), dtype=torch.uint8)  # padded columns kept as stored

    def value(c: torch.Tensor, r) -> torch.Tensor:
        # decoded weights of row(s) r, rounded to float16 where exllamav2's reconstruct rounds them
        return ((c - zero[r, None]) * scales[group_of[r]]).to(torch.float16).to(torch.float32)

    d = torch.empty_like(w)  # D = W - W_hat
    for g in qm.groups:
        rows = slice(g.row, g.row + g.rows)
        codes[rows] = unpack_codes(qm.q_weight[g.qrow:g.qrow + g.qrows], g.bits, dtype=torch.int32)[:g.rows]
        group_of[rows], high[rows], zero[rows] = g.index, float((1 << g.bits) - 1), float(zero_point(g.bits))
        d[rows] = w[rows] - value(codes[rows, :n].to(torch.float32), rows)
    for _ in range(sweeps):
        g_all = h @ d  # H D, afresh each sweep so that float32 rounding does not accumulate
        for a in range(0, k, BLOCK):
            b = min(a + BLOCK, k)
            d_old = d[a:b].clone()
            g = g_all[a:b]  # kept current inside the block
            for r in range(a, b):
                target = w[r] - d[r] + g[r - a] / diag[r]  # the row's unconstrained optimum
                c = (torch.round(target / scales[group_of[r]]) + zero[r]).clamp_(min=0).minimum(high[r])
                new = w[r] - value(c, r)
                step = new - d[r]
                if bool(step.any()):
                    g += h[a:b, r:r + 1] * step[None, :]
                    d[r] = new
                    codes[r, :n] = c.to(torch.uint8)
            change = d[a:b] - d_old
            if bool(change.any()):  # the rows outside the block, once
                g_all[:a].addmm_(h[:a, a:b], change)  # in place: no [K, N] temporary
                g_all[b:].addmm_(h[b:, a:b], change)
            del d_old, change
        # g, a view of g_all, would otherwise keep it alive into the next sweep's H D
        del g_all, g
    del w, d, h  # only the codes are packed
    words = [pack_codes(codes[g.row:g.row + g.rows].to(torch.int64), g.bits) for g in qm.groups]
    return replace(qm, q_weight=torch.cat(words))


def refined(encoder: Callable, sweeps: int = SWEEPS, damp: float = DAMP) -> Callable:
    """``encoder`` (as :func:`exl2.reference.quantize`) followed by :func:`refine` with the same
    weight and Hessian; without a Hessian (round-to-nearest) the encoder alone."""
    if sweeps <= 0:
        return encoder

    def encode(weight, qparams, hessian=None, bias=None, **kw):
        qm = encoder(weight, qparams, hessian, bias=bias, **kw)
        return qm if hessian is None else refine(qm, weight, hessian, sweeps, damp)
    return encode
