"""The rules of one quantized layer (spec 3 to 6), as one table that both readers of this
package use.

Each rule is a generator that yields a :class:`Violation` ``(code, tensor, message)`` for every
way the layer breaks it, with the finding code of spec/findings.md, and never raises whatever
the tensors hold (wrong types, dtypes, ranks, sizes, NaN). :func:`layer_rules` runs them all in a
fixed order. :class:`exl2.QMatrix` stops at the first violation whose severity is an error and
raises it as a :class:`exl2.FormatError` carrying the code; the validator
(:func:`exl2.conformance.check_layer`) reports every violation as a finding. So the two can never
disagree about what a conformant layer is.

Only the rules of a single layer live here. Rules that need more than the layer (config.json,
the bits-per-weight target, decoding every value) are the validator's.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from .format import BLOCKS, COLUMN_PAD, INT16_MAX, MAX_IN_FEATURES, WIDTHS, row_granule, zero_point

#: Tensors of a quantized layer, with their dtype (spec 3.1). ``bias`` and ``q_perm`` are optional.
LAYER_TENSORS: dict[str, torch.dtype] = {
    "q_weight": torch.int32,
    "q_scale": torch.int32,
    "q_scale_max": torch.float16,
    "q_groups": torch.int16,
    "q_invperm": torch.int32,
}
OPTIONAL_TENSORS: dict[str, torch.dtype] = {"q_perm": torch.int32, "bias": torch.float16}

#: Names only a quantized layer has (spec 3.1): any of them makes ``KEY`` a layer (``bias`` does not).
OWN_NAMES = frozenset((*LAYER_TENSORS, "q_perm"))

#: Rank of each tensor (spec 3.1).
RANKS: dict[str, int] = {"q_weight": 2, "q_scale": 2, "q_scale_max": 1, "q_groups": 1, "q_invperm": 1,
                         "q_perm": 1, "bias": 1}

#: Severity of every code these rules yield (the catalogue, exl2/conformance/findings.py, gives
#: the same; a test keeps them equal). Errors make a layer non-conformant.
SEVERITY: dict[str, str] = {
    "EXL2-T001": "error", "EXL2-T002": "error", "EXL2-T003": "error", "EXL2-T004": "error",
    "EXL2-T005": "error", "EXL2-T006": "error", "EXL2-T007": "error",
    "EXL2-G001": "error", "EXL2-G002": "error", "EXL2-G003": "error", "EXL2-G004": "error",
    "EXL2-G005": "error", "EXL2-G006": "error", "EXL2-G007": "error",
    "EXL2-P001": "error", "EXL2-P002": "error",
    "EXL2-S001": "error", "EXL2-S002": "info", "EXL2-S003": "error", "EXL2-S004": "warning",
}

#: The largest float16 below 2^-6 (0x23FF) rounds *up* to 2^-14 when divided by 256, so a
#: maximum decodes through a subnormal exactly when it is below this value (spec 6.1).
SMALLEST_NORMAL_F16 = 2.0**-14


class Violation(NamedTuple):
    """One broken rule: its finding code, the tensor (its name within the layer, e.g.
    ``q_scale_max``), and a one-line message."""

    code: str
    tensor: str
    message: str

    @property
    def is_error(self) -> bool:
        return SEVERITY[self.code] == "error"


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


T = TypeVar("T")
Rules = Generator[Violation, None, T]


def run(rules: Rules[T], report: Callable[[Violation], None]) -> T:
    """Run a rule generator to its end, passing every violation to ``report`` (which may raise
    to stop at the first); returns what the generator returns."""
    while True:
        try:
            report(next(rules))
        except StopIteration as done:
            return done.value


def layer_keys(names: Iterable[str]) -> list[str]:
    """Every ``KEY`` of a quantized layer among tensor ``names``, in order of first appearance: any
    ``KEY`` with one of ``KEY.q_weight``, ``q_scale``, ``q_scale_max``, ``q_groups``, ``q_invperm``,
    ``q_perm``. A layer that lost its q_weight is still a layer, with that tensor missing
    (exllamav2, which looks for ``KEY.q_weight`` alone, would find no weights for it)."""
    keys: dict[str, None] = {}
    for name in names:
        key, _, last = name.rpartition(".")
        if key and last in OWN_NAMES:
            keys.setdefault(key)
    return list(keys)


# -- the table ---------------------------------------------------------------------------------


def layer_rules(tensors: Mapping[str, object], out_features: int | None = None) -> Rules[tuple[Group, ...] | None]:
    """Every rule of spec 3 to 6 over one layer's tensors, given by their names within the layer
    (``q_weight``, ..., optional ``q_perm`` and ``bias``). ``out_features`` is the layer's true
    width when known from outside the layer (config.json, the encoder); the padded-column rules
    (spec 3.2) run only then. Returns the decoded groups when the layer has no error."""
    t = yield from required_tensors(tensors)
    if "q_invperm" in t:
        perm_ok = yield from permutation(t["q_invperm"])
        if perm_ok and "q_perm" in tensors:
            yield from stored_q_perm(tensors["q_perm"], t["q_invperm"])
    if "q_scale_max" in t:
        yield from scale_maxima(t["q_scale_max"])
    ok = len(t) == len(LAYER_TENSORS)
    if ok:
        ok = yield from shapes(*(t[n] for n in LAYER_TENSORS))
    cols = t["q_weight"].shape[1] if "q_weight" in t else 0
    if "bias" in tensors:
        yield from bias(tensors["bias"], cols if cols and cols % COLUMN_PAD == 0 else None)
    if not ok:
        return None
    qw, qs, smax, qg, inv = (t[n] for n in LAYER_TENSORS)
    groups = yield from group_table(qg.to(torch.int64).view(-1, 2).tolist(), qw.shape[0], inv.numel())
    if groups is None:
        return None
    if out_features is not None and cols - COLUMN_PAD < out_features < cols:
        yield from padded_columns(qw, qs, groups, out_features)
    return groups


def required_tensors(tensors: Mapping[str, object]) -> Rules[dict[str, torch.Tensor]]:
    """The required tensors present with the right dtype and rank (spec 3.1); a violation for
    each of the others. Returns those that passed."""
    got = {}
    for name, dtype in LAYER_TENSORS.items():
        if name not in tensors:
            yield Violation("EXL2-T001", name, "is missing")
            continue
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            yield Violation("EXL2-T002", name, f"is a {type(t).__name__}, not a tensor")
        elif t.dtype != dtype:
            yield Violation("EXL2-T002", name, f"has dtype {dtype_name(t.dtype)}, expected {dtype_name(dtype)}")
        elif t.dim() != RANKS[name]:
            yield Violation("EXL2-T003", name, f"has shape {list(t.shape)}, expected {RANKS[name]} dimension(s)")
        else:
            got[name] = t
    return got


def permutation(inv: torch.Tensor) -> Rules[bool]:
    """q_invperm is a permutation of 0..K-1 (spec 6.4)."""
    k = inv.numel()
    p = inv.to(torch.int64)
    if k and (p.min() < 0 or p.max() >= k or torch.bincount(p.clamp(0, k - 1), minlength=k).ne(1).any()):
        yield Violation("EXL2-P001", "q_invperm", f"is not a permutation of 0..{k - 1}")
        return False
    return True


def stored_q_perm(perm: object, inv: torch.Tensor) -> Rules[None]:
    """A stored q_perm is int32 [K] and the inverse of q_invperm (spec 3.3)."""
    k = inv.numel()
    if not isinstance(perm, torch.Tensor):
        yield Violation("EXL2-P002", "q_perm", f"is a {type(perm).__name__}, not a tensor")
    elif perm.dtype != torch.int32 or perm.dim() != 1 or perm.numel() != k:
        yield Violation("EXL2-P002", "q_perm", f"is {dtype_name(perm.dtype)} {list(perm.shape)}, expected int32 [{k}]")
    elif k and not torch.equal(perm.to(torch.int64)[inv.to(torch.int64)], torch.arange(k)):
        yield Violation("EXL2-P002", "q_perm", "is not the inverse of q_invperm")


def scale_maxima(smax: torch.Tensor) -> Rules[None]:
    """q_scale_max finite and not negative (-0 and 0 are legal: exllamav2 writes 0 for a group
    whose maximum underflows); an info where the group maximum decodes to a float16 subnormal
    (spec 6.1)."""
    s = smax.to(torch.float32)
    bad = ~torch.isfinite(s) | (s < 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        yield Violation("EXL2-S001", "q_scale_max",
                        f"{int(bad.sum())} group(s) not finite and non-negative (group {i}: {float(s[i])})")
    m = (s / 256).to(torch.float16).to(torch.float32)  # the decoded group maximum, rounded as in spec 6.1
    sub = torch.isfinite(s) & (m > 0) & (m < SMALLEST_NORMAL_F16)
    if sub.any():
        yield Violation("EXL2-S002", "q_scale_max", f"{int(sub.sum())} group(s) decode through a float16 subnormal "
                                                    f"maximum (q_scale_max / 256 below 2^-14 after rounding)")


def bias(b: object, cols: int | None) -> Rules[None]:
    """A float16 vector of exactly q_weight's N' columns, finite (spec 3.3). exllamav2's loader
    refuses any other length (``make_q_matrix``: ``TORCH_CHECK_SHAPES(q_weight, 1, bias, 0, 1)``)."""
    if not isinstance(b, torch.Tensor):
        yield Violation("EXL2-T005", "bias", f"is a {type(b).__name__}, not a tensor")
        return
    if b.dtype != torch.float16 or b.dim() != 1:
        yield Violation("EXL2-T005", "bias", f"is {dtype_name(b.dtype)} {list(b.shape)}, expected float16 [N']")
        return
    n = b.numel()
    if cols is not None and not (cols - COLUMN_PAD < n <= cols):
        yield Violation("EXL2-T005", "bias", f"has {n} entries for q_weight's {cols} columns: not an out_features "
                                             f"that pads to {cols}")
    elif cols is not None and n != cols:
        yield Violation("EXL2-T006", "bias", f"has {n} entries, not q_weight's {cols} (padded) columns; "
                                             f"exllamav2 refuses to load it (pad it with zeros to {cols})")
    bad = ~torch.isfinite(b)
    if bad.any():
        i = int(bad.nonzero()[0])
        yield Violation("EXL2-T007", "bias", f"{int(bad.sum())} entries are NaN or Inf (entry {i}: {float(b[i])})")


def shapes(qw: torch.Tensor, qs: torch.Tensor, smax: torch.Tensor, qg: torch.Tensor, inv: torch.Tensor) -> Rules[bool]:
    """Column padding (spec 3.2), the range of in_features (4.5), and the shapes that tie the
    tensors to the number of groups (3.1, 4.1). Returns whether the group table can be read."""
    cols, k = qw.shape[1], inv.numel()
    ok = True
    if cols == 0 or cols % COLUMN_PAD:
        yield Violation("EXL2-T004", "q_weight", f"has {cols} columns, not a positive multiple of {COLUMN_PAD}")
        ok = False
    if not 0 < k <= MAX_IN_FEATURES:
        yield Violation("EXL2-G007", "q_invperm", f"in_features {k} is outside 1..{MAX_IN_FEATURES} (q_perm is 16-bit)")
    if qg.numel() == 0 or qg.numel() % 2:
        yield Violation("EXL2-T003", "q_groups", f"has {qg.numel()} entries, not a positive even number")
        return False
    g = qg.numel() // 2
    if tuple(qs.shape) != (g, cols // 8):
        yield Violation("EXL2-T003", "q_scale", f"has shape {list(qs.shape)}, expected [{g}, {cols // 8}] for {g} groups")
        ok = False
    if tuple(smax.shape) != (g,):
        yield Violation("EXL2-T003", "q_scale_max", f"has shape {list(smax.shape)}, expected [{g}]")
        ok = False
    return ok


def group_table(pairs: list[list[int]], num_qrows: int, in_features: int) -> Rules[tuple[Group, ...] | None]:
    """Every rule of spec 4 over the ``(bits, first qrow)`` pairs of ``q_groups`` (as stored,
    int16), against q_weight's row count and in_features. Returns the groups when all hold."""
    ok = True
    g = len(pairs)
    if g > INT16_MAX:
        ok = False
        yield Violation("EXL2-G007", "q_groups", f"{g} groups exceed the 16-bit limit {INT16_MAX}")
    for i, (bits, qrow) in enumerate(pairs):
        if qrow < 0:
            ok = False
            yield Violation("EXL2-G007", "q_groups", f"group {i} offset {qrow & 0xFFFF} does not fit in int16")
        if bits not in WIDTHS:
            ok = False
            yield Violation("EXL2-G001", "q_groups", f"group {i} has width {bits}, not one of {list(WIDTHS)}")
        elif i and pairs[i - 1][0] in WIDTHS and bits > pairs[i - 1][0]:
            ok = False
            yield Violation("EXL2-G002", "q_groups", f"group {i} is {bits}-bit after a {pairs[i - 1][0]}-bit group; "
                                                     f"widths must be non-increasing")
    if not ok:
        return None
    offsets = [qrow for _, qrow in pairs] + [num_qrows]
    if offsets[0] != 0 or any(a >= b for a, b in zip(offsets, offsets[1:])):
        yield Violation("EXL2-G003", "q_groups", f"qrow offsets {offsets[:-1][:8]}{'...' if g > 8 else ''} must start "
                                                 f"at 0 and increase strictly below q_weight's {num_qrows} rows")
        return None
    groups = []
    row = 0
    for i, (bits, qrow) in enumerate(pairs):
        qrows = offsets[i + 1] - qrow
        words = BLOCKS[bits].words
        if qrows % words:
            ok = False
            yield Violation("EXL2-G004", "q_groups", f"group {i} ({bits}-bit) has {qrows} qrows, not whole "
                                                     f"{words}-word blocks")
        rows = qrows * 32 // bits
        if rows % row_granule(bits):
            ok = False
            yield Violation("EXL2-G005", "q_groups", f"group {i} ({bits}-bit) has {rows} rows, not a multiple of "
                                                     f"{row_granule(bits)}")
        if rows > INT16_MAX:
            ok = False
            yield Violation("EXL2-G007", "q_groups", f"group {i} has {rows} rows, above the 16-bit limit {INT16_MAX}")
        groups.append(Group(index=i, bits=bits, row=row, rows=rows, qrow=qrow, qrows=qrows))
        row += rows
    if row != in_features:
        ok = False
        last = groups[-1].rows
        yield Violation("EXL2-G006", "q_groups", f"groups hold {row} rows but in_features is {in_features} (last "
                                                 f"group: {last} rows by its qrows, {in_features - (row - last)} by "
                                                 f"in_features)")
    return tuple(groups) if ok else None


def padded_columns(qw: torch.Tensor, qs: torch.Tensor, groups: tuple[Group, ...], n: int) -> Rules[None]:
    """Columns ``n .. N'-1`` hold their group's zero point (they decode to 0); their scale nibble
    is 0x0 or 0xF, the two values exllamav2 writes (spec 3.2)."""
    from .reference.packing import unpack_codes, unpack_scales  # the reference imports this module

    nibbles = unpack_scales(qs)[:, n:]
    if ((nibbles != 0x0) & (nibbles != 0xF)).any():
        yield Violation("EXL2-S004", "q_scale", f"padded columns {n}..{qw.shape[1] - 1} have scale nibbles other "
                                                f"than 0x0 and 0xF")
    for g in groups:
        codes = unpack_codes(qw[g.qrow:g.qrow + g.qrows, n:], g.bits)
        if (codes != zero_point(g.bits)).any():
            yield Violation("EXL2-S003", "q_weight", f"padded columns {n}..{qw.shape[1] - 1} of group {g.index} hold "
                                                     f"codes other than the zero point {zero_point(g.bits)}")
            return


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["Group", "LAYER_TENSORS", "OPTIONAL_TENSORS", "OWN_NAMES", "SEVERITY", "Violation", "group_table",
           "layer_keys", "layer_rules", "run"]
