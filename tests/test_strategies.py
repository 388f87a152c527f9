"""The public hypothesis strategies generate what they promise (exl2.conformance.strategies)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from exl2.conformance.rules import check_layer, check_qmatrix
from exl2.conformance.strategies import (MUTATIONS, OUTLIER_SCALE, TINY_SCALE, LayerSpec, Stream, broken,
                                         broken_layers, layer_specs, layer_tensors, matmul_inputs, qmatrices)
from exl2.format import WIDTHS, zero_point
from exl2.reference import column_scales, dequantize
from exl2.reference.bounds import matmul_within_bound
from exl2.reference.packing import unpack_codes


def codes(findings, keep: str | None = None) -> set[str]:
    """Codes of the errors, plus ``keep`` whatever its severity."""
    return {f.code for f in findings if f.severity == "error" or f.code == keep}


def splitmix64(seed: int, i: int) -> int:
    """Word ``i`` (from 0) of splitmix64 seeded with ``seed``, in plain Python integers, as the
    algorithm is published (Steele, Lea, Flood 2014; Vigna's splitmix64.c)."""
    m = 2**64
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) % m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
    return z ^ (z >> 31)


def test_stream_is_splitmix64():
    s = Stream(12345)
    first = s.words(5).tolist()
    assert first == [splitmix64(12345, i) for i in range(5)]
    assert s.words(2).tolist() == [splitmix64(12345, i) for i in (5, 6)]  # the counter carries on
    assert sorted(Stream(3).permutation(100).tolist()) == list(range(100))
    v = Stream(4).integers(-3, 5, (50, 7))
    assert v.shape == (50, 7) and v.min() >= -3 and v.max() < 5


@given(qmatrices())
def test_generated_layers_are_valid(qm):
    findings = check_qmatrix(qm)
    assert not [f for f in findings if f.severity != "info"], findings
    widths = [g.bits for g in qm.groups]
    assert widths == sorted(widths, reverse=True)


@given(layer_specs(widths=(6, 2), max_in_features=100, max_out_features=40, q_perm=None))
def test_layer_specs_respect_their_limits(spec):
    assert {b for b, _ in spec.groups} <= {6, 2}
    assert spec.in_features <= 100 and 1 <= spec.out_features <= 40
    rows = [r for _, r in spec.groups]
    assert all(r <= rows[0] for r in rows)  # one group size; only the last may be shorter
    t = spec.tensors("x")
    assert not codes(check_layer(t, "x"))
    assert ("x.q_perm" in t) == spec.q_perm
    assert ("x.bias" in t) == spec.bias


@given(layer_specs())
def test_subnormal_flag_controls_the_group_maxima(spec):
    m = spec.build().q_scale_max.float() / 256
    assert bool((m < 2.0**-14).all()) if spec.subnormal else bool((m >= 2.0**-14).all())


def test_every_feature_is_reachable():
    """hypothesis finds a layer with each feature the strategies promise."""
    fast = settings(max_examples=2000, database=None)
    find(layer_specs(), lambda s: len(s.groups) > 1 and s.groups[-1][1] < s.groups[0][1], settings=fast)
    find(layer_specs(), lambda s: (2, 16) in s.groups, settings=fast)
    find(layer_specs(), lambda s: s.out_features % 32 != 0 and s.bias, settings=fast)
    find(layer_specs(), lambda s: len({b for b, _ in s.groups}) >= 3, settings=fast)
    for bits in WIDTHS:
        find(layer_specs(), lambda s, b=bits: any(g == b for g, _ in s.groups), settings=fast)


@given(layer_tensors(prefix="model.layers.0.mlp.up_proj", q_perm=True))
def test_layer_tensors_carry_a_valid_q_perm(t):
    perm, inv = t["model.layers.0.mlp.up_proj.q_perm"].long(), t["model.layers.0.mlp.up_proj.q_invperm"].long()
    assert torch.equal(perm[inv], torch.arange(inv.numel()))
    assert not codes(check_layer(t, "model.layers.0.mlp.up_proj"))


@given(data=st.data(), qm=qmatrices(max_in_features=128), outliers=st.booleans())
def test_matmul_inputs_fit_the_layer(data, qm, outliers):
    x = data.draw(matmul_inputs(qm, max_m=64, dtype=torch.bfloat16, outliers=outliers))
    assert x.dtype == torch.bfloat16 and x.shape[1] == qm.in_features and 1 <= x.shape[0] <= 64
    assert float(x.abs().max()) <= (OUTLIER_SCALE if outliers else 1)
    # every value is k / 128 times 1, OUTLIER_SCALE or TINY_SCALE: exact in bfloat16 and float16
    assert torch.equal(x.half().to(torch.bfloat16), x)


def test_outliers_and_zero_heavy_layers_change_only_what_they_say():
    spec = LayerSpec(groups=((4, 64), (2, 32)), out_features=70, seed=5, bias=True)
    plain, heavy = spec.build(), replace(spec, zero_heavy=True).build()
    for name in ("q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"):
        assert torch.equal(getattr(plain, name), getattr(heavy, name)), name
    b_plain, b_heavy = dequantize(plain), dequantize(heavy)
    kept = b_heavy != 0
    assert torch.equal(b_heavy[kept], b_plain[kept])  # a weight is kept as it was, or is 0
    zeroed = 1 - kept[:, :70].double().mean(0)  # per column: 1 - 2^-d, d in 1..8
    assert 0.75 < float(zeroed.mean()) < 0.95 and float(zeroed.min()) < 0.7 and float(zeroed.max()) > 0.98
    x = find(matmul_inputs(plain, outliers=True, dtype=torch.float32), lambda x: x.shape[0] >= 8,
             settings=settings(database=None))
    ratio = x.abs() / find(matmul_inputs(plain, outliers=False, dtype=torch.float32), lambda y: y.shape == x.shape,
                           settings=settings(database=None)).abs()
    assert {OUTLIER_SCALE, TINY_SCALE} <= set(ratio[ratio.isfinite()].unique().tolist()) <= {1.0, OUTLIER_SCALE,
                                                                                              TINY_SCALE}


def cancelling_matmul(x: torch.Tensor, qm) -> torch.Tensor:
    """``x @ B`` computed as ``s (sum x q - z sum x)`` per group in float32: the formula of the
    fast GEMV before issue 11's fix, whose error grows with ``z sum |x|``."""
    xs = x.float()[:, qm.q_perm.long()]
    scales = column_scales(qm).float()
    y = torch.zeros(x.shape[0], qm.out_features_padded)
    for g in qm.groups:
        codes = unpack_codes(qm.q_weight[g.qrow:g.qrow + g.qrows], g.bits)[:g.rows].float()
        part = xs[:, g.row:g.row + g.rows]
        y += (part @ codes - zero_point(g.bits) * part.sum(1, keepdim=True)) * scales[g.index]
    return y[:, :qm.out_features]


@st.composite
def stressed_products(draw):
    qm = draw(qmatrices(max_in_features=256, zero_heavy=True))
    return qm, draw(matmul_inputs(qm, max_m=4, dtype=torch.float32, outliers=True))


def test_zero_heavy_layers_with_outliers_expose_a_cancelling_matmul():
    """The stress options exist to catch this class of error: hypothesis finds a layer and x
    where the cancelling formula leaves spec 8.2.1's bound (the exact product in float64)."""
    def leaves_the_bound(case) -> bool:
        qm, x = case
        b = dequantize(qm)
        return not matmul_within_bound(cancelling_matmul(x, qm), x.double() @ b[:, :qm.out_features].double(), x, b)

    find(stressed_products(), leaves_the_bound, settings=settings(max_examples=200, database=None))


@given(broken_layers())
def test_broken_layers_break_exactly_their_rule(case):
    tensors, code = case
    assert codes(check_layer(tensors, "layer"), keep=code) == {code}


@settings(max_examples=100)
@given(mutation=st.sampled_from(MUTATIONS), spec=layer_specs(max_in_features=256, max_groups=4))
def test_every_mutation_breaks_its_rule_on_any_layer(mutation, spec):
    reported = codes(check_layer(broken(spec, mutation), "layer"), keep=mutation.code)
    if mutation.exclusive:
        assert reported == {mutation.code}
    else:  # a partial block (4.3) is never a multiple of 32 rows (4.4)
        assert reported == {"EXL2-G004", "EXL2-G005"}


def test_mutations_cover_every_layer_rule():
    from exl2.conformance.findings import CATALOGUE

    # S002: an info about a legal file; S003, S004: padded columns, known only with out_features
    layer_codes = {c for c in CATALOGUE if c[5] in "TGPS"} - {"EXL2-S002", "EXL2-S003", "EXL2-S004"}
    assert {m.code for m in MUTATIONS} == layer_codes


def test_bad_arguments_are_refused_at_once():
    with pytest.raises(ValueError):
        layer_specs(widths=(7,))
    with pytest.raises(ValueError):
        layer_specs(widths=(4,), max_in_features=20)
    with pytest.raises(ValueError):
        qmatrices(max_in_features=70000)


def test_layer_spec_builds_what_it_describes():
    qm = LayerSpec(groups=((8, 32), (3, 64), (2, 16)), out_features=50, seed=9, bias=True, act_order=False).build()
    assert [(g.bits, g.rows) for g in qm.groups] == [(8, 32), (3, 64), (2, 16)]
    assert (qm.in_features, qm.out_features, qm.out_features_padded) == (112, 50, 64)
    assert torch.equal(qm.q_invperm, torch.arange(112, dtype=torch.int32))
