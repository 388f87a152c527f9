"""Packing (spec 5): round trips for every width, and the bit layout checked against blocks built
by hand with Python integers (independent of the code under test)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from exl2.format import BLOCKS, WIDTHS
from exl2.reference import pack_codes, pack_scales, unpack_codes, unpack_scales

#: Rows and 32-bit words of one block per width (spec 5.1), written out rather than computed.
BLOCK_TABLE = {8: (4, 1), 6: (16, 3), 5: (32, 5), 4: (8, 1), 3: (32, 3), 2: (16, 1)}


def words_by_hand(codes: list[int], bits: int) -> list[int]:
    """One column's block: code i at bits i*bits .. i*bits + bits - 1 of one big little-endian
    integer, cut into 32-bit words."""
    rows, words = BLOCK_TABLE[bits]
    assert len(codes) == rows
    string = sum(c << (bits * i) for i, c in enumerate(codes))
    assert string < 1 << (32 * words)  # the block fills its words exactly
    return [(string >> (32 * w)) & 0xFFFFFFFF for w in range(words)]


def unsigned(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in t.reshape(-1).tolist()]


def test_block_table():
    assert {b: (BLOCKS[b].rows, BLOCKS[b].words) for b in WIDTHS} == BLOCK_TABLE


@given(bits=st.sampled_from(WIDTHS), blocks=st.integers(1, 5), cols=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_codes_round_trip(bits, blocks, cols, seed):
    rows, words = BLOCK_TABLE[bits]
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (blocks * rows, cols), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (blocks * words, cols)
    assert torch.equal(unpack_codes(packed, bits), codes)


@given(bits=st.sampled_from(WIDTHS), seed=st.integers(0, 2**32 - 1))
def test_words_round_trip(bits, seed):
    # every 32-bit pattern is a valid block: unpack then pack gives the words back
    rows, words = BLOCK_TABLE[bits]
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(-2**31, 2**31, (3 * words, 7), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack_codes(unpack_codes(packed, bits), bits), packed)


@given(groups=st.integers(1, 6), words=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_scale_nibbles_round_trip(groups, words, seed):
    g = torch.Generator().manual_seed(seed)
    nibbles = torch.randint(0, 16, (groups, 8 * words), generator=g)
    packed = pack_scales(nibbles)
    assert packed.dtype == torch.int32 and packed.shape == (groups, words)
    assert torch.equal(unpack_scales(packed), nibbles)


@pytest.mark.parametrize("bits", WIDTHS)
def test_bit_layout_by_hand(bits):
    rows, words = BLOCK_TABLE[bits]
    rng = random.Random(bits)
    # four columns: random codes, all ones (every bit set), alternating extremes, a single code set
    columns = [
        [rng.randrange(1 << bits) for _ in range(rows)],
        [(1 << bits) - 1] * rows,
        [(1 << bits) - 1 if i % 2 else 0 for i in range(rows)],
        [(1 << bits) - 1 if i == rows // 2 + 1 else 0 for i in range(rows)],
    ]
    # two blocks stacked: block 2 is block 1 reversed, so the second block's words are checked too
    codes = torch.tensor([col + col[::-1] for col in columns]).T  # [2 * rows, 4]
    packed = pack_codes(codes, bits)
    for j, col in enumerate(columns):
        expected = words_by_hand(col, bits) + words_by_hand(col[::-1], bits)
        assert unsigned(packed[:, j]) == expected, (bits, j)


def test_three_bit_block_by_hand():
    # 3-bit codes c_i = i mod 8: the string sum(c_i << 3i) cut into three words, written out
    # bit by bit: code 10 straddles words 0/1 (bits 30..32), code 21 words 1/2 (bits 63..65).
    codes = [i % 8 for i in range(32)]
    string = 0
    for i, c in enumerate(codes):
        for b in range(3):
            if c >> b & 1:
                string |= 1 << (3 * i + b)
    expected = [string & 0xFFFFFFFF, (string >> 32) & 0xFFFFFFFF, string >> 64]
    assert unsigned(pack_codes(torch.tensor(codes)[:, None], 3)) == expected
    # spec 5.2's worked example
    assert expected == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]


def test_spec_worked_examples_6_and_5_bit():
    # spec 5.2: c_i = 63 - 4i (6-bit, straddles at codes 5 and 10), c_i = (7i + 1) mod 32 (5-bit)
    six = pack_codes(torch.tensor([63 - 4 * i for i in range(16)])[:, None], 6)
    assert unsigned(six) == [0xEFCF7EFF, 0x76DF8E7A, 0x0C72CF4D]
    five = pack_codes(torch.tensor([(7 * i + 1) % 32 for i in range(32)])[:, None], 5)
    assert unsigned(five) == [0xC9DB3D01, 0x571C1992, 0x7F1150F9, 0x0916E8D3, 0xD4D85F5E]


def test_straddling_codes_land_in_both_words():
    codes = [0] * 32
    codes[10] = 0b111  # bits 30, 31 | 32
    codes[21] = 0b101  # bit 63 | 65
    assert unsigned(pack_codes(torch.tensor(codes)[:, None], 3)) == [0b11 << 30, 0b1 | (0b1 << 31), 0b10]
    codes = [0] * 16
    codes[5] = 0b110101  # 6-bit code 5 at bits 30..35: low 2 bits in word 0, high 4 in word 1
    assert unsigned(pack_codes(torch.tensor(codes)[:, None], 6)) == [0b01 << 30, 0b1101, 0]


def test_scale_nibble_positions_by_hand():
    rng = random.Random(1)
    nibbles = [[rng.randrange(16) for _ in range(24)] for _ in range(2)]
    packed = pack_scales(torch.tensor(nibbles))
    for g, row in enumerate(nibbles):
        expected = [sum(row[8 * w + j] << (4 * j) for j in range(8)) for w in range(3)]
        assert unsigned(packed[g]) == expected
    assert unsigned(pack_scales(torch.arange(16)[None])) == [0x76543210, 0xFEDCBA98]


def test_columns_are_independent():
    # changing one column's codes changes only that column's words
    g = torch.Generator().manual_seed(0)
    for bits in WIDTHS:
        codes = torch.randint(0, 1 << bits, (2 * BLOCK_TABLE[bits][0], 5), generator=g)
        before = pack_codes(codes, bits)
        codes[:, 2] = (1 << bits) - 1 - codes[:, 2]
        after = pack_codes(codes, bits)
        changed = (before != after).any(dim=0).tolist()
        assert changed == [False, False, True, False, False]
