"""Bit-exactness of the reference codec against exllamav2 (spec 5, 6; conformance level 8.1).

Layers are built the way exllamav2's converter leaves them before ``AdaptiveGPTQ.pack``: int16
codes in act-order, int16 scale codes 1..16 per group and column, float16 maxima, ``(bits, 0)``
pairs in q_groups, one group size per width and a short last group. The literal transliteration
in :mod:`tests.exllamav2_emulation` packs and decodes them; the reference must produce the same
tensors, and the same float16 weights bit for bit (compared as int16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from exl2 import QMatrix
from exl2.reference import dequantize, pack_codes, pack_scales

from . import exllamav2_emulation as ex
from .raw_layers import RawLayer, build_layer, extreme_layer

KEY = "model.layers.0.mlp.down_proj"
WIDTHS = (8, 6, 5, 4, 3, 2)
MAX_K, MAX_N = 256, 96


@st.composite
def raw_layers(draw) -> RawLayer:
    widths = sorted(draw(st.sets(st.sampled_from(WIDTHS), min_size=1, max_size=4)), reverse=True)
    group_size = {b: draw(st.sampled_from([16, 32, 48, 64] if b == 2 else [32, 64, 96])) for b in widths}
    chosen, counts, k = [], [], 0
    for b in widths:  # as many groups of each width as fit in MAX_K rows; a width that does not fit is left out
        if k + group_size[b] > MAX_K:
            continue
        c = min(draw(st.integers(1, 3)), (MAX_K - k) // group_size[b])
        chosen.append(b)
        counts.append(c)
        k += c * group_size[b]
    widths = chosen
    last = widths[-1]
    granule = 16 if last == 2 else 32
    cut = granule * draw(st.integers(0, group_size[last] // granule - 1))  # a short last group
    n = draw(st.integers(1, MAX_N))
    return build_layer(widths, group_size, counts, cut, n, draw(st.integers(0, 2**32 - 1)), draw(st.booleans()))


def pack_by_exllamav2(layer: RawLayer) -> dict[str, np.ndarray]:
    return layer.pack_by_exllamav2(KEY)


def decode_by_exllamav2(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return ex.reconstruct(ex.make_q_matrix(ex.load_weight(tensors, KEY)))


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        mine = ours[name].numpy()
        assert mine.dtype == t.dtype and mine.shape == t.shape, name
        assert np.array_equal(mine.view(np.uint8), t.view(np.uint8)), name


def assert_bit_exact(layer: RawLayer) -> None:
    theirs = pack_by_exllamav2(layer)
    ours = layer.pack_by_reference()
    assert_same_tensors(ours.to_tensors(KEY), theirs)

    # the two packers on their own: pack_codes per group (padded columns at the zero point) and
    # pack_scales (nibbles qs - 1, padded with 0xF) against the CUDA kernels
    n = layer.qweight.shape[1]
    cols = -(-n // 32) * 32
    for bits, a, rows in layer.plan:
        padded = np.full((rows, cols), 1 << (bits - 1), dtype=np.int16)
        padded[:, :n] = layer.qweight[a:a + rows]
        expected = ex.pack_columns_kernel(padded, rows * bits // 32, bits)
        assert np.array_equal(pack_codes(torch.from_numpy(padded.astype(np.int64)), bits).numpy(), expected)
    nibbles = np.full((len(layer.plan), cols), 15)
    nibbles[:, :n] = layer.qscale - 1
    expected = ex.pack_rows_4_kernel(np.pad(layer.qscale, ((0, 0), (0, cols - n))))
    assert np.array_equal(pack_scales(torch.from_numpy(nibbles)).numpy(), expected)

    # decoding the file exllamav2 wrote
    qm = QMatrix.from_tensors({k: torch.from_numpy(v) for k, v in theirs.items()}, KEY)
    got = dequantize(qm).numpy()
    want = decode_by_exllamav2(theirs)
    assert got.shape == want.shape == (layer.qweight.shape[0], cols)
    assert np.array_equal(got.view(np.int16), want.view(np.int16))


@given(raw_layers())
def test_reference_matches_exllamav2(layer):
    assert_bit_exact(layer)


@pytest.mark.parametrize("n, with_bias", [(33, True), (96, False), (1, True)])
def test_every_width_in_one_layer(n, with_bias):
    # 8, 6, 5, 4, 3-bit groups of 32 rows and two 2-bit groups of 16: 192 rows, two kernel blocks of 128
    widths = list(WIDTHS)
    layer = build_layer(widths, {b: 16 if b == 2 else 32 for b in widths}, [1, 1, 1, 1, 1, 2], 0, n, 11, with_bias)
    assert_bit_exact(layer)


def test_group_straddles_kernel_block():
    # groups of 96 rows: the second starts at row 96 and runs over row 128, where reconstruct_kernel
    # starts a new block and looks its group up in the group map; last group cut short to 64 rows
    layer = build_layer([4, 3], {4: 96, 3: 96}, [2, 1], 32, 40, 5, False)
    assert layer.qweight.shape[0] == 256
    assert_bit_exact(layer)


def test_extreme_codes_and_scales():
    assert_bit_exact(extreme_layer())


@pytest.mark.parametrize("bits", WIDTHS)
def test_shuffle_then_dequant_reads_plain_bit_order(bits):
    # The claim that lets the emulation skip exllamav2's in-memory shuffle: shuffle_*bit_* followed
    # by dequant_*bit_* (qdq_*.cuh) hands out q_i - z in the order of the file's bit string.
    words_per_call, codes_per_call = {8: (2, 8), 6: (3, 16), 5: (5, 32), 4: (1, 8), 3: (3, 32), 2: (1, 16)}[bits]
    rng = np.random.default_rng(bits)
    for _ in range(200):
        words = [int(w) for w in rng.integers(0, 2**32, words_per_call, dtype=np.uint64)]
        plain = [int(v) for v in ex.dequant_plain(words, bits, codes_per_call)]
        assert ex.shuffle_and_dequant(words, bits) == plain
