"""Quantization parameters of one layer (spec 7.4), after exllamav2's ``QParams``.

A ``QParams`` says which bit widths a layer uses, in what proportion of its input rows, and with
which group size per width. It fixes the group plan, and so the exact storage cost in bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .format import WIDTHS, row_granule


@dataclass(frozen=True)
class GroupPlan:
    """The groups an encoder cuts for a layer: ``(bits, first_row, rows)`` in act-order rows."""

    groups: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class QParams:
    """Widths, their proportions of the rows, and a group size per width.

    ``bits`` must be non-increasing (spec 4.2); ``bits_prop`` sums to 1; ``group_size`` maps a
    width to its group size (an int applies to every width). ``scale_bits`` is always 4.
    """

    group_size: dict[int, int]
    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    scale_bits: int = 4
    _: None = field(default=None, repr=False, compare=False)

    def __init__(self, group_size: int | dict[int, int] | list[int], bits: list[int] | tuple[int, ...],
                 bits_prop: list[float] | tuple[float, ...], scale_bits: int = 4) -> None:
        bits = tuple(int(b) for b in bits)
        if isinstance(group_size, dict):
            gs = {int(b): int(g) for b, g in group_size.items()}
        elif isinstance(group_size, (list, tuple)):
            if len(group_size) != len(bits):
                raise ValueError("group_size list must have one entry per width")
            gs = {b: int(g) for b, g in zip(bits, group_size)}
        else:
            gs = {b: int(group_size) for b in bits}
        object.__setattr__(self, "group_size", gs)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "bits_prop", tuple(float(p) for p in bits_prop))
        object.__setattr__(self, "scale_bits", int(scale_bits))
        object.__setattr__(self, "_", None)
        self._check()

    def _check(self) -> None:
        if not self.bits or len(self.bits) != len(self.bits_prop):
            raise ValueError("bits and bits_prop must be non-empty and of equal length")
        for b in self.bits:
            if b not in WIDTHS:
                raise ValueError(f"bit width {b} is not one of {WIDTHS}")
            g = self.group_size.get(b)
            if g is None or g <= 0 or g % row_granule(b):
                raise ValueError(f"group size {g} for {b}-bit groups must be a positive multiple of {row_granule(b)}")
        if any(b2 > b1 for b1, b2 in zip(self.bits, self.bits[1:])):
            raise ValueError(f"bits {list(self.bits)} must be non-increasing")
        if len(set(self.bits)) != len(self.bits):
            raise ValueError("each width may appear once")
        if any(p <= 0 for p in self.bits_prop) or abs(sum(self.bits_prop) - 1) > 1e-9:
            raise ValueError("bits_prop must be positive and sum to 1")
        if self.scale_bits != 4:
            raise ValueError("scale_bits must be 4")

    # -- the group plan ---------------------------------------------------------------------

    def groups_per_width(self, rows: int) -> list[int]:
        """Groups of each width for a layer of ``rows`` input rows, as exllamav2's
        ``AdaptiveGPTQ.configure``: ``ceil(min(rows * p, remaining) / group_size)``."""
        remaining = rows
        counts = []
        for b, p in zip(self.bits, self.bits_prop):
            gsz = self.group_size[b]
            g = math.ceil(min(rows * p, remaining) / gsz)
            remaining -= g * gsz
            counts.append(g)
        if remaining > 0:  # pragma: no cover - proportions sum to 1, so this cannot happen
            raise ValueError("proportions do not cover the rows")
        return counts

    def plan(self, rows: int) -> GroupPlan:
        """Groups cut in order as ``[a, min(a + group_size, rows))``; trailing groups that would be
        empty are dropped (exllamav2 would write a zero-row group no reader accepts)."""
        groups = []
        a = 0
        for b, g in zip(self.bits, self.groups_per_width(rows)):
            for _ in range(g):
                if a >= rows:
                    break
                n = min(self.group_size[b], rows - a)
                groups.append((b, a, n))
                a += n
        return GroupPlan(tuple(groups))

    # -- bit accounting (spec 7.5) --------------------------------------------------------

    def total_bits(self, in_features: int, out_features: int, bias: bool = False) -> int:
        """Exact bits of the tensors of a layer quantized with these parameters, padding included:
        q_weight, q_scale, q_scale_max, q_groups, q_invperm and the float16 bias (padded too, spec 3.3)."""
        from .format import padded_columns

        cols = padded_columns(out_features)
        plan = self.plan(in_features)
        weight_bits = sum(n * b for b, _, n in plan.groups) * cols
        g = plan.count
        return (weight_bits + g * cols * self.scale_bits + g * 16 + g * 32 + in_features * 32
                + (16 * cols if bias else 0))

    def bpw(self, in_features: int, out_features: int, bias: bool = False) -> float:
        """Bits per weight: :meth:`total_bits` over ``in_features * out_features``."""
        return self.total_bits(in_features, out_features, bias) / (in_features * out_features)

    def desc(self) -> str:
        return "/".join(f"{p}:{b}b_{self.group_size[b]}g" for b, p in zip(self.bits, self.bits_prop)) + " s4"

    def to_dict(self) -> dict:
        return {"group_size": {str(b): g for b, g in self.group_size.items()}, "bits": list(self.bits),
                "bits_prop": list(self.bits_prop), "scale_bits": self.scale_bits}

    @classmethod
    def from_dict(cls, d: dict) -> "QParams":
        return cls(d["group_size"], d["bits"], d["bits_prop"], d.get("scale_bits", 4))
