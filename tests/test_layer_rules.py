"""One rule table (exl2.layer_rules) behind both readers: QMatrix refuses a layer at the first
error with its code, the validator reports every violation; QMatrix is immutable; the rules the
spec's open points settled (sign of zero, the subnormal boundary, -0, the bias length)."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2 import FormatError, QMatrix, QParams
from exl2.conformance.findings import CATALOGUE
from exl2.conformance.rules import check_layer
from exl2.conformance.strategies import MUTATIONS, broken, layer_specs
from exl2.layer_rules import SEVERITY
from exl2.reference import dequantize, pack, quantize


def f16(bits: int) -> float:
    """The float16 value of a 16-bit pattern."""
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def half_tensor(bits: list[int]) -> torch.Tensor:
    """float16 tensor of the given 16-bit patterns."""
    return torch.tensor([b - 0x10000 if b & 0x8000 else b for b in bits], dtype=torch.int16).view(torch.float16)


def as_bits(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFF for v in t.view(torch.int16).flatten().tolist()]


# -- one table, two readers -----------------------------------------------------------------------


def test_every_layer_code_is_in_the_table_with_the_catalogue_severity():
    layer_codes = {c for c in CATALOGUE if c[5] in "TGPS"}
    assert set(SEVERITY) == layer_codes
    assert {c: CATALOGUE[c].severity for c in SEVERITY} == SEVERITY


@settings(max_examples=60)
@given(mutation=st.sampled_from([m for m in MUTATIONS if SEVERITY[m.code] == "error"]),
       spec=layer_specs(max_in_features=256, max_groups=4))
def test_qmatrix_refuses_every_broken_layer_with_its_code(mutation, spec):
    """Each mutation breaks one rule (its code, assigned by hand in MUTATIONS): QMatrix must raise
    exactly that code, naming a tensor of the layer, in one line."""
    tensors = broken(spec, mutation)
    with pytest.raises(FormatError) as e:
        QMatrix.from_tensors(tensors, "layer")
    expected = {mutation.code} if mutation.exclusive else {"EXL2-G004", "EXL2-G005"}
    assert e.value.code in expected
    assert e.value.tensor.startswith("layer.")
    line = e.value.one_line()
    assert e.value.code in line and e.value.tensor in line and "\n" not in line
    # the validator reports the same code for the same tensors
    assert e.value.code in {f.code for f in check_layer(tensors, "layer")}


def test_qmatrix_and_validator_accept_the_same_valid_layer():
    qm = quantize(torch.randn(40, 96, generator=torch.Generator().manual_seed(0)), QParams(32, [5, 3], [0.5, 0.5]),
                  bias=torch.randn(40, generator=torch.Generator().manual_seed(1)))
    assert [f for f in check_layer(qm.to_tensors("L"), "L", out_features=40) if f.severity == "error"] == []
    again = QMatrix.from_tensors(qm.to_tensors("L"), "L", out_features=40)
    assert [(g.bits, g.rows) for g in again.groups] == [(g.bits, g.rows) for g in qm.groups]


# -- immutability --------------------------------------------------------------------------------


def small_layer(**kw) -> QMatrix:
    return pack(torch.full((64, 40), 9), [(4, 0, 64)], torch.full((1, 40), 16), torch.tensor([1.0]),
                torch.arange(64), 40, **kw)


def test_qmatrix_is_frozen_and_replace_checks_again():
    qm = small_layer(bias=torch.ones(40))
    for name, value in [("q_weight", qm.q_weight.clone()), ("bias", None), ("out_features", 33)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(qm, name, value)
    with pytest.raises(FormatError, match="EXL2-S001"):
        dataclasses.replace(qm, q_scale_max=torch.tensor([float("nan")], dtype=torch.float16))
    with pytest.raises(FormatError, match="EXL2-T007"):
        dataclasses.replace(qm, bias=torch.full((64,), float("inf"), dtype=torch.float16))
    with pytest.raises(ValueError, match="does not pad"):
        dataclasses.replace(qm, out_features=20)
    # a changed copy has its own derived values: fewer rows, another group table
    shorter = dataclasses.replace(qm, q_weight=qm.q_weight[:4].clone(), q_invperm=torch.arange(32, dtype=torch.int32))
    assert [g.rows for g in shorter.groups] == [32] and [g.rows for g in qm.groups] == [64]
    moved = qm.to("cpu")
    assert moved is not qm and moved.out_features == 40 and moved.groups == qm.groups


# -- scale maxima: S001 and S002 at their boundaries (spec 6.1) ----------------------------------


@pytest.mark.parametrize("bits, code", [
    (0x7E00, "EXL2-S001"),  # NaN
    (0x7C00, "EXL2-S001"),  # +inf
    (0xFC00, "EXL2-S001"),  # -inf
    (0xBC00, "EXL2-S001"),  # -1
    (0x8001, "EXL2-S001"),  # the smallest negative subnormal
    (0x8000, None),  # -0: equal to zero, not below it
    (0x0000, None),  # 0: what the converter writes for an all-zero group
    (0x0001, None),  # 2^-24 / 256 rounds to +0: the group decodes to zeros, no subnormal maximum
    (0x23FE, "EXL2-S002"),  # 1023 * 2^-24: the largest maximum that decodes to a subnormal
    (0x23FF, None),  # 1023.5 * 2^-24 rounds (to even) up to 2^-14, a normal number
    (0x2400, None),  # 2^-6
])
def test_scale_max_boundaries(bits, code):
    qm_tensors = small_layer().to_tensors("L")
    qm_tensors["L.q_scale_max"] = half_tensor([bits])
    found = {f.code for f in check_layer(qm_tensors, "L")}
    assert found == ({code} if code else set())
    if code == "EXL2-S001":
        with pytest.raises(FormatError, match="EXL2-S001"):
            QMatrix.from_tensors(qm_tensors, "L")
    else:
        QMatrix.from_tensors(qm_tensors, "L")


# -- the sign of zero (spec 6.1, 6.3) --------------------------------------------------------------


def zero_scale_layer(scale_max_bits: int) -> QMatrix:
    """One 4-bit group of 32 rows, 32 columns: row r holds code r % 16 (q - 8 from -8 to 7) in every
    column, every scale nibble 0 (qs = 1), q_scale_max given as a bit pattern."""
    codes = (torch.arange(32) % 16)[:, None].expand(32, 32)
    smax = half_tensor([scale_max_bits])
    return pack(codes, [(4, 0, 32)], torch.ones(1, 32, dtype=torch.int64), smax, torch.arange(32), 32)


@pytest.mark.parametrize("scale_max_bits, group_max_bits", [
    (0x0000, 0x0000),  # 0
    (0x0080, 0x0000),  # 2^-17: / 256 = 2^-25, a tie between 0 and 2^-24, rounds to even: +0
    (0x0081, 0x0001),  # just above: rounds up to 2^-24
    (0x8000, 0x8000),  # -0 stays -0
])
def test_sign_of_zero_when_the_group_maximum_is_zero(scale_max_bits, group_max_bits):
    """Worked by hand with IEEE 754's sign rules: v = half((q - 8) * s), s = half(1 * m).
    m = +0: q < 8 gives -0 (0x8000), q >= 8 gives +0. m = -0: q < 8 gives +0, q >= 8 gives -0
    (+0 * -0 = -0). m = 2^-24: v = (q - 8) * 2^-24 exactly (sign-magnitude patterns)."""
    got = as_bits(dequantize(zero_scale_layer(scale_max_bits)))
    for r in range(32):
        d = r % 16 - 8
        if group_max_bits == 0x0000:
            want = 0x8000 if d < 0 else 0x0000
        elif group_max_bits == 0x8000:
            want = 0x0000 if d < 0 else 0x8000
        else:
            want = (0x8000 | -d) if d < 0 else d
        assert got[r * 32:(r + 1) * 32] == [want] * 32, (r, hex(want))


def test_group_maximum_zero_boundary_is_2_to_the_minus_17():
    # the decoded maximum m = half(q_scale_max / 256) is zero exactly for q_scale_max <= 2^-17
    for bits in range(0x0000, 0x0100):
        m = torch.tensor([f16(bits)], dtype=torch.float16).float().div(256).half()
        assert (float(m) == 0) == (f16(bits) <= 2.0**-17), hex(bits)
