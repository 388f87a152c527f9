"""Encoding (spec 7): round-to-nearest within half a step, codes given the scales, the scale
search's choice, GPTQ against round-to-nearest, the group plan, padding and bit accounting."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from exl2 import QParams
from exl2.format import zero_point
from exl2.reference import column_scales, dequantize, dequantize_stored, find_scales, quantize, unpack_codes
from exl2.reference.bounds import SCALE_SEARCH_REL, hessian_weighted_error

MIXED = QParams({8: 32, 6: 32, 5: 32, 4: 32, 3: 32, 2: 16}, [8, 6, 5, 4, 3, 2], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2])


def act_order_rows(qm):
    """Per stored row: its group's index and width."""
    index, bits = [], []
    for g in qm.groups:
        index += [g.index] * g.rows
        bits += [g.bits] * g.rows
    return torch.tensor(index), torch.tensor(bits)


@given(k=st.sampled_from([64, 96, 160]), n=st.integers(1, 50), seed=st.integers(0, 2**31),
       qp=st.sampled_from([MIXED, QParams(32, [4], [1.0]), QParams(64, [6, 3], [0.5, 0.5]), QParams(16, [2], [1.0])]))
def test_round_to_nearest_within_half_a_step(k, n, seed, qp):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qm = quantize(w, qp)
    scales = column_scales(qm).to(torch.float64)[:, :n]
    gidx, bits = act_order_rows(qm)
    step = scales[gidx]  # [K, n], identity order without a Hessian
    err = (dequantize(qm)[:, :n].to(torch.float64) - w.T.to(torch.float64)).abs()
    # elements inside the code range are within half a step (plus float16 rounding of the value)
    zp = torch.tensor([zero_point(int(b)) for b in bits], dtype=torch.float64)[:, None]
    top = (2 * zp - 1 - zp) * step  # largest decodable value
    bottom = -zp * step
    inside = (w.T >= bottom) & (w.T <= top)
    slack = 2.0**-11 * w.T.abs().to(torch.float64) + 2.0**-24
    assert (err[inside] <= 0.5 * step[inside] + slack[inside]).all()
    # elements beyond it decode to the nearest end of the range
    outside = ~inside
    nearest_end = torch.where(w.T > top, top, bottom)
    assert (dequantize(qm)[:, :n].to(torch.float64)[outside] - nearest_end[outside]).abs().le(
        2.0**-11 * nearest_end[outside].abs() + 2.0**-24).all()


def test_codes_given_scales_match_float32_rint():
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(5))
    qm = quantize(w, QParams(64, [5, 3], [0.5, 0.5]))
    scales = column_scales(qm).to(torch.float32)[:, :40]
    for g in qm.groups:
        got = unpack_codes(qm.q_weight[g.qrow:g.qrow + g.qrows], g.bits)[:, :40]
        x = w.T[g.row:g.row + g.rows].to(torch.float32) / scales[g.index]  # IEEE float32 division
        z = zero_point(g.bits)
        expected = [[min(max(round(float(v)) + z, 0), 2 * z - 1) for v in row] for row in x]  # half to even
        assert got.tolist() == expected


def grid_errors(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The 97 grid errors, recomputed in float64 from the definition (spec 7.2)."""
    w = w.to(torch.float64)
    maxq, z = 2**bits - 1, 2 ** (bits - 1)
    base = (w.abs().amax(0) + 1e-12) / (maxq / 2)
    smax = base.max()
    qs = torch.clamp(torch.round(torch.sqrt(base / smax) * 16), 1, 16)
    out = []
    for i in range(97):
        s = (qs / 16) ** 2 * smax * (0.70 + 0.50 * i / 96)
        out.append(((torch.clamp(torch.round(w / s), -z, maxq - z) * s - w).abs() ** 3.5).sum())
    return torch.stack(out), smax


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_scale_search_picks_the_grid_minimum(bits):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(bits)) * 0.05
    found = find_scales(w, bits)
    errors, smax = grid_errors(w, bits)
    chosen_p = float(found.scale_max) / float(smax)
    i = round((chosen_p - 0.70) / 0.50 * 96)
    assert abs(chosen_p - (0.70 + 0.50 * i / 96)) < 2e-3  # float16 storage of smax * p
    assert errors[i] <= errors.min() * (1 + SCALE_SEARCH_REL) + 1e-30


def correlated_inputs(k: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, k // 4, generator=g)
    return z @ torch.randn(k // 4, k, generator=g) + 0.05 * torch.randn(rows, k, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(seed):
    k, n = 128, 48
    x = correlated_inputs(k, 512, seed)
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(100 + seed))
    qp = QParams(32, [4, 3], [0.5, 0.5])
    rtn = quantize(w, qp)
    gptq = quantize(w, qp, h)
    e_rtn = hessian_weighted_error(w.T, dequantize(rtn)[:, :n], h)
    e_gptq = hessian_weighted_error(w.T, dequantize(gptq)[:, :n], h)
    assert e_gptq < 0.8 * e_rtn


def test_act_order_follows_the_hessian_diagonal():
    k = 64
    x = correlated_inputs(k, 256, 3) * torch.linspace(0.1, 3, k)
    h = x.T @ x / 256
    qm = quantize(torch.randn(32, k), QParams(32, [4], [1.0]), h)
    assert torch.equal(qm.q_perm.long(), torch.argsort(torch.diagonal(h), descending=True, stable=True))


@given(k=st.integers(1, 12).map(lambda i: 32 * i), seed=st.integers(0, 1000))
def test_mixed_widths_follow_the_plan(k, seed):
    qm = quantize(torch.randn(33, k, generator=torch.Generator().manual_seed(seed)), MIXED)
    plan = MIXED.plan(k).groups
    assert [(g.bits, g.row, g.rows) for g in qm.groups] == list(plan)
    widths = [g.bits for g in qm.groups]
    assert widths == sorted(widths, reverse=True)


def test_padded_columns_decode_to_zero_and_nibble_f():
    qm = quantize(torch.randn(45, 64), QParams(32, [4, 2], [0.5, 0.5]))
    assert qm.out_features == 45 and qm.out_features_padded == 64
    assert (dequantize_stored(qm)[:, 45:] == 0).all()
    nibbles = (qm.q_scale.to(torch.int64) & 0xFFFFFFFF)
    # columns 45..47 are the top three nibbles of word 5, columns 48..63 whole words 6 and 7
    assert ((nibbles[:, 5] >> 20) == 0xFFF).all() and (nibbles[:, 6:] == 0xFFFFFFFF).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(64, 96), (100, 256), (31, 160)])
def test_total_bits_equal_stored_bits(shape, bias):
    n, k = shape
    qp = QParams({5: 32, 4: 64, 2: 16}, [5, 4, 2], [0.3, 0.3, 0.4])
    qm = quantize(torch.randn(n, k), qp, bias=torch.randn(n) if bias else None)
    assert qp.total_bits(k, n, bias) == qm.storage_bits()
    assert qm.bits_per_weight == pytest.approx(qp.bpw(k, n, bias))


def test_qparams_rejects_bad_plans():
    for args in [(32, [3, 4], [0.5, 0.5]), (32, [4], [0.9]), (24, [4], [1.0]), (32, [7], [1.0]), (8, [2], [1.0])]:
        with pytest.raises(ValueError):
            QParams(*args)
