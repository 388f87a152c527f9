"""The encoder's working memory is kept small (float32 working copy made directly in act-order,
one-byte codes, the inverse-Hessian factor computed in place, the scale search in place) without
changing a bit of its output: each lean step against the straightforward computation it replaces,
and :func:`exl2.model.memory.encode_bytes` against the memory one encode really takes."""

from __future__ import annotations

import pytest
import torch

from exl2 import QParams
from exl2.model.memory import encode_bytes
from exl2.reference import encode
from exl2.reference.encode import P_GRID, P_MAX, P_MIN, PERCDAMP, decoded_scales, encode_rows, gptq_group, pack
from exl2.format import zero_point

from . import peak_memory

QPARAMS = [
    QParams(32, [4], [1.0]),
    QParams(64, [6, 3], [0.5, 0.5]),
    QParams({8: 32, 5: 64, 2: 32}, [8, 5, 2], [0.25, 0.5, 0.25]),
]


# -- the straightforward computation: one new tensor per step -------------------------------------


def plain_find_scales(w: torch.Tensor, bits: int, err_norm: float = 3.5):
    maxq, z = (1 << bits) - 1, zero_point(bits)
    base = (w.abs().amax(dim=0) + 1e-12) / (maxq / 2)
    smax = base.max()
    qs = torch.clamp(torch.round(torch.sqrt(base / smax) * 16), 1, 16)
    trial = (qs / 16) ** 2 * smax
    pi = torch.arange(P_GRID + 1, dtype=torch.float32) / P_GRID
    grid = P_MIN * (1 - pi) + P_MAX * pi
    chunk = max(1, min(len(grid), (1 << 22) // max(1, w.numel())))
    errors = []
    for ps in grid.split(chunk):
        s = trial[None, None, :] * ps[:, None, None]
        q = torch.clamp(torch.round(w[None] / s), -z, maxq - z)
        errors.append(((q * s - w[None]).abs() ** err_norm).sum(dim=(1, 2)))
    frac = torch.argmin(torch.cat(errors)).to(torch.float32) / P_GRID
    scale_max = (smax * (P_MAX * frac + P_MIN * (1 - frac))).to(torch.float16)
    qs = qs.to(torch.int64)
    return qs, scale_max, decoded_scales(qs, scale_max)


def plain_factor(h: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    h = h.clone()
    damp = torch.clamp(percdamp * torch.diagonal(h).mean(), min=1e-5)
    for _ in range(10):
        h.diagonal().add_(damp)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            if not torch.isnan(inv).any():
                u, info = torch.linalg.cholesky_ex(inv, upper=True)
                if info == 0:
                    return u
    raise ValueError("not invertible")


def plain_quantize(weight, qparams, hessian=None, bias=None):
    out_features, in_features = weight.shape
    w = weight.to(torch.float32).T.contiguous()
    if hessian is None:
        perm, u = torch.arange(in_features), None
    else:
        h = hessian.to(torch.float32)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        u = plain_factor(h[perm][:, perm])
    w = w[perm]
    plan = qparams.plan(in_features)
    codes = torch.empty(w.shape, dtype=torch.int64)
    scale_codes, scale_maxes = [], []
    for bits, a, n in plan.groups:
        b = a + n
        qs, scale_max, scale = plain_find_scales(w[a:b], bits)
        scale_codes.append(qs)
        scale_maxes.append(scale_max)
        if u is None:
            codes[a:b], _ = encode_rows(w[a:b], scale, bits)
            continue
        codes[a:b], err = gptq_group(w[a:b], u[a:b, a:b], scale, bits)
        w[b:] -= u[a:b, b:].T @ err
    return pack(codes, plan.groups, torch.stack(scale_codes), torch.stack(scale_maxes),
                torch.argsort(perm).to(torch.int32), out_features, bias)


def same_bytes(a, b) -> bool:
    ta, tb = a.to_tensors("x"), b.to_tensors("x")
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def hessian(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g) * torch.rand(k, generator=g)  # features of unequal scale
    return x.T @ x / x.shape[0]


# -- bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(128, 96), (256, 77), (384, 200), (128, 1100)])  # 77, 200, 1100: not multiples of 32; 1100: packed in two slices of columns
@pytest.mark.parametrize("qp", QPARAMS, ids=lambda q: q.desc())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lean_encoder_writes_the_bytes_of_the_straightforward_one(k, n, qp, dtype):
    g = torch.Generator().manual_seed(k + n)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    bias = torch.randn(n, generator=g)
    for h in (hessian(k, n), None):
        assert same_bytes(encode.quantize(weight, qp, h, bias), plain_quantize(weight, qp, h, bias))


def test_in_place_factor_is_the_out_of_place_one_also_after_extra_damping():
    k = 64
    h = torch.eye(k)
    h[0, 0] = -1.0  # not positive definite: needs several rounds of damping (0.116 each)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    ours = encode._inverse_hessian_factor(h, PERCDAMP, perm)
    assert torch.equal(ours, plain_factor(h[perm][:, perm])) and ours.stride() == plain_factor(h).stride()
    h2 = hessian(200, 1)
    before = h2.clone()
    assert torch.equal(encode._inverse_hessian_factor(h2), plain_factor(h2))
    assert torch.equal(h2, before)  # the Hessian given is not changed


def test_in_place_scale_search_is_the_straightforward_one():
    g = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 5, 6, 8):
        for rows, n in ((32, 77), (128, 512)):
            w = torch.randn(rows, n, generator=g) * torch.rand(n, generator=g)
            found = encode.find_scales(w, bits)
            qs, scale_max, scale = plain_find_scales(w, bits)
            assert torch.equal(found.codes, qs) and torch.equal(found.scale_max, scale_max)
            assert torch.equal(found.scale, scale)


def test_nan_in_the_weight_is_refused_before_a_hessian_of_the_wrong_shape():
    w = torch.zeros(32, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode.quantize(w, QPARAMS[0], torch.eye(32))
    with pytest.raises(ValueError, match="NaN or Inf"):  # float64 beyond float32's range
        encode.quantize(torch.full((32, 64), 1e300, dtype=torch.float64), QPARAMS[0])


# -- memory -------------------------------------------------------------------------------------

_SETUP = """
    from exl2 import QParams
    from exl2.model.options import head_option
    from exl2.reference import quantize
    k, n = int(sys.argv[1]), int(sys.argv[2])
    weight = torch.randn(n, k) * 0.02
    h = torch.randn(k, k)
    h = h @ h.T
    h.diagonal().add_(k)
"""


@pytest.mark.skipif(not peak_memory.SUPPORTED, reason="reads /proc (clear_refs, VmHWM) and uses glibc's mallopt")
@pytest.mark.parametrize("k, n, option", [(2048, 4096, "block"), (512, 16384, "head")])  # head: wide, groups of 128
def test_encode_bytes_bounds_the_memory_one_encode_takes(k, n, option):
    growth = peak_memory.growth(_SETUP, """
        quantize(weight, QParams(32, [4], [1.0]) if sys.argv[3] == "block" else head_option(6), h)
        KEPT = 0
    """, k, n, option)  # the peak resident set during the encode, above the set before it
    bound = encode_bytes(k, n)
    # The formula counts the large buffers; 24 MB covers the scale search's chunk (16 MB) and
    # the allocator's slack. It should not be loose either: the buffers it counts are all used.
    assert growth <= bound + (24 << 20), (growth, bound)
    assert growth >= 0.6 * bound, (growth, bound)
