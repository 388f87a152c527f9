"""Deterministic EXL2 layers: the platform-independent generator behind the hypothesis
strategies and the exported test vectors, and the mutations that break one rule each.

- :class:`Stream` — splitmix64 over a counter: the same numbers on every platform and every
  version of numpy or torch;
- :class:`LayerSpec` — a group plan, sizes, flags and a seed; :meth:`LayerSpec.build` makes the
  layer through :func:`exl2.reference.pack` (no encoder runs);
- :data:`MUTATIONS`, :func:`broken` — a valid layer changed to break exactly one rule, with the
  finding code the validator reports.

No hypothesis here: :mod:`exl2.conformance.vectors` builds the vectors from these alone, and
:mod:`exl2.conformance.strategies` draws :class:`LayerSpec` objects with hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..format import BLOCKS
from ..qmatrix import QMatrix
from ..reference.encode import pack

# -- a generator that is the same everywhere --------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class Stream:
    """Pseudo-random numbers from splitmix64 over a counter: number ``i`` of seed ``s`` depends
    only on ``(s, i)``, and on nothing of the platform or library versions.

    >>> Stream(7).integers(0, 16, (2, 3)).shape
    (2, 3)
    """

    def __init__(self, seed: int) -> None:
        self.seed = np.uint64(seed % 2**64)
        self.counter = 0

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words (uint64)."""
        i = np.arange(self.counter + 1, self.counter + n + 1, dtype=np.uint64)
        self.counter += n
        z = self.seed + i * _GOLDEN  # uint64 arrays wrap modulo 2^64, as splitmix64 wants
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))

    def integers(self, low: int, high: int, shape: int | tuple[int, ...]) -> np.ndarray:
        """int64 values in ``[low, high)`` (``high - low`` well below 2^32, so the modulo bias is nil)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        w = self.words(int(np.prod(shape, dtype=np.int64)))
        return (w % np.uint64(high - low)).astype(np.int64).reshape(shape) + low

    def permutation(self, n: int) -> np.ndarray:
        """A permutation of ``0 .. n-1`` (int64): the stable argsort of ``n`` random words."""
        return np.argsort(self.words(n), kind="stable").astype(np.int64)

    def float16(self, shape: int | tuple[int, ...], scale: int) -> np.ndarray:
        """float16 values ``k * 2^-scale`` with ``|k| <= 2^scale``, i.e. uniform on [-1, 1] on a grid
        that float16 holds exactly (``scale`` <= 11)."""
        k = self.integers(-(1 << scale), (1 << scale) + 1, shape)
        return np.ldexp(k.astype(np.float64), -scale).astype(np.float16)


# -- one layer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to build one layer.

    ``groups`` is the group plan ``((bits, rows), ...)`` in file order (widths non-increasing);
    ``seed`` drives every value. ``subnormal``: group maxima below 2^-6, so ``q_scale_max / 256``
    is a float16 subnormal (spec 6.1). ``act_order=False`` stores rows in input order (identity
    permutation). ``q_perm``: :meth:`tensors` also writes the optional ``q_perm``.
    ``zero_heavy``: most codes at the zero point (weights that decode to exactly 0), column ``n``
    keeping about ``2^-d_n`` of its codes, ``d_n`` from 1 to 8 (so some columns keep a code or
    two, some none): the layer that exposes a matmul whose error grows with the zero point
    rather than with the weights (spec 8.2.1), with activation outliers
    (:func:`exl2.conformance.strategies.matmul_inputs`).

    >>> qm = LayerSpec(groups=((4, 64), (4, 32)), out_features=40, seed=1, bias=True).build()
    >>> qm.in_features, qm.out_features, qm.out_features_padded
    (96, 40, 64)
    """

    groups: tuple[tuple[int, int], ...]
    out_features: int
    seed: int
    subnormal: bool = False
    bias: bool = False
    act_order: bool = True
    q_perm: bool = False
    zero_heavy: bool = False

    @property
    def in_features(self) -> int:
        return sum(rows for _, rows in self.groups)

    def plan(self) -> list[tuple[int, int, int]]:
        """``(bits, first_row, rows)`` per group, as :func:`exl2.reference.pack` takes it."""
        out, row = [], 0
        for bits, rows in self.groups:
            out.append((bits, row, rows))
            row += rows
        return out

    def build(self) -> QMatrix:
        """The layer: codes uniform over ``0 .. 2^b - 1``, scale codes over 1..16, maxima
        ``(1 + m/1024) * 2^e`` with ``e`` in -6..-1 (-20..-7 when ``subnormal``), a random
        act-order permutation, a bias uniform on [-1, 1]; padded columns as spec 3.2 says. With
        ``zero_heavy`` the same layer with each code of column ``n`` moved to the zero point
        unless a 1-in-``2^d_n`` draw keeps it (drawn last, so every other value is unchanged)."""
        r = Stream(self.seed)
        k, n, g = self.in_features, self.out_features, len(self.groups)
        codes = np.concatenate([r.integers(0, 1 << bits, (rows, n)) for bits, rows in self.groups])
        scale_codes = r.integers(1, 17, (g, n))
        lo, hi = (-20, -6) if self.subnormal else (-6, 0)
        exponent = r.integers(lo, hi, g)
        mantissa = r.integers(0, 1024, g)
        scale_max = np.ldexp((1024 + mantissa).astype(np.float64), exponent - 10).astype(np.float16)
        invperm = r.permutation(k) if self.act_order else np.arange(k)
        bias = torch.from_numpy(r.float16(n, 10)) if self.bias else None
        if self.zero_heavy:
            zeros = np.concatenate([np.full((rows, n), 1 << (bits - 1)) for bits, rows in self.groups])
            density = 256 >> r.integers(1, 9, n)  # column n keeps density / 256 of its codes
            codes = np.where(r.integers(0, 256, codes.shape) < density, codes, zeros)
        return pack(torch.from_numpy(codes), self.plan(), torch.from_numpy(scale_codes),
                    torch.from_numpy(scale_max), torch.from_numpy(invperm).to(torch.int32), n, bias)

    def tensors(self, prefix: str = "layer") -> dict[str, torch.Tensor]:
        """The layer's tensors under ``prefix`` (with ``q_perm`` when the spec asks for it)."""
        qm = self.build()
        out = qm.to_tensors(prefix)
        if self.q_perm:
            out[f"{prefix}.q_perm"] = qm.q_perm
        return out


# -- layers that break exactly one rule ---------------------------------------------------------

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Mutation:
    """A change to a valid layer that breaks one rule: ``apply(tensors, prefix)`` edits the dict in
    place; ``prepare`` first adjusts the spec so the rule can be broken there (e.g. adds padded
    columns for the padding rules). ``code`` is the finding the validator reports; ``exclusive``
    says it is the only error (False only where another rule must break with it)."""

    code: str
    name: str
    apply: Callable[[Tensors, str], None]
    prepare: Callable[[LayerSpec], LayerSpec] = lambda spec: spec
    exclusive: bool = True


def _edit(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors, str], None]:
    def apply(t: Tensors, p: str) -> None:
        t[f"{p}.{name}"] = fn(t[f"{p}.{name}"].clone())
    return apply


def _drop(name: str) -> Callable[[Tensors, str], None]:
    def apply(t: Tensors, p: str) -> None:
        del t[f"{p}.{name}"]
    return apply


def _set_at(index: int, value: float | int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        x[index] = value
        return x
    return fn


def _two_groups(spec: LayerSpec) -> LayerSpec:
    """At least two groups (a 2-bit tail can follow any width)."""
    return spec if len(spec.groups) > 1 else replace(spec, groups=spec.groups + ((2, 16),))


def _two_widths(spec: LayerSpec) -> LayerSpec:
    """Groups 0 and 1 of different widths."""
    g = spec.groups
    if len(g) > 1 and g[0][0] != g[1][0]:
        return spec
    if g[0][0] != 8:
        return replace(spec, groups=((8, 32),) + g)
    return replace(spec, groups=((8, 32), (6, 32)) + tuple(x for x in g if x[0] <= 6))


def _same_width_pair(spec: LayerSpec) -> LayerSpec:
    """Groups 0 and 1 both 8-bit, 32 rows (blocks of 4 rows: moving one changes rows by 4)."""
    return replace(spec, groups=((8, 32), (8, 32)) + spec.groups)


def _split_block(index: int) -> Callable[[Tensors, str], None]:
    """Moves the boundary between groups ``index`` and ``index + 1`` (of one width) back by one
    block: both stay whole blocks and the total is unchanged, but group ``index`` is no longer a
    multiple of 32 rows (spec 4.4)."""
    def apply(t: Tensors, p: str) -> None:
        g = t[f"{p}.q_groups"].clone()
        bits = int(g[2 * index])
        g[2 * index + 3] -= BLOCKS[bits].words
        t[f"{p}.q_groups"] = g
    return apply


def _partial_last_block(t: Tensors, p: str) -> None:
    """Drops the last word row of the last group (3-, 5- or 6-bit, so a block spans several
    words) and shortens q_invperm to the rows its qrows now imply: the group is no longer whole
    blocks (4.3), hence not a multiple of 32 rows either (4.4)."""
    qw, g = t[f"{p}.q_weight"], t[f"{p}.q_groups"]
    bits, last = int(g[-2]), int(g[-1])
    rows_before = _rows_before_last(g, qw.shape[0])
    t[f"{p}.q_weight"] = qw[:-1].clone()
    k = rows_before + (qw.shape[0] - 1 - last) * 32 // bits
    t[f"{p}.q_invperm"] = torch.arange(k, dtype=torch.int32)
    t.pop(f"{p}.q_perm", None)


def _rows_before_last(g: torch.Tensor, qrows: int) -> int:
    pairs = g.to(torch.int64).view(-1, 2).tolist()
    ends = [q for _, q in pairs[1:]] + [qrows]
    return sum((end - q) * 32 // b for (b, q), end in zip(pairs[:-1], ends[:-1]))


def _last_group_multiword(spec: LayerSpec) -> LayerSpec:
    """The last group 3-, 5- or 6-bit (blocks of several words): a 3-bit group of 32 rows is
    appended when it is not (after dropping 2-bit groups, which must come last)."""
    if spec.groups[-1][0] in (6, 5, 3):
        return spec
    return replace(spec, groups=tuple(x for x in spec.groups if x[0] > 3) + ((3, 32),))


def _narrow_columns(t: Tensors, p: str) -> None:
    """q_weight and q_scale 16 columns narrower (no longer a multiple of 32, spec 3.2); the bias
    goes, so that its length does not break a second rule."""
    qw, qs = t[f"{p}.q_weight"], t[f"{p}.q_scale"]
    cols = qw.shape[1] - 16
    t[f"{p}.q_weight"] = qw[:, :cols].clone()
    t[f"{p}.q_scale"] = qs[:, : cols // 8].clone()
    t.pop(f"{p}.bias", None)


def _resize_invperm(delta: int) -> Callable[[Tensors, str], None]:
    def apply(t: Tensors, p: str) -> None:
        k = t[f"{p}.q_invperm"].numel()
        t[f"{p}.q_invperm"] = torch.arange(k + delta, dtype=torch.int32)
    return apply


def _wrong_q_perm(t: Tensors, p: str) -> None:
    inv = t[f"{p}.q_invperm"].to(torch.int64)
    t[f"{p}.q_perm"] = torch.argsort(inv).roll(1).to(torch.int32)


def _int16_q_perm(t: Tensors, p: str) -> None:
    inv = t[f"{p}.q_invperm"].to(torch.int64)
    t[f"{p}.q_perm"] = torch.argsort(inv).to(torch.int16)


def _swap_first_widths(t: Tensors, p: str) -> None:
    g = t[f"{p}.q_groups"].clone()
    g[0], g[2] = g[2].clone(), g[0].clone()
    t[f"{p}.q_groups"] = g


def _last_offset_at_end(t: Tensors, p: str) -> None:
    g = t[f"{p}.q_groups"].clone()
    g[-1] = t[f"{p}.q_weight"].shape[0]
    t[f"{p}.q_groups"] = g


def _bias_2d(x: torch.Tensor) -> torch.Tensor:
    return x[None, :]


def _bias_too_long(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.zeros(32 - x.numel() % 32 + 1, dtype=x.dtype)])


#: Every mutation, in a fixed order. Each breaks one rule of spec 3 to 6 and the validator reports
#: its ``code``; with ``exclusive`` it is the only error (``EXL2-G004`` always brings ``EXL2-G005``:
#: a group that is not whole blocks is not a multiple of 32 rows either, spec 4.4). The rules of
#: the padded columns (``EXL2-S003``, ``EXL2-S004``) need out_features, which a layer's tensors
#: do not give (spec 3.1): their negatives are model folders (:mod:`exl2.conformance.vectors`).
MUTATIONS: tuple[Mutation, ...] = (
    *(Mutation("EXL2-T001", f"no-{n}", _drop(n)) for n in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")),
    Mutation("EXL2-T002", "q-scale-max-float32", _edit("q_scale_max", lambda x: x.float())),
    Mutation("EXL2-T002", "q-groups-int32", _edit("q_groups", lambda x: x.int())),
    Mutation("EXL2-T002", "q-invperm-int64", _edit("q_invperm", lambda x: x.long())),
    Mutation("EXL2-T003", "q-scale-max-one-too-many", _edit("q_scale_max", lambda x: torch.cat([x, x[:1]]))),
    Mutation("EXL2-T003", "q-groups-odd-length", _edit("q_groups", lambda x: x[:-1])),
    Mutation("EXL2-T003", "q-scale-extra-row", _edit("q_scale", lambda x: torch.cat([x, x[:1]]))),
    Mutation("EXL2-T004", "columns-not-multiple-of-32", _narrow_columns),
    Mutation("EXL2-T005", "bias-float32", _edit("bias", lambda x: x.float()), lambda s: replace(s, bias=True)),
    Mutation("EXL2-T005", "bias-2d", _edit("bias", _bias_2d), lambda s: replace(s, bias=True)),
    Mutation("EXL2-T005", "bias-longer-than-columns", _edit("bias", _bias_too_long), lambda s: replace(s, bias=True)),
    Mutation("EXL2-T006", "bias-not-padded", _edit("bias", lambda x: x[:-1]), lambda s: replace(s, bias=True)),
    Mutation("EXL2-T007", "bias-nan", _edit("bias", _set_at(0, float("nan"))), lambda s: replace(s, bias=True)),
    Mutation("EXL2-T007", "bias-inf", _edit("bias", _set_at(-1, float("-inf"))), lambda s: replace(s, bias=True)),
    Mutation("EXL2-G001", "width-7", _edit("q_groups", _set_at(0, 7))),
    Mutation("EXL2-G001", "width-0", _edit("q_groups", _set_at(0, 0))),
    Mutation("EXL2-G002", "widths-increase", _swap_first_widths, lambda s: _two_widths(s)),
    Mutation("EXL2-G003", "first-offset-not-0", _edit("q_groups", _set_at(1, 1))),
    Mutation("EXL2-G003", "offsets-repeat", _edit("q_groups", _set_at(3, 0)), _two_groups),
    Mutation("EXL2-G003", "offset-past-end", _last_offset_at_end, _two_groups),
    Mutation("EXL2-G004", "partial-block", _partial_last_block, _last_group_multiword, exclusive=False),
    Mutation("EXL2-G005", "group-of-28-rows", _split_block(0), _same_width_pair),
    Mutation("EXL2-G006", "in-features-too-large", _resize_invperm(32)),
    Mutation("EXL2-G006", "in-features-too-small", _resize_invperm(-16), _two_groups),
    Mutation("EXL2-G007", "offset-negative-as-int16", _edit("q_groups", _set_at(1, -32768))),
    Mutation("EXL2-P001", "q-invperm-repeats", _edit("q_invperm", lambda x: x.index_copy(0, torch.tensor([0]), x[1:2]))),
    Mutation("EXL2-P001", "q-invperm-out-of-range", _edit("q_invperm", lambda x: _set_at(0, x.numel())(x))),
    Mutation("EXL2-P002", "q-perm-not-inverse", _wrong_q_perm),
    Mutation("EXL2-P002", "q-perm-int16", _int16_q_perm),
    Mutation("EXL2-S001", "q-scale-max-negative", _edit("q_scale_max", _set_at(0, -1.0))),
    Mutation("EXL2-S001", "q-scale-max-inf", _edit("q_scale_max", _set_at(0, float("inf")))),
    Mutation("EXL2-S001", "q-scale-max-nan", _edit("q_scale_max", _set_at(0, float("nan")))),
)


def mutations(code: str | None = None) -> list[Mutation]:
    """The mutations of :data:`MUTATIONS`, all or those of one ``code``."""
    return [m for m in MUTATIONS if code is None or m.code == code]


def broken(spec: LayerSpec, mutation: Mutation, prefix: str = "layer") -> Tensors:
    """The tensors of ``spec`` (prepared for ``mutation``) with ``mutation`` applied."""
    tensors = mutation.prepare(replace(spec, q_perm=False)).tensors(prefix)
    mutation.apply(tensors, prefix)
    return tensors


__all__ = ["LayerSpec", "MUTATIONS", "Mutation", "Stream", "Tensors", "broken", "mutations"]
