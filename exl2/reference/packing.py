"""Packing of codes into 32-bit words (spec 5).

One rule serves every width, for q_weight and q_scale alike: along the packed axis, the codes of
one block are laid end to end as a little-endian bit string, code ``i`` of the block at bit
offset ``i * bits``, and the string is cut into 32-bit words, word ``w`` holding bits
``32 * w .. 32 * w + 31``. A code may straddle two words.

- q_weight packs along rows (axis 0), each column on its own, blocks from :data:`exl2.format.BLOCKS`.
- q_scale packs 4-bit codes along columns (axis 1): a block of 8 columns in 1 word.

Packing works on int64 tensors internally so that shifts and masks are exact, and returns the
file's dtype (int32, whose bit pattern is the unsigned word); unpacking reads the int32 words as
they are (see :func:`unpack_bits`).
"""

from __future__ import annotations

import torch

from ..format import BLOCKS, SCALE_BITS


def _shift(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """``x << amount`` where amount >= 0, ``x >> -amount`` where negative; shifts of 64 or more
    give 0 (like exllamav2's ``wshift``). ``x`` holds non-negative values below 2^32."""
    left = torch.bitwise_left_shift(x, amount.clamp(0, 63))
    right = torch.bitwise_right_shift(x, (-amount).clamp(0, 63))
    return torch.where(amount >= 0, left, right)


def _offsets(rows: int, words: int, bits: int, device: torch.device) -> torch.Tensor:
    """``[words, rows]`` table of ``i * bits - 32 * w``: how far code ``i`` is shifted to land
    in word ``w``."""
    i = torch.arange(rows, device=device, dtype=torch.int64)
    w = torch.arange(words, device=device, dtype=torch.int64)
    return i[None, :] * bits - 32 * w[:, None]


def pack_bits(codes: torch.Tensor, bits: int, rows: int, words: int) -> torch.Tensor:
    """Pack ``codes`` ``[n * rows, C]`` (values in ``[0, 2^bits)``) into int32 words
    ``[n * words, C]``, block by block along axis 0."""
    n = codes.shape[0] // rows
    if n * rows != codes.shape[0]:
        raise ValueError(f"{codes.shape[0]} rows is not a whole number of {rows}-row blocks")
    c = codes.to(torch.int64).reshape(n, 1, rows, -1)
    shift = _offsets(rows, words, bits, codes.device)[None, :, :, None]
    # Each code contributes the part of itself that falls inside the word; the parts are
    # disjoint bit ranges, so summing them is the same as OR-ing them.
    parts = _shift(c, shift) & 0xFFFFFFFF
    packed = parts.sum(dim=2)  # [n, words, C]
    return _to_int32(packed.reshape(n * words, -1))


def unpack_bits(packed: torch.Tensor, bits: int, rows: int, words: int,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words ``[n * words, C]`` to codes ``[n * rows, C]``
    (``dtype``, int64 unless asked otherwise).

    Code ``i`` of a block starts at bit ``o = i * bits``: in word ``o // 32`` at shift ``o % 32``,
    and when ``o % 32 + bits > 32`` it continues in the next word (a straddling code).

    Works on the int32 words directly, one code position of the block at a time across all blocks
    and columns: an arithmetic right shift followed by a mask keeps exactly the code's bits, so no
    int64 copy of the words is needed."""
    n = packed.shape[0] // words
    if n * words != packed.shape[0]:
        raise ValueError(f"{packed.shape[0]} words is not a whole number of {words}-word blocks")
    p = packed.to(torch.int32).reshape(n, words, -1)
    codes = torch.empty((n, rows, p.shape[-1]), dtype=torch.int32, device=packed.device)
    for i in range(rows):
        word, shift = divmod(i * bits, 32)
        code = codes[:, i]
        torch.bitwise_right_shift(p[:, word], shift, out=code)
        low_bits = min(bits, 32 - shift)  # the bits of the code that lie in this word
        code.bitwise_and_((1 << low_bits) - 1)
        if low_bits < bits:  # only 3-, 5- and 6-bit blocks have codes that cross a word boundary
            high = p[:, word + 1] & ((1 << (bits - low_bits)) - 1)
            code.bitwise_or_(high << low_bits)
    return codes.reshape(n * rows, -1).to(dtype)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """q_weight words ``[rows * bits / 32, C]`` of one group from its codes ``[rows, C]``.

    ``rows`` must be a whole number of blocks of the width (spec 5.1)."""
    b = BLOCKS[bits]
    return pack_bits(codes, bits, b.rows, b.words)


def unpack_codes(words: torch.Tensor, bits: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Codes ``[qrows * 32 / bits, C]`` (``dtype``, int64 by default) of one group from its
    q_weight words ``[qrows, C]``."""
    b = BLOCKS[bits]
    return unpack_bits(words, bits, b.rows, b.words, dtype)


def pack_scales(codes: torch.Tensor) -> torch.Tensor:
    """q_scale ``[G, C / 8]`` int32 from 4-bit scale codes ``[G, C]`` (values 0..15; spec 5.3).

    Column ``j`` sits at bits ``4 * (j % 8)`` of word ``j // 8``: the same little-endian rule
    as q_weight, applied along columns."""
    return pack_bits(codes.T, SCALE_BITS, 8, 1).T.contiguous()


def unpack_scales(q_scale: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes ``[G, C]`` (int64, 0..15) from q_scale ``[G, C / 8]``."""
    return unpack_bits(q_scale.T, SCALE_BITS, 8, 1).T.contiguous()
