"""Hypothesis strategies for EXL2 layers: public API for anyone testing a kernel or a port.

    from hypothesis import given
    from exl2.conformance.strategies import qmatrices
    from exl2.reference import dequantize

    @given(qmatrices())
    def test_my_kernel(qm):
        assert (my_dequantize(qm).view(torch.int16) == dequantize(qm).view(torch.int16)).all()

Layers are built directly from random codes, scale codes, maxima and permutations through
:func:`exl2.reference.pack` (no encoder runs), so they are fast to generate and cover every
feature of the format: each width, mixed widths in non-increasing order, 2-bit groups of 16,
padded columns, a short last group, float16-subnormal group maxima, bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ..format import WIDTHS, row_granule
from ..qmatrix import QMatrix
from ..reference.encode import pack


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to build one layer; ``groups`` = ``(bits, first_row, rows)``."""

    groups: tuple[tuple[int, int, int], ...]
    out_features: int
    seed: int
    subnormal: bool
    bias: bool

    @property
    def in_features(self) -> int:
        return sum(n for _, _, n in self.groups)

    def build(self) -> QMatrix:
        g = torch.Generator().manual_seed(self.seed)
        k, n = self.in_features, self.out_features
        codes = torch.cat([torch.randint(0, 1 << b, (rows, n), generator=g) for b, _, rows in self.groups])
        scale_codes = torch.randint(1, 17, (len(self.groups), n), generator=g)
        # maxima as a converter makes them: around 1e-3..1 for normal layers; below 2^-6 (so /256
        # is a float16 subnormal) when asked
        lo, hi = (-20.0, -7.0) if self.subnormal else (-10.0, 0.0)
        smax = torch.exp2(torch.empty(len(self.groups)).uniform_(lo, hi, generator=g))
        invperm = torch.randperm(k, generator=g)
        bias = torch.randn(n, generator=g) if self.bias else None
        return pack(codes, list(self.groups), scale_codes, smax, invperm, n, bias)


@st.composite
def layer_specs(draw, widths: tuple[int, ...] = WIDTHS, max_groups: int = 4, max_group_rows: int = 64,
                max_out_features: int = 80, subnormal: bool | None = None, bias: bool | None = None) -> LayerSpec:
    """A random valid layer description. ``subnormal`` / ``bias`` force a feature on or off (None: either)."""
    chosen = draw(st.lists(st.sampled_from(widths), min_size=1, max_size=max_groups))
    chosen.sort(reverse=True)  # spec 4.2: non-increasing widths
    groups, row = [], 0
    for i, b in enumerate(chosen):
        gran = row_granule(b)
        rows = draw(st.integers(1, max(1, max_group_rows // gran))) * gran
        groups.append((b, row, rows))
        row += rows
    return LayerSpec(
        groups=tuple(groups),
        out_features=draw(st.integers(1, max_out_features)),
        seed=draw(st.integers(0, 2**31 - 1)),
        subnormal=draw(st.booleans()) if subnormal is None else subnormal,
        bias=draw(st.booleans()) if bias is None else bias,
    )


def qmatrices(**kwargs) -> st.SearchStrategy[QMatrix]:
    """Valid QMatrix objects; keyword arguments as :func:`layer_specs`."""
    return layer_specs(**kwargs).map(LayerSpec.build)


def layer_tensors(prefix: str = "layer", **kwargs) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Valid layers as a dict of tensors under ``prefix``."""
    return qmatrices(**kwargs).map(lambda qm: qm.to_tensors(prefix))


def matmul_inputs(qm: QMatrix, max_m: int = 64, dtype: torch.dtype = torch.float16) -> st.SearchStrategy[torch.Tensor]:
    """Activations ``x`` ``[M, in_features]`` for ``qm``, M from 1 to ``max_m``."""
    return st.tuples(st.integers(1, max_m), st.integers(0, 2**31 - 1)).map(
        lambda ms: torch.randn(ms[0], qm.in_features, generator=torch.Generator().manual_seed(ms[1])).to(dtype))


# -- mutations that break exactly one rule --------------------------------------------------

Mutation = Callable[[dict[str, torch.Tensor], str], None]


def _set(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    def m(t: dict[str, torch.Tensor], p: str) -> None:
        t[f"{p}.{name}"] = fn(t[f"{p}.{name}"].clone())
    return m


def _first(value: float | int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        x[0] = value
        return x
    return f


def _pad_codes(t: dict[str, torch.Tensor], p: str) -> None:
    n = t[f"{p}.bias"].numel()
    w = t[f"{p}.q_weight"].clone()
    w[:, n:] = 0  # every packed code of the padded columns becomes 0, not the zero point
    t[f"{p}.q_weight"] = w


def _extend_invperm(t: dict[str, torch.Tensor], p: str) -> None:
    k = t[f"{p}.q_invperm"].numel()
    t[f"{p}.q_invperm"] = torch.arange(k + 32, dtype=torch.int32)


def _duplicate_invperm(t: dict[str, torch.Tensor], p: str) -> None:
    x = t[f"{p}.q_invperm"].clone()
    x[0] = x[1]
    t[f"{p}.q_invperm"] = x


def _wrong_perm(t: dict[str, torch.Tensor], p: str) -> None:
    inv = t[f"{p}.q_invperm"].to(torch.int64)
    t[f"{p}.q_perm"] = torch.argsort(inv).roll(1).to(torch.int32)


def _swap_widths(t: dict[str, torch.Tensor], p: str) -> None:
    g = t[f"{p}.q_groups"].clone()
    g[0], g[2] = g[2].clone(), g[0].clone()
    t[f"{p}.q_groups"] = g


#: code -> (mutation, requirement on the layer spec)
MUTATIONS: dict[str, tuple[Mutation, Callable[[LayerSpec], bool]]] = {
    "EXL2-T001": (lambda t, p: t.pop(f"{p}.q_scale_max"), lambda s: True),
    "EXL2-T002": (_set("q_scale_max", lambda x: x.float()), lambda s: True),
    "EXL2-T003": (_set("q_scale_max", lambda x: torch.cat([x, x[:1]])), lambda s: True),
    "EXL2-T005": (_set("bias", lambda x: x.float()), lambda s: s.bias),
    "EXL2-G001": (_set("q_groups", _first(7)), lambda s: True),
    "EXL2-G002": (_swap_widths, lambda s: len(s.groups) > 1 and s.groups[0][0] != s.groups[1][0]),
    "EXL2-G003": (_set("q_groups", lambda x: x.index_fill(0, torch.tensor([1]), 1)), lambda s: True),
    "EXL2-G006": (_extend_invperm, lambda s: True),
    "EXL2-P001": (_duplicate_invperm, lambda s: True),
    "EXL2-P002": (_wrong_perm, lambda s: True),
    "EXL2-S001": (_set("q_scale_max", _first(-1.0)), lambda s: True),
    "EXL2-S003": (_pad_codes, lambda s: s.bias and s.out_features % 32 != 0),
}


@st.composite
def broken_layers(draw, prefix: str = "layer", codes: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, code)``: a valid layer with one mutation that breaks exactly the rule ``code``
    names (the validator reports that code as its only error)."""
    code = draw(st.sampled_from(sorted(codes or MUTATIONS)))
    mutation, needs = MUTATIONS[code]
    spec = draw(layer_specs(bias=True).filter(needs))
    tensors = spec.build().to_tensors(prefix)
    mutation(tensors, prefix)
    return tensors, code
