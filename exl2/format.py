"""Constants of the EXL2 format (spec/exl2.md, sections 3 to 5).

Everything here is a fact of the file format, not of an implementation: the set of bit
widths, their order, the block table of the q_weight bit layout and the 16-bit limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bit widths a group may use, in the order groups must appear in ``q_groups``
#: (non-increasing; spec 4.2).
WIDTHS: tuple[int, ...] = (8, 6, 5, 4, 3, 2)

#: Bits per 4-bit scale code in ``q_scale`` (spec 5.3).
SCALE_BITS = 4

#: Columns of ``q_weight`` / ``q_scale`` are padded to a multiple of this (spec 3.2).
COLUMN_PAD = 32

#: Largest value an int16 field can hold; offsets, row counts and permutation entries must
#: stay within it (spec 4.5).
INT16_MAX = 32767

#: Largest in_features: exllamav2 narrows q_perm / q_invperm to 16 bits and reads them as
#: uint16, so entries go up to 65535 (spec 4.5).
MAX_IN_FEATURES = 65536


@dataclass(frozen=True)
class Block:
    """One block of the q_weight bit layout: ``rows`` codes of ``bits`` bits fill ``words`` words.

    A block is the smallest run of rows whose bits fill whole 32-bit words:
    ``rows = 32 / gcd(32, bits)``, ``words = rows * bits / 32`` (spec 5.1).
    """

    bits: int
    rows: int
    words: int


def block(bits: int) -> Block:
    """The block of ``bits``-bit codes (8: 4 rows in 1 word, 6: 16 in 3, 5: 32 in 5, 4: 8 in 1,
    3: 32 in 3, 2: 16 in 1)."""
    if bits not in WIDTHS:
        raise ValueError(f"bit width {bits} is not one of {WIDTHS}")
    rows = 32 // math.gcd(32, bits)
    return Block(bits=bits, rows=rows, words=rows * bits // 32)


BLOCKS: dict[int, Block] = {b: block(b) for b in WIDTHS}


def zero_point(bits: int) -> int:
    """Code that decodes to 0: 2^(bits-1) (spec 6.3)."""
    return 1 << (bits - 1)


def row_granule(bits: int) -> int:
    """Row counts of a ``bits``-bit group must be a multiple of this: exllamav2's kernels walk
    32 rows at a time, 16 for 2-bit groups (spec 4.4)."""
    return 16 if bits == 2 else 32


def padded_columns(out_features: int) -> int:
    """out_features rounded up to a multiple of 32 (spec 3.2)."""
    return -(-out_features // COLUMN_PAD) * COLUMN_PAD
