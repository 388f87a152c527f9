"""Coordinate descent after GPTQ (exl2.model.refine): what it keeps, and that it descends to a
local minimum of the layer's quadratic error."""

from __future__ import annotations

import pytest
import torch

from exl2.format import zero_point
from exl2.model import refine as refine_mod
from exl2.model.memory import refine_bytes
from exl2.model.refine import refine, refined
from exl2.qparams import QParams
from exl2.reference import dequantize, quantize

from . import peak_memory

OPTIONS = [QParams(64, [3, 2], [0.25, 0.75]), QParams(32, [4], [1.0]), QParams(32, [6, 5, 4], [0.25, 0.25, 0.5])]


def layer(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(k, generator=g)
    return torch.randn(n, k, generator=g) * 0.05, x.T @ x / x.shape[0]


def objective(weight: torch.Tensor, qm, h: torch.Tensor, damp: float) -> float:
    """tr(D^T H D) in float64, with the damping refine uses, computed from the decoded layer."""
    h = h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    d = weight.double().T - dequantize(qm)[:, : qm.out_features].double()
    return float(torch.einsum("kn,kj,jn->", d, h, d))


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.desc())
@pytest.mark.parametrize("shape", [(128, 40), (96, 64)])
def test_refine_lowers_the_error_and_keeps_everything_but_the_codes(option, shape):
    w, h = layer(*shape, seed=shape[0] + shape[1])
    base = quantize(w, option, h, bias=torch.randn(shape[1]) * 0.1)
    out = refine(base, w, h)
    for name in ("q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"):
        assert torch.equal(getattr(out, name), getattr(base, name)), name
    before, after = objective(w, base, h, refine_mod.DAMP), objective(w, out, h, refine_mod.DAMP)
    assert after < before  # GPTQ's rounding is never a local minimum on these layers
    assert not torch.equal(out.q_weight, base.q_weight)


def test_refine_reaches_a_row_wise_minimum():
    """After enough sweeps no single row can be re-coded to a lower error: checked row by row
    here with every code of the row's grid, independently of refine's own update rule."""
    option = QParams(32, [4, 3], [0.5, 0.5])
    w, h = layer(64, 24, seed=7)
    qm = refine(quantize(w, option, h), w, h, sweeps=30)
    hd = h.double().clone()
    hd.diagonal().add_(refine_mod.DAMP * hd.diagonal().mean())
    b = dequantize(qm)[:, : qm.out_features].double()  # [K, N], input-feature order
    d = w.double().T - b
    stored = qm.q_perm.tolist()
    row_of = {feature: i for i, feature in enumerate(stored)}
    from exl2.reference.decode import column_scales
    scales = column_scales(qm).double()[:, : qm.out_features]
    for feature in range(64):
        g = next(g for g in qm.groups if g.row <= row_of[feature] < g.row + g.rows)
        grid = (torch.arange(1 << g.bits, dtype=torch.float64) - zero_point(g.bits))[:, None] * scales[g.index][None]
        grid = grid.to(torch.float16).double()  # every value the row's codes can decode to, per column
        rest = hd[feature] @ d - hd[feature, feature] * d[feature]  # the other rows' pull on this one
        cand = w.double().T[feature][None] - grid  # the row's error for every code
        cost = hd[feature, feature] * cand.square() + 2 * cand * rest[None]
        best = cost.min(dim=0).values
        now = hd[feature, feature] * d[feature].square() + 2 * d[feature] * rest
        assert bool((now <= best + 1e-9 * (1 + best.abs())).all()), feature


def test_blocks_are_bookkeeping_only(monkeypatch):
    """Sweeping in blocks of 16 rows or in one block of all rows gives the same codes."""
    w, h = layer(128, 48, seed=3)
    base = quantize(w, OPTIONS[0], h)
    monkeypatch.setattr(refine_mod, "BLOCK", 16)
    small = refine(base, w, h)
    monkeypatch.setattr(refine_mod, "BLOCK", 10_000)
    whole = refine(base, w, h)
    assert torch.equal(small.q_weight, whole.q_weight)


def test_refined_encoder_without_hessian_is_the_encoder():
    w, _ = layer(64, 32, seed=1)
    assert torch.equal(refined(quantize)(w, OPTIONS[1]).q_weight, quantize(w, OPTIONS[1]).q_weight)
    assert refined(quantize, sweeps=0) is quantize


@pytest.mark.skipif(not peak_memory.SUPPORTED, reason="reads /proc (clear_refs, VmHWM) and uses glibc's mallopt")
@pytest.mark.parametrize("k, n", [(1024, 4096), (256, 65536)], ids=["square-ish", "wide-as-a-head"])
def test_refine_bytes_bounds_the_memory_refine_takes(k, n):
    from exl2.model.memory import REFINE_BLOCK
    from exl2.model.refine import BLOCK

    assert REFINE_BLOCK == BLOCK
    # two sweeps: a second sweep's H D must not be made while the first one's is still held
    # (a view of it outliving its name once did that), nor the packing run beside the buffers
    growth = peak_memory.growth("""
        from exl2 import QParams
        from exl2.model.refine import refine
        from exl2.reference import quantize
        k, n = int(sys.argv[1]), int(sys.argv[2])
        weight = torch.randn(n, k) * 0.02
        h = torch.randn(k, k)
        h = h @ h.T
        h.diagonal().add_(k)
        qm = quantize(weight, QParams(32, [4], [1.0]), h)
    """, """
        out = refine(qm, weight, h, sweeps=2)
        KEPT = out.q_weight.numel() * 4  # the result's words stay
    """, k, n)
    bound = refine_bytes(k, n)
    assert growth <= bound + (24 << 20), (growth, bound)  # the counted buffers, and the allocator's slack
    assert growth >= 0.6 * bound, (growth, bound)  # and all of them used
