"""Encoding (spec 7): round-to-nearest within half a step, codes given the scales, the scale
search's choice, GPTQ against round-to-nearest, the group plan, padding, bit accounting and the
act-order permutation.

Expectations are recomputed here with numpy (float32 where the spec says float32, float64 for
errors) and with the exllamav2 emulation's decoder helpers, not with the functions under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from exl2 import QMatrix, QParams
from exl2.reference import dequantize, encode_rows, find_scales, quantize
from exl2.reference.bounds import SCALE_SEARCH_REL, hessian_weighted_error

from . import exllamav2_emulation as ex

QPARAMS = [
    QParams(32, [4], [1.0]),
    QParams(16, [2], [1.0]),
    QParams(64, [6, 3], [0.5, 0.5]),
    QParams({8: 32, 5: 64, 2: 32}, [8, 5, 2], [0.25, 0.5, 0.25]),
    QParams({6: 32, 5: 32, 4: 32, 3: 32}, [6, 5, 4, 3], [0.1, 0.2, 0.3, 0.4]),
]


# -- independent readers of a QMatrix -------------------------------------------------------------


def file_groups(qm: QMatrix) -> list[tuple[int, int, int, int]]:
    """(bits, first row, rows, first qrow) per group, read straight from q_groups (spec 4.3)."""
    pairs = qm.q_groups.numpy().astype(np.int64).reshape(-1, 2).tolist()
    ends = [q for _, q in pairs[1:]] + [qm.q_weight.shape[0]]
    out, row = [], 0
    for (bits, qrow), end in zip(pairs, ends):
        rows = (end - qrow) * 32 // bits
        out.append((bits, row, rows, qrow))
        row += rows
    return out


def file_scales(qm: QMatrix) -> np.ndarray:
    """float64 [G, N]: the decoded column scales, through the emulation of exllamav2 (float16
    ``q_scale_max / 256``, ``dq_scale``, ``MatrixView_q4_row::item``)."""
    m = ex.make_q_matrix(ex.load_weight({name: t.numpy() for name, t in qm.to_tensors("k").items()}, "k"))
    g, n = m.q_scale.shape[0], m.width
    return np.array([[float(ex.dq_scale(ex.q4_row_item(m.q_scale, n, i, j), m.q_scale_max[i])) for j in range(n)]
                     for i in range(g)])


def file_codes(qm: QMatrix) -> np.ndarray:
    """int64 [K, N] codes in stored (act-order) row order, read from the bit strings of q_weight."""
    words = qm.q_weight.numpy().view(np.uint32).astype(object)
    out = np.zeros((qm.in_features, qm.out_features_padded), dtype=np.int64)
    for bits, row, rows, qrow in file_groups(qm):
        qrows = rows * bits // 32
        for n in range(words.shape[1]):
            string = sum(int(words[qrow + w, n]) << (32 * w) for w in range(qrows))
            for i in range(rows):
                out[row + i, n] = (string >> (bits * i)) & ((1 << bits) - 1)
    return out


def stored_row_scales(qm: QMatrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per stored row: its column scales [K, n] and its width [K]."""
    scales = file_scales(qm)
    per_row, widths = [], []
    for i, (bits, _, rows, _) in enumerate(file_groups(qm)):
        per_row.append(np.repeat(scales[i:i + 1, :n], rows, axis=0))
        widths += [bits] * rows
    return np.concatenate(per_row), np.array(widths)


def stored_order(qm: QMatrix) -> np.ndarray:
    """q_perm: stored row k holds input feature q_perm[k]."""
    return np.argsort(qm.q_invperm.numpy())


# -- round to nearest -----------------------------------------------------------------------------


@given(qp=st.sampled_from(QPARAMS), blocks=st.integers(1, 3), n=st.integers(1, 70), seed=st.integers(0, 2**32 - 1),
       spread=st.sampled_from([1e-3, 1.0, 300.0]))
def test_round_to_nearest_within_half_a_step(qp, blocks, n, seed, spread):
    k = 64 * blocks
    rng = np.random.default_rng(seed)
    # heavy-tailed columns of different magnitudes, so that scale codes and clamping both vary
    w = (rng.standard_t(3, (n, k)) * spread * rng.uniform(0.1, 1, (n, 1))).astype(np.float32)
    qm = quantize(torch.from_numpy(w), qp)
    assert np.array_equal(stored_order(qm), np.arange(k))  # no Hessian: rows keep their order
    b = dequantize(qm).numpy().astype(np.float64)[:, :n]
    target = w.T.astype(np.float64)
    step, widths = stored_row_scales(qm, n)
    z = (1 << (widths - 1))[:, None].astype(np.float64)
    codes = file_codes(qm)[:, :n]
    clamped_low = (codes == 0) & (target < -z * step)
    clamped_high = (codes == 2 * z - 1) & (target > (z - 1) * step)
    free = ~(clamped_low | clamped_high)
    # half a step, plus the float16 rounding of the decoded value, plus float32 rounding of w / s
    slack = 2.0**-11 * np.abs(b) + 2.0**-20 * step
    err = np.abs(b - target)
    assert (err[free] <= 0.5 * step[free] + slack[free]).all()
    # clamped elements decode to the end of the range and lie beyond it
    end = np.where(clamped_high, (z - 1) * step, -z * step)
    clamped = ~free
    assert (np.abs(b[clamped] - end[clamped]) <= 2.0**-11 * np.abs(end[clamped]) + 2.0**-24).all()
    assert (np.abs(target[clamped]) >= np.abs(end[clamped]) * (1 - 2.0**-10)).all()


@given(bits=st.sampled_from([8, 6, 5, 4, 3, 2]), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       ties=st.booleans())
def test_codes_given_scales_are_float32_rint(bits, n, seed, ties):
    rng = np.random.default_rng(seed)
    scale = np.ldexp(1.0, rng.integers(-12, 2, n)).astype(np.float16).astype(np.float32)  # powers of 2
    if not ties:
        scale = (scale * rng.uniform(1, 2, n)).astype(np.float16).astype(np.float32)
    z, maxq = 1 << (bits - 1), (1 << bits) - 1
    # values at exact half steps (ties, rounded to even), beyond the range, and random
    halves = (rng.integers(-z - 3, z + 3, (16, n)) + 0.5).astype(np.float32) * scale
    w = np.concatenate([halves, rng.normal(0, z, (16, n)).astype(np.float32) * scale])
    codes, values = encode_rows(torch.from_numpy(w), torch.from_numpy(scale), bits)
    expected = np.clip(np.rint(w / scale) + z, 0, maxq)  # numpy float32 division, half to even
    assert np.array_equal(codes.numpy(), expected.astype(np.int64))
    expected_values = ((expected - z).astype(np.float16) * scale.astype(np.float16)).astype(np.float16)
    assert np.array_equal(values.numpy().astype(np.float16).view(np.int16), expected_values.view(np.int16))


def test_quantized_codes_are_rint_of_decoded_scales():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(40, 128)).astype(np.float32)
    qm = quantize(torch.from_numpy(w), QParams(64, [5, 3], [0.5, 0.5]))
    step, widths = stored_row_scales(qm, 40)
    z = (1 << (widths - 1))[:, None]
    expected = np.clip(np.rint(w.T / step.astype(np.float32)) + z, 0, 2 * z - 1)
    assert np.array_equal(file_codes(qm)[:, :40], expected)


# -- the scale search ----------------------------------------------------------------------------


def grid_errors64(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Spec 7.2 recomputed in float64: per-column qs, the group's smax and the 97 grid errors."""
    w = w.astype(np.float64)
    maxq, z = (1 << bits) - 1, 1 << (bits - 1)
    base = (np.abs(w).max(axis=0) + 1e-12) / (maxq / 2)
    smax = base.max()
    qs = np.clip(np.round(np.sqrt(base / smax) * 16), 1, 16)
    errors = []
    for i in range(97):
        s = (qs / 16) ** 2 * smax * (0.70 * (1 - i / 96) + 1.20 * (i / 96))
        errors.append((np.abs(np.clip(np.rint(w / s), -z, maxq - z) * s - w) ** 3.5).sum())
    return qs, np.array(errors), smax


@given(bits=st.sampled_from([8, 6, 5, 4, 3, 2]), rows=st.sampled_from([16, 32, 64]), n=st.integers(1, 48),
       seed=st.integers(0, 2**32 - 1))
def test_scale_search_picks_a_grid_minimum(bits, rows, n, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (rows, n)) * 0.05 * rng.uniform(0.2, 1, n)).astype(np.float32)
    found = find_scales(torch.from_numpy(w), bits)
    qs, errors, smax = grid_errors64(w, bits)
    assert np.array_equal(found.codes.numpy(), qs.astype(np.int64))
    # which multiplier was chosen: the grid points whose float16 smax * p is the stored maximum
    stored = float(found.scale_max)
    candidates = [i for i in range(97) if float(np.float16(smax * (0.70 * (1 - i / 96) + 1.20 * (i / 96)))) == stored]
    assert candidates, "q_scale_max is not smax times a grid multiplier"
    assert min(errors[candidates]) <= errors.min() * (1 + SCALE_SEARCH_REL)
    # and the scales used for encoding are the decoder's scales for those codes
    group_max = np.float16(np.float16(stored) * np.float16(1 / 256))
    decoded = [float(ex.dq_scale(int(q) - 1, group_max)) for q in qs]
    assert np.array_equal(found.scale.numpy().astype(np.float64), np.array(decoded))


# -- GPTQ ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qp", [QParams(32, [4], [1.0]), QParams({5: 32, 3: 32}, [5, 3], [0.5, 0.5])])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(qp):
    g = torch.Generator().manual_seed(0)
    k, n = 128, 48
    z = torch.randn(512, 16, generator=g, dtype=torch.float64)
    m = torch.randn(16, k, generator=g, dtype=torch.float64)
    x = z @ m + 0.05 * torch.randn(512, k, generator=g, dtype=torch.float64)  # 16 directions dominate
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=g)
    rtn = dequantize(quantize(w, qp))[:, :n]
    gptq = dequantize(quantize(w, qp, hessian=h.to(torch.float32)))[:, :n]
    e_rtn = hessian_weighted_error(w.T, rtn, h)
    e_gptq = hessian_weighted_error(w.T, gptq, h)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def test_act_order_is_argsort_of_the_hessian_diagonal():
    g = torch.Generator().manual_seed(1)
    k = 96
    x = torch.randn(300, k, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, k, dtype=torch.float64)
    x = x[:, torch.randperm(k, generator=g)]  # distinct column magnitudes in random order
    h = (x.T @ x / 300).to(torch.float32)
    diag = np.diag(h.numpy())
    assert len(set(diag.tolist())) == k  # no ties
    qm = quantize(torch.randn(32, k, generator=g), QParams(32, [4], [1.0]), hessian=h)
    assert np.array_equal(stored_order(qm), np.argsort(-diag, kind="stable"))
    assert np.array_equal(qm.q_invperm.numpy(), np.argsort(np.argsort(-diag, kind="stable")))


# -- plan, padding, accounting ---------------------------------------------------------------------


def plan_by_hand(k: int, bits: list[int], props: list[float], group_size: dict[int, int]):
    """exllamav2's AdaptiveGPTQ.configure: per width ceil(min(k * p, remaining) / group_size) groups,
    cut in order as [a, min(a + group_size, k))."""
    remaining, out, a = k, [], 0
    for b, p in zip(bits, props):
        count = math.ceil(min(k * p, remaining) / group_size[b])
        remaining -= count * group_size[b]
        for _ in range(count):
            if a < k:
                out.append((b, a, min(group_size[b], k - a)))
                a += min(group_size[b], k - a)
    return out


@pytest.mark.parametrize("k, bits, props, gs", [
    (256, [5, 3], [0.25, 0.75], {5: 32, 3: 32}),
    (192, [8, 4, 2], [0.1, 0.4, 0.5], {8: 32, 4: 64, 2: 16}),
    (160, [6, 5, 4], [0.3, 0.3, 0.4], {6: 64, 5: 32, 4: 64}),  # last group cut short
])
def test_mixed_widths_follow_the_plan(k, bits, props, gs):
    qp = QParams(gs, bits, props)
    expected = plan_by_hand(k, bits, props, gs)
    assert list(qp.plan(k).groups) == expected
    qm = quantize(torch.randn(40, k, generator=torch.Generator().manual_seed(k)), qp)
    assert [(b, a, n) for b, a, n, _ in file_groups(qm)] == expected
    assert qm.q_scale.shape == (len(expected), 8) and qm.q_scale_max.shape == (len(expected),)


def test_worked_plan():
    # k = 256, 25% at 5 bits and 75% at 3 bits, groups of 32: ceil(64 / 32) = 2 groups of 5 bits,
    # ceil(min(192, 192) / 32) = 6 of 3 bits
    assert plan_by_hand(256, [5, 3], [0.25, 0.75], {5: 32, 3: 32}) == \
        [(5, 0, 32), (5, 32, 32)] + [(3, 32 * i, 32) for i in range(2, 8)]


@pytest.mark.parametrize("n", [1, 31, 33, 40, 95])
def test_padded_columns_decode_to_exact_zero(n):
    qm = quantize(torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) * 5, QParams(32, [5, 3], [0.5, 0.5]))
    cols = -(-n // 32) * 32
    assert qm.out_features == n and qm.out_features_padded == cols
    b = dequantize(qm).numpy()
    assert (b[:, n:].view(np.uint16) == 0).all()  # +0, not -0
    codes = file_codes(qm)
    widths = np.repeat([b for b, _, rows, _ in file_groups(qm)], [rows for _, _, rows, _ in file_groups(qm)])
    assert (codes[:, n:] == (1 << (widths - 1))[:, None]).all()  # the zero point
    nibbles = [(int(w) >> (4 * (j % 8))) & 0xF for w_row in qm.q_scale.numpy().view(np.uint32)
               for j, w in ((j, w_row[j // 8]) for j in range(n, cols))]
    assert all(v == 0xF for v in nibbles)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k, n, qp", [(64, 40, QPARAMS[0]), (128, 33, QPARAMS[3]), (160, 64, QPARAMS[4])])
def test_total_bits_equal_storage_bits(k, n, qp, with_bias):
    g = torch.Generator().manual_seed(k + n)
    qm = quantize(torch.randn(n, k, generator=g), qp, bias=torch.randn(n, generator=g) if with_bias else None)
    assert qp.total_bits(k, n, bias=with_bias) == qm.storage_bits()
    # and both equal the bytes of the tensors as the file holds them
    nbytes = sum(t.numel() * t.element_size() for t in qm.to_tensors().values())
    assert qm.storage_bits() == 8 * nbytes


# -- a group of zeros ------------------------------------------------------------------------------


def test_zero_scale_gives_the_top_code_like_cuda_clamp():
    # exllamav2 (quantize.cu): x = rintf(w / s) + z; clamp(x, 0, maxq) = fmaxf(0, fminf(maxq, x)).
    # Under a zero scale, 0 / 0 is NaN, fminf(maxq, NaN) = maxq: the code is maxq, its value +0.
    for bits in (8, 6, 5, 4, 3, 2):
        codes, values = encode_rows(torch.zeros(3, 5), torch.zeros(5), bits)
        assert (codes == (1 << bits) - 1).all()
        assert (values.numpy().astype(np.float16).view(np.uint16) == 0).all()


@pytest.mark.parametrize("gptq", [False, True])
def test_all_zero_group(gptq):
    # input features 0..31 of every output are zero: their group's maximum underflows to 0 in
    # float16 (exllamav2 writes 0 there too), its codes are maxq, and nothing else is disturbed.
    # With a Hessian whose diagonal puts those features first in act-order, a NaN from that group
    # would otherwise reach every later row through GPTQ's error feedback.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g)
    w[:, :32] = 0
    x = torch.randn(300, 64, generator=g)
    x[:, :32] *= 10
    h = x.T @ x / 300 if gptq else None
    qm = quantize(w, QParams(32, [4], [1.0]), hessian=h)
    assert np.array_equal(stored_order(qm)[:32] < 32, np.ones(32, dtype=bool))  # the zero features come first
    assert float(qm.q_scale_max[0]) == 0 and float(qm.q_scale_max[1]) > 0
    assert (file_codes(qm)[:32, :40] == 15).all()
    b = dequantize(qm).numpy()
    assert np.isfinite(b).all()
    assert (b[:32].view(np.uint16) == 0).all()
    step = file_scales(qm)[1, :40].max()
    assert np.abs(b[32:, :40] - w.T[32:].numpy()).max() <= 4 * step  # the other group is quantized normally


def test_validator_accepts_what_the_converter_writes_for_a_zero_group(tmp_path):
    from exl2.conformance.validate import validate_path
    from exl2.io import save_qmatrix

    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    w[:, :32] = 0
    qm = quantize(w, QParams(32, [4], [1.0]))
    assert float(qm.q_scale_max[0]) == 0
    save_qmatrix(tmp_path / "layer.safetensors", qm, "model.layers.0.mlp.up_proj")
    errors = [f for f in validate_path(tmp_path / "layer.safetensors", deep=True).findings if f.severity == "error"]
    assert errors == []


@pytest.mark.parametrize("args", [(32, [3, 4], [0.5, 0.5]), (32, [4], [0.9]), (24, [4], [1.0]), (32, [7], [1.0]),
                                  (8, [2], [1.0])])
def test_qparams_rejects_bad_plans(args):
    """Widths increasing, proportions not summing to 1, a group size that is not a multiple of
    the width's row granule (32 rows; 16 for 2-bit), a width EXL2 lacks."""
    with pytest.raises(ValueError):
        QParams(*args)
