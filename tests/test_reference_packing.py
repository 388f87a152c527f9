"""Packing (spec 5): round trips for every width, and the bit layout checked against plain
integer arithmetic on Python ints (independent of the code under test)."""

from __future__ import annotations

import random

import torch
from hypothesis import given
from hypothesis import strategies as st

from exl2.format import BLOCKS, WIDTHS
from exl2.reference import pack_codes, pack_scales, unpack_codes, unpack_scales


def block_words_by_hand(codes: list[int], bits: int, words: int) -> list[int]:
    """One column's block as a Python big integer: code i at bit i * bits, cut into 32-bit words."""
    string = sum(c << (i * bits) for i, c in enumerate(codes))
    return [(string >> (32 * w)) & 0xFFFFFFFF for w in range(words)]


@given(bits=st.sampled_from(WIDTHS), blocks=st.integers(1, 4), cols=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, blocks, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (blocks * BLOCKS[bits].rows, cols), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (blocks * BLOCKS[bits].words, cols)
    assert torch.equal(unpack_codes(packed, bits), codes)


@given(groups=st.integers(1, 5), words=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_scale_round_trip(groups, words, seed):
    g = torch.Generator().manual_seed(seed)
    nibbles = torch.randint(0, 16, (groups, 8 * words), generator=g)
    packed = pack_scales(nibbles)
    assert packed.shape == (groups, words) and packed.dtype == torch.int32
    assert torch.equal(unpack_scales(packed), nibbles)


def test_bit_layout_matches_integer_arithmetic():
    rng = random.Random(7)
    for bits in WIDTHS:
        b = BLOCKS[bits]
        cols = [[rng.randrange(1 << bits) for _ in range(b.rows)] for _ in range(3)]
        codes = torch.tensor(cols).T  # [rows, 3]
        packed = pack_codes(codes, bits)
        for j, col in enumerate(cols):
            expected = block_words_by_hand(col, bits, b.words)
            got = [int(v) & 0xFFFFFFFF for v in packed[:, j]]
            assert got == expected, bits


def test_three_bit_straddle():
    # Codes 10 and 21 of a 3-bit block straddle words: 10 * 3 = 30 -> bits 30..32, 21 * 3 = 63 -> bits 63..65.
    codes = [0] * 32
    codes[10] = 0b111
    codes[21] = 0b101
    packed = pack_codes(torch.tensor(codes)[:, None], 3)
    words = [int(v) & 0xFFFFFFFF for v in packed[:, 0]]
    assert words == [0b11 << 30, 0b1 | (0b1 << 31), 0b10]


def test_scale_nibble_positions():
    nibbles = torch.arange(16).reshape(1, 16)  # column j holds code j
    packed = pack_scales(nibbles)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0x76543210
    assert int(packed[0, 1]) & 0xFFFFFFFF == 0xFEDCBA98


def test_block_table():
    assert {b: (BLOCKS[b].rows, BLOCKS[b].words) for b in WIDTHS} == {
        8: (4, 1), 6: (16, 3), 5: (32, 5), 4: (8, 1), 3: (32, 3), 2: (16, 1)}


def test_spec_worked_example():
    # spec 5.2: one 3-bit column with c_i = i mod 8; the words computed by hand in the spec.
    packed = pack_codes(torch.tensor([i % 8 for i in range(32)])[:, None], 3)
    assert [int(v) & 0xFFFFFFFF for v in packed[:, 0]] == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]


def test_spec_worked_examples_6_and_5_bit():
    # spec 5.2: c_i = 63 - 4i (6-bit, straddles at codes 5 and 10), c_i = (7i + 1) mod 32 (5-bit)
    six = pack_codes(torch.tensor([63 - 4 * i for i in range(16)])[:, None], 6)
    assert [int(v) & 0xFFFFFFFF for v in six[:, 0]] == [0xEFCF7EFF, 0x76DF8E7A, 0x0C72CF4D]
    five = pack_codes(torch.tensor([(7 * i + 1) % 32 for i in range(32)])[:, None], 5)
    assert [int(v) & 0xFFFFFFFF for v in five[:, 0]] == [0xC9DB3D01, 0x571C1992, 0x7F1150F9, 0x0916E8D3, 0xD4D85F5E]
