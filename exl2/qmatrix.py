"""``QMatrix``: the tensors of one quantized linear layer, and its decoded group table.

A QMatrix holds the tensors exactly as the file stores them (spec 3). Building one runs every
rule of the layer (:mod:`exl2.layer_rules`, the same table the validator reports from) and
refuses the layer at the first error, so no decoder ever sees a non-conformant layer. A
QMatrix is immutable: derived values (the group table, ``out_features``) are computed once, at
construction; ``dataclasses.replace`` builds a changed copy, checked again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import FormatError
from .format import COLUMN_PAD, WIDTHS
from .layer_rules import (LAYER_TENSORS, OPTIONAL_TENSORS, Group, Violation, group_table, layer_rules, required_tensors,
                          run, stored_q_perm)


def refuse(v: Violation) -> None:
    """Raise the first error of a rule table as a FormatError carrying its code."""
    if v.is_error:
        raise FormatError(v.message, tensor=v.tensor, code=v.code)


@dataclass(frozen=True)
class GroupTable:
    """The decoded ``q_groups`` table (spec 4)."""

    groups: tuple[Group, ...]

    @classmethod
    def decode(cls, q_groups: torch.Tensor, num_qrows: int, in_features: int) -> "GroupTable":
        """Decode ``q_groups`` (pairs ``bits, first qrow``) against the q_weight height and
        in_features; raises :class:`FormatError` at the first rule of spec 4 that fails."""
        if q_groups.dim() != 1 or q_groups.numel() == 0 or q_groups.numel() % 2:
            raise FormatError(f"must be a non-empty 1-D tensor of (bits, qrow) pairs, has shape "
                              f"{list(q_groups.shape)}", tensor="q_groups", code="EXL2-T003")
        return cls(run(group_table(q_groups.to(torch.int64).view(-1, 2).tolist(), num_qrows, in_features), refuse))

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


@dataclass(frozen=True, eq=False)
class QMatrix:
    """One quantized linear layer, as stored: rows are input features (in act-order), columns
    output features padded to a multiple of 32. The decoded matrix ``B`` is
    ``[in_features, out_features_padded]`` and the layer computes ``y = x @ B[:, :N] + bias[:N]``.

    ``out_features`` (N) is the layer's real width when known from outside the layer tensors
    (config.json, the encoder); left at 0 it becomes the padded width N' (spec 3.1). The bias,
    when present, is stored as the file holds it: N' entries (spec 3.3); :attr:`output_bias` is
    its first N.

    Construction refuses a layer that breaks any rule of :mod:`exl2.layer_rules` (a
    :class:`FormatError` carrying the finding code). The object is frozen and its derived values
    (``groups``, ``out_features``) are computed once; use ``dataclasses.replace`` for a changed
    copy, which is checked again. The tensors are shared, not copied: changing one in place
    (``qm.q_weight[0] = 1``) bypasses the checks and leaves the derived values and the fast
    path's cached tables stale. Not doing that is the caller's contract.
    """

    q_weight: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    q_invperm: torch.Tensor
    bias: torch.Tensor | None = None
    out_features: int = 0
    groups: GroupTable = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tensors = {n: getattr(self, n) for n in LAYER_TENSORS}
        if self.bias is not None:
            tensors["bias"] = self.bias
        n = int(self.out_features) if self.out_features else None
        groups = run(layer_rules(tensors, n), refuse)
        cols = self.q_weight.shape[1]
        if n is not None and not cols - COLUMN_PAD < n <= cols:
            raise ValueError(f"out_features {n} does not pad to q_weight's {cols} columns")
        object.__setattr__(self, "groups", GroupTable(groups))
        object.__setattr__(self, "out_features", n or cols)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "",
                     out_features: int | None = None) -> "QMatrix":
        """Build from a mapping holding ``{prefix}.q_weight`` etc. (``prefix`` may be empty, then
        the bare names are used). Only the layer's own tensors are read. A ``q_perm``, if present,
        must be the inverse of ``q_invperm``. Errors name the tensor with its prefix."""
        key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        got = {n: tensors[key(n)] for n in (*LAYER_TENSORS, *OPTIONAL_TENSORS) if key(n) in tensors}
        try:
            run(required_tensors(got), refuse)
            qm = cls(**{n: got[n] for n in LAYER_TENSORS}, bias=got.get("bias"), out_features=out_features or 0)
            if "q_perm" in got:
                run(stored_q_perm(got["q_perm"], qm.q_invperm), refuse)
        except FormatError as e:
            raise FormatError(e.message, tensor=key(e.tensor) if e.tensor else prefix or None, code=e.code) from None
        return qm

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The layer's tensors under their EXL2 names (``bias`` only if present)."""
        key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        out = {key(n): getattr(self, n) for n in LAYER_TENSORS}
        if self.bias is not None:
            out[key("bias")] = self.bias
        return out

    # -- derived facts ----------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return self.q_invperm.numel()

    @property
    def out_features_padded(self) -> int:
        return self.q_weight.shape[1]

    @property
    def output_bias(self) -> torch.Tensor | None:
        """The bias of the layer's ``out_features`` outputs: the stored bias without its padded
        entries (spec 3.3), or None."""
        return None if self.bias is None else self.bias[: self.out_features]

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
        """A copy with every tensor on ``device`` (checked again)."""
        moved = {n: getattr(self, n).to(device) for n in LAYER_TENSORS}
        return dataclasses.replace(self, **moved, bias=None if self.bias is None else self.bias.to(device))


__all__ = ["Group", "GroupTable", "LAYER_TENSORS", "OPTIONAL_TENSORS", "QMatrix"]
