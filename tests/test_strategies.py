"""The public hypothesis strategies generate what they promise."""

from __future__ import annotations

from hypothesis import given

from exl2.conformance.rules import check_layer, check_qmatrix
from exl2.conformance.strategies import broken_layers, qmatrices


@given(qmatrices())
def test_generated_layers_are_valid(qm):
    assert not [f for f in check_qmatrix(qm) if f.severity == "error"]
    widths = [g.bits for g in qm.groups]
    assert widths == sorted(widths, reverse=True)


@given(broken_layers())
def test_broken_layers_break_exactly_their_rule(case):
    tensors, code = case
    errors = {f.code for f in check_layer(tensors, "layer") if f.severity == "error"}
    assert errors == {code}
