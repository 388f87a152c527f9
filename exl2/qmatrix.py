"""``QMatrix``: the tensors of one quantized linear layer, and its decoded group table.

A QMatrix holds the tensors exactly as the file stores them (spec 3). Building one checks the
structural rules that decoding relies on (shapes, dtypes, the group table), so that no decoder
ever indexes out of bounds; the conformance validator checks the remaining rules and reports
each with a finding code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .errors import FormatError
from .format import BLOCKS, COLUMN_PAD, INT16_MAX, MAX_IN_FEATURES, WIDTHS, row_granule

#: Tensors of a quantized layer, with their dtype (spec 3.1). ``bias`` and ``q_perm`` are optional.
LAYER_TENSORS: dict[str, torch.dtype] = {
    "q_weight": torch.int32,
    "q_scale": torch.int32,
    "q_scale_max": torch.float16,
    "q_groups": torch.int16,
    "q_invperm": torch.int32,
}
OPTIONAL_TENSORS: dict[str, torch.dtype] = {"q_perm": torch.int32, "bias": torch.float16}


@dataclass(frozen=True)
class Group:
    """One group: ``rows`` act-order rows from ``row``, ``bits`` wide, stored in q_weight rows
    ``qrow .. qrow + qrows``; its scales are row ``index`` of q_scale / q_scale_max."""

    index: int
    bits: int
    row: int
    rows: int
    qrow: int
    qrows: int


@dataclass(frozen=True)
class GroupTable:
    """The decoded ``q_groups`` table (spec 4)."""

    groups: tuple[Group, ...]

    @classmethod
    def decode(cls, q_groups: torch.Tensor, num_qrows: int, in_features: int) -> "GroupTable":
        """Decode ``q_groups`` (pairs ``bits, first qrow``) against the q_weight height and
        in_features; raises :class:`FormatError` at the first rule of spec 4 that fails."""

        def refuse(code: str, tensor: str, message: str) -> None:
            raise FormatError(f"{message} [{code}]", tensor=tensor)

        if q_groups.dim() != 1 or q_groups.numel() == 0 or q_groups.numel() % 2:
            refuse("EXL2-T003", "q_groups", f"must be a non-empty 1-D tensor of (bits, qrow) pairs, "
                                            f"has shape {list(q_groups.shape)}")
        groups = check_groups(q_groups.to(torch.int64).view(-1, 2).tolist(), num_qrows, in_features, refuse)
        assert groups is not None  # refuse() raised otherwise
        return cls(groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def rows_per_width(self) -> dict[int, int]:
        out = {b: 0 for b in WIDTHS}
        for g in self.groups:
            out[g.bits] += g.rows
        return out

    def groups_per_width(self) -> dict[int, int]:
        out = {b: 0 for b in WIDTHS}
        for g in self.groups:
            out[g.bits] += 1
        return out

    def encode(self) -> torch.Tensor:
        """The ``q_groups`` tensor of this table."""
        return torch.tensor([v for g in self.groups for v in (g.bits, g.qrow)], dtype=torch.int16)


Report = Callable[[str, str, str], None]


def check_groups(pairs: list[list[int]], num_qrows: int, in_features: int, report: Report) -> tuple[Group, ...] | None:
    """Every rule of spec 4 over the ``(bits, first qrow)`` pairs of ``q_groups`` (as stored,
    int16). Each broken rule is passed to ``report(code, tensor, message)`` with its finding code
    (spec/findings.md); returns the groups when all rules hold, else None. The validator reports
    every finding; :meth:`GroupTable.decode` raises at the first."""
    ok = True

    def fail(code: str, tensor: str, message: str) -> None:
        nonlocal ok
        ok = False
        report(code, tensor, message)

    g = len(pairs)
    if g > INT16_MAX:
        fail("EXL2-G007", "q_groups", f"{g} groups exceed the 16-bit limit {INT16_MAX}")
    if num_qrows > INT16_MAX:
        fail("EXL2-G007", "q_weight", f"{num_qrows} qrows exceed the 16-bit limit {INT16_MAX}")
    for i, (bits, qrow) in enumerate(pairs):
        if qrow < 0:
            fail("EXL2-G007", "q_groups", f"group {i} offset {qrow & 0xFFFF} does not fit in int16")
        if bits not in WIDTHS:
            fail("EXL2-G001", "q_groups", f"group {i} has width {bits}, not one of {list(WIDTHS)}")
        elif i and pairs[i - 1][0] in WIDTHS and bits > pairs[i - 1][0]:
            fail("EXL2-G002", "q_groups", f"group {i} is {bits}-bit after a {pairs[i - 1][0]}-bit group; "
                                          f"widths must be non-increasing")
    if not ok:
        return None
    offsets = [qrow for _, qrow in pairs] + [num_qrows]
    if offsets[0] != 0 or any(a >= b for a, b in zip(offsets, offsets[1:])):
        fail("EXL2-G003", "q_groups", f"qrow offsets {offsets[:-1][:8]}{'...' if g > 8 else ''} must start at 0 "
                                      f"and increase strictly below q_weight's {num_qrows} rows")
        return None
    groups = []
    row = 0
    for i, (bits, qrow) in enumerate(pairs):
        qrows = offsets[i + 1] - qrow
        words = BLOCKS[bits].words
        if qrows % words:
            fail("EXL2-G004", "q_groups", f"group {i} ({bits}-bit) has {qrows} qrows, not whole {words}-word blocks")
        rows = qrows * 32 // bits
        if rows % row_granule(bits):
            fail("EXL2-G005", "q_groups", f"group {i} ({bits}-bit) has {rows} rows, not a multiple of {row_granule(bits)}")
        if rows > INT16_MAX:
            fail("EXL2-G007", "q_groups", f"group {i} has {rows} rows, above the 16-bit limit")
        groups.append(Group(index=i, bits=bits, row=row, rows=rows, qrow=qrow, qrows=qrows))
        row += rows
    if row != in_features:
        last = groups[-1].rows
        fail("EXL2-G006", "q_groups", f"groups hold {row} rows but in_features is {in_features} "
                                      f"(last group: {last} rows by its qrows, {in_features - (row - last)} by in_features)")
    return tuple(groups) if ok else None


def _check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise FormatError("is not a tensor", tensor=name)
    if t.dtype != dtype:
        raise FormatError(f"has dtype {t.dtype}, expected {dtype}", tensor=name)
    if t.dim() != dim:
        raise FormatError(f"has shape {list(t.shape)}, expected {dim} dimension(s)", tensor=name)


@dataclass
class QMatrix:
    """One quantized linear layer, as stored: rows are input features (in act-order), columns
    output features padded to a multiple of 32. The decoded matrix ``B`` is
    ``[in_features, out_features_padded]`` and the layer computes ``y = x @ B + bias``.

    ``out_features`` is the layer's real width when known (from the bias, a config, or the
    encoder); otherwise the padded width.
    """

    q_weight: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    q_invperm: torch.Tensor
    bias: torch.Tensor | None = None
    out_features: int = field(default=0)

    def __post_init__(self) -> None:
        self._check()
        if not self.out_features:
            self.out_features = self.bias.numel() if self.bias is not None else self.out_features_padded

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "",
                     out_features: int | None = None) -> "QMatrix":
        """Build from a mapping holding ``{prefix}.q_weight`` etc. (``prefix`` may be empty, then
        the bare names are used). Only the layer's own tensors are read. A ``q_perm``, if present,
        must be the inverse of ``q_invperm``."""
        key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        got: dict[str, torch.Tensor] = {}
        for name in LAYER_TENSORS:
            if key(name) not in tensors:
                raise FormatError("is missing", tensor=key(name))
            got[name] = tensors[key(name)]
        bias = tensors[key("bias")] if key("bias") in tensors else None
        try:
            qm = cls(**got, bias=bias, out_features=out_features or 0)
            if key("q_perm") in tensors:
                q_perm = tensors[key("q_perm")]
                _check_tensor("q_perm", q_perm, torch.int32, 1)
                if q_perm.numel() != qm.in_features or not torch.equal(
                        q_perm.to(torch.int64)[qm.q_invperm.to(torch.int64)], torch.arange(qm.in_features)):
                    raise FormatError("is not the inverse of q_invperm", tensor="q_perm")
        except FormatError as e:
            raise FormatError(e.message, tensor=key(e.tensor) if e.tensor else prefix or None) from None
        return qm

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The layer's tensors under their EXL2 names (``bias`` only if present)."""
        key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        out = {key(n): getattr(self, n) for n in LAYER_TENSORS}
        if self.bias is not None:
            out[key("bias")] = self.bias
        return out

    # -- checks -----------------------------------------------------------------------------

    def _check(self) -> None:
        for name, dtype in LAYER_TENSORS.items():
            _check_tensor(name, getattr(self, name), dtype, 2 if name in ("q_weight", "q_scale") else 1)
        qrows, cols = self.q_weight.shape
        if cols == 0 or cols % COLUMN_PAD:
            raise FormatError(f"has {cols} columns, not a positive multiple of {COLUMN_PAD}", tensor="q_weight")
        k = self.q_invperm.numel()
        if not 0 < k <= MAX_IN_FEATURES:
            raise FormatError(f"has {k} entries; in_features must be in 1..{MAX_IN_FEATURES}", tensor="q_invperm")
        g = self.q_groups.numel() // 2
        if self.q_scale.shape != (g, cols // 8):
            raise FormatError(f"has shape {list(self.q_scale.shape)}, expected [{g}, {cols // 8}]", tensor="q_scale")
        if self.q_scale_max.shape != (g,):
            raise FormatError(f"has shape {list(self.q_scale_max.shape)}, expected [{g}]", tensor="q_scale_max")
        perm = self.q_invperm.to(torch.int64)
        if perm.min() < 0 or perm.max() >= k or torch.bincount(perm, minlength=k).ne(1).any():
            raise FormatError(f"is not a permutation of 0..{k - 1}", tensor="q_invperm")
        if self.bias is not None:
            _check_tensor("bias", self.bias, torch.float16, 1)
            if not 0 < self.bias.numel() <= cols or self.bias.numel() <= cols - COLUMN_PAD:
                raise FormatError(f"has {self.bias.numel()} entries, which q_weight's {cols} columns do not pad to",
                                  tensor="bias")
        _ = self.groups  # decodes and checks the group table

    # -- derived facts ----------------------------------------------------------------------

    @cached_property
    def groups(self) -> GroupTable:
        return GroupTable.decode(self.q_groups, self.q_weight.shape[0], self.in_features)

    @property
    def in_features(self) -> int:
        return self.q_invperm.numel()

    @property
    def out_features_padded(self) -> int:
        return self.q_weight.shape[1]

    @property
    def q_perm(self) -> torch.Tensor:
        """``argsort(q_invperm)``: stored row ``k`` is input feature ``q_perm[k]``."""
        return torch.argsort(self.q_invperm.to(torch.int64)).to(torch.int32)

    def storage_bits(self) -> int:
        """Bits of the stored tensors (q_perm excluded, bias included if present)."""
        n = sum(getattr(self, t).numel() * getattr(self, t).element_size() for t in LAYER_TENSORS)
        if self.bias is not None:
            n += self.bias.numel() * 2
        return 8 * n

    @property
    def bits_per_weight(self) -> float:
        """Stored bits over ``in_features * out_features`` (spec 7.5)."""
        return self.storage_bits() / (self.in_features * self.out_features)

    def to(self, device: torch.device | str) -> "QMatrix":
        return QMatrix(*(t.to(device) for t in (self.q_weight, self.q_scale, self.q_scale_max, self.q_groups,
                                                 self.q_invperm)),
                       bias=None if self.bias is None else self.bias.to(device), out_features=self.out_features)
