"""Hypothesis strategies for EXL2 layers: public API for anyone testing a kernel or a port.

    import torch
    from hypothesis import given
    from exl2.conformance.strategies import qmatrices
    from exl2.reference import dequantize

    @given(qmatrices(widths=(4, 3), max_out_features=256))
    def test_my_dequantize(qm):
        assert torch.equal(my_dequantize(qm).view(torch.int16), dequantize(qm).view(torch.int16))

Layers are built directly from pseudo-random codes, scale codes, maxima and permutations
through :func:`exl2.reference.pack` (no encoder runs), so they are cheap to generate and reach
every feature of the format (spec 3 to 6): each width, mixed widths in non-increasing order,
2-bit groups of 16 rows, padded columns (``out_features`` not a multiple of 32), a last group
shorter than the others, ``q_scale_max`` whose ``/256`` is a float16 subnormal, a bias, and
for products: layers whose codes are mostly at the zero point (``zero_heavy``) and activations
with outliers (``matmul_inputs(outliers=...)``), where a matmul that lets the zero point into
its rounding error leaves spec 8.2.1's bound.

Hypothesis draws a :class:`LayerSpec` (the group plan, sizes, flags and a seed); the spec builds
the tensors from a counter-based generator (:class:`Stream`) that gives the same numbers on every
platform and every version of numpy or torch. Both live in :mod:`exl2.conformance.layers`, which
needs no hypothesis: the exported test vectors (:mod:`exl2.conformance.vectors`) are built from
them, which is why they are the same bytes everywhere. This module re-exports them.

:func:`broken_layers` yields layers that break exactly one rule, each with the finding code the
validator (:func:`exl2.conformance.check_layer`, spec/findings.md) reports for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from hypothesis import strategies as st

from ..format import MAX_IN_FEATURES, WIDTHS, row_granule
from ..qmatrix import QMatrix
from .layers import MUTATIONS, LayerSpec, Mutation, Stream, Tensors, broken, mutations


def _usable_widths(widths: Sequence[int], max_in_features: int) -> tuple[int, ...]:
    bad = [b for b in widths if b not in WIDTHS]
    if not widths or bad:
        raise ValueError(f"widths must be a non-empty subset of {WIDTHS}, got {list(widths)}")
    if not 16 <= max_in_features <= MAX_IN_FEATURES:
        raise ValueError(f"max_in_features must be in 16..{MAX_IN_FEATURES}, got {max_in_features}")
    usable = tuple(b for b in widths if row_granule(b) <= max_in_features)
    if not usable:
        raise ValueError(f"no width of {list(widths)} fits in {max_in_features} rows (32 rows, 16 for 2-bit)")
    return usable


def layer_specs(widths: Sequence[int] = WIDTHS, max_in_features: int = 512, max_out_features: int = 96,
                max_groups: int = 6, max_group_rows: int = 128, bias: bool | None = None,
                subnormal: bool | None = None, q_perm: bool | None = False,
                zero_heavy: bool | None = None) -> st.SearchStrategy[LayerSpec]:
    """A random valid :class:`LayerSpec`.

    The layer has one group size (16, 32, 64 or 128 rows, at most ``max_group_rows``; 16 only for
    2-bit groups, others round it up to 32, spec 4.4), 1 to ``max_groups`` groups of widths drawn
    from ``widths`` in non-increasing order, and a last group of any multiple of the granule up to
    the group size (a short tail, as exllamav2's group plans end). ``bias``, ``subnormal``,
    ``q_perm``, ``zero_heavy`` (most codes at the zero point, see :class:`LayerSpec`): force a
    feature on or off; None lets hypothesis choose.

    Bad arguments raise ValueError at once.

    >>> @given(layer_specs(widths=(2,), max_in_features=64))
    ... def test_two_bit(spec): ...
    """
    usable = _usable_widths(widths, max_in_features)
    if max_out_features < 1 or max_groups < 1:
        raise ValueError("max_out_features and max_groups must be at least 1")
    return _layer_specs(usable, max_in_features, max_out_features, max_groups, max_group_rows, bias, subnormal, q_perm,
                        zero_heavy)


@st.composite
def _layer_specs(draw, usable: tuple[int, ...], max_in_features: int, max_out_features: int, max_groups: int,
                 max_group_rows: int, bias: bool | None, subnormal: bool | None, q_perm: bool | None,
                 zero_heavy: bool | None) -> LayerSpec:
    chosen = sorted(draw(st.lists(st.sampled_from(usable), min_size=1, max_size=max_groups)), reverse=True)
    size = draw(st.sampled_from([s for s in (16, 32, 64, 128) if s <= max(16, max_group_rows)]))
    groups: list[tuple[int, int]] = []
    budget = max_in_features
    for i, bits in enumerate(chosen):
        granule = row_granule(bits)
        rows = max(granule, size // granule * granule)
        if i == len(chosen) - 1:
            rows = draw(st.integers(1, rows // granule)) * granule
        rows = min(rows, budget // granule * granule)
        if rows == 0:
            break
        groups.append((bits, rows))
        budget -= rows
    return LayerSpec(
        groups=tuple(groups),
        out_features=draw(st.integers(1, max_out_features)),
        seed=draw(st.integers(0, 2**32 - 1)),
        subnormal=draw(st.booleans()) if subnormal is None else subnormal,
        bias=draw(st.booleans()) if bias is None else bias,
        q_perm=draw(st.booleans()) if q_perm is None else q_perm,
        zero_heavy=draw(st.booleans()) if zero_heavy is None else zero_heavy,
    )


def qmatrices(widths: Sequence[int] = WIDTHS, max_in_features: int = 512, max_out_features: int = 96,
              max_groups: int = 6, max_group_rows: int = 128, bias: bool | None = None,
              subnormal: bool | None = None, zero_heavy: bool | None = None) -> st.SearchStrategy[QMatrix]:
    """Valid :class:`exl2.QMatrix` objects (arguments as :func:`layer_specs`).

    >>> from hypothesis import given
    >>> @given(qmatrices(widths=(8, 2), bias=True))
    ... def test_padded_columns_decode_to_zero(qm):
    ...     assert not dequantize(qm)[:, qm.out_features:].any()
    """
    return layer_specs(widths=widths, max_in_features=max_in_features, max_out_features=max_out_features,
                       max_groups=max_groups, max_group_rows=max_group_rows, bias=bias,
                       subnormal=subnormal, q_perm=False, zero_heavy=zero_heavy).map(LayerSpec.build)


def layer_tensors(prefix: str = "layer", q_perm: bool | None = None, **kwargs) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Valid layers as the dict a file holds: ``{prefix}.q_weight`` ... (``{prefix}.bias`` and
    ``{prefix}.q_perm`` when drawn). Other arguments as :func:`layer_specs`.

    >>> @given(layer_tensors(prefix="model.layers.0.mlp.up_proj"))
    ... def test_loader(tensors): ...
    """
    return layer_specs(q_perm=q_perm, **kwargs).map(lambda spec: spec.tensors(prefix))


#: Activation outliers (:func:`matmul_inputs`): about 1 value in 32 is scaled up by this ...
OUTLIER_SCALE = 2.0**6
#: ... and about 1 in 4 down by this (into float16's subnormals): powers of two, so every value
#: stays exact in float16 and bfloat16.
TINY_SCALE = 2.0**-8


def matmul_inputs(qm: QMatrix, max_m: int = 64, dtype: torch.dtype = torch.float16,
                  outliers: bool | None = None) -> st.SearchStrategy[torch.Tensor]:
    """Activations ``x`` ``[M, in_features]`` for ``qm``, ``M`` from 1 to ``max_m``, values
    ``k / 128`` on [-1, 1], in ``dtype`` (exact in float16 and bfloat16 alike). With
    ``outliers`` (None: hypothesis chooses), about 1 value in 32 is scaled by
    :data:`OUTLIER_SCALE` and 1 in 4 by :data:`TINY_SCALE`, as in language models' activations:
    with a zero-heavy layer (``qmatrices(zero_heavy=True)``) a large ``x_k`` meets a weight of 0
    and the product hangs on the small ones, which exposes a matmul whose error grows with
    ``z sum |x|`` instead of ``sum |x| |B|`` (spec 8.2.1).

    >>> from exl2.reference import dequantize, matmul
    >>> from exl2.reference.bounds import matmul_within_bound
    >>> @given(data=st.data(), qm=qmatrices())
    ... def test_matmul(data, qm):
    ...     x = data.draw(matmul_inputs(qm))
    ...     y_ref = matmul(x.float(), qm)  # float32 accumulation, float32 out
    ...     assert matmul_within_bound(my_matmul(x, qm), y_ref, x, dequantize(qm), qm.bias)
    """
    def build(m_seed_outliers: tuple[int, int, bool]) -> torch.Tensor:
        m, seed, with_outliers = m_seed_outliers
        r = Stream(seed)
        x = r.float16((m, qm.in_features), 7).astype(np.float64)
        if with_outliers:  # drawn after the values: without outliers, the same x as before
            kind = r.integers(0, 32, x.shape)
            x = np.where(kind == 0, x * OUTLIER_SCALE, np.where(kind >= 24, x * TINY_SCALE, x))
        return torch.from_numpy(x).to(dtype)

    flag = st.booleans() if outliers is None else st.just(outliers)
    return st.tuples(st.integers(1, max_m), st.integers(0, 2**32 - 1), flag).map(build)


@st.composite
def broken_layers(draw, prefix: str = "layer", codes: Sequence[str] | None = None,
                  **spec_kwargs) -> tuple[Tensors, str]:
    """``(tensors, code)``: a random valid layer (as :func:`layer_tensors`) with one mutation of
    :data:`MUTATIONS` that breaks exactly the rule ``code`` names: the validator reports ``code``
    and no other error. ``EXL2-G004`` is left
    out unless ``codes`` asks for it, as it cannot come alone (see :data:`MUTATIONS`). Other
    keyword arguments go to :func:`layer_specs` (defaults: ``max_in_features=256``,
    ``max_out_features=80``, ``max_groups=4``).

    >>> @given(broken_layers())
    ... def test_my_loader_refuses(case):
    ...     tensors, code = case
    ...     with pytest.raises(MyFormatError):
    ...         my_load(tensors, "layer")
    """
    wanted = [m for m in MUTATIONS if (m.code in codes if codes else m.exclusive)]
    if not wanted:
        raise ValueError(f"no mutation for codes {codes}")
    mutation = draw(st.sampled_from(wanted))
    spec = draw(layer_specs(**({"max_in_features": 256, "max_out_features": 80, "max_groups": 4} | spec_kwargs)))
    return broken(spec, mutation, prefix), mutation.code


__all__ = ["LayerSpec", "MUTATIONS", "Mutation", "OUTLIER_SCALE", "Stream", "TINY_SCALE", "Tensors", "broken",
           "broken_layers", "layer_specs", "layer_tensors", "matmul_inputs", "mutations", "qmatrices"]
