"""Decoding (spec 6): hand-built layers whose float16 values are worked out by hand in the
comments, the float16 subnormal path with exact bit patterns, the permutation, the product, and
the structural checks of QMatrix / GroupTable (FormatError naming the tensor)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from exl2 import FormatError, QMatrix
from exl2.qmatrix import GroupTable
from exl2.reference import dequantize, matmul, pack
from exl2.reference.bounds import matmul_tolerance, matmul_within_bound


def i32(words: list[int]) -> list[int]:
    """Unsigned 32-bit words as the int32 values the file stores."""
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def f16_bits(*bits: int) -> torch.Tensor:
    return torch.tensor(np.array(bits, dtype=np.uint16).view(np.float16))


def as_bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint16)


# -- a hand-written layer: a 4-bit group of 32 rows, then a 2-bit group of 16 rows, N = 32 ----------

# 4-bit group, q_weight rows 0..3, the same four words in every column:
#   0x76543210 -> rows 0..7 hold codes 0..7, 0xFEDCBA98 -> rows 8..15 codes 8..15,
#   0x99999999 -> rows 16..23 code 9, 0x00000000 -> rows 24..31 code 0.
# 2-bit group, q_weight row 4: 0xE4E4E4E4, bytes 0b11_10_01_00 -> rows 32..47 codes 0, 1, 2, 3, 0, 1, ...
Q_WEIGHT = [i32([0x76543210] * 32), i32([0xFEDCBA98] * 32), i32([0x99999999] * 32), [0] * 32, i32([0xE4E4E4E4] * 32)]
# group 0: column j has nibble j % 16 (words 0x76543210, 0xFEDCBA98 repeated); group 1: nibble 0
Q_SCALE = [i32([0x76543210, 0xFEDCBA98] * 2), [0] * 4]
# group 0: 256 / 256 = 1; group 1: 0.5 / 256 = 2^-9
Q_SCALE_MAX = [256.0, 0.5]
Q_GROUPS = [4, 0, 2, 4]


def hand_layer(q_invperm: list[int]) -> QMatrix:
    return QMatrix(
        q_weight=torch.tensor(Q_WEIGHT, dtype=torch.int32),
        q_scale=torch.tensor(Q_SCALE, dtype=torch.int32),
        q_scale_max=torch.tensor(Q_SCALE_MAX, dtype=torch.float16),
        q_groups=torch.tensor(Q_GROUPS, dtype=torch.int16),
        q_invperm=torch.tensor(q_invperm, dtype=torch.int32),
    )


def hand_value(stored_row: int, column: int) -> float:
    """The decoded value of stored row ``stored_row``, column ``column``, reasoned out from the
    words above: value = (code - 2^(b-1)) * (nibble + 1)^2 * q_scale_max / 256."""
    if stored_row < 32:  # 4-bit, zero point 8, scale (j % 16 + 1)^2 * 1
        code = stored_row if stored_row < 16 else (9 if stored_row < 24 else 0)
        return (code - 8) * (column % 16 + 1) ** 2
    code = (stored_row - 32) % 4  # 2-bit, zero point 2, scale 1 * 2^-9
    return (code - 2) * 2.0**-9


def test_hand_example_identity_order():
    b = dequantize(hand_layer(list(range(48))))
    assert b.dtype == torch.float16 and b.shape == (48, 32)
    # every value is a small integer times a power of two: exact in float16, so == is right
    expected = torch.tensor([[hand_value(r, j) for j in range(32)] for r in range(48)], dtype=torch.float64)
    assert torch.equal(b.to(torch.float64), expected)
    # spot checks written out: row 9 (code 9), column 3 (nibble 3, scale 16): (9 - 8) * 16
    assert b[9, 3].item() == 16.0
    # row 0 (code 0), column 15 (nibble 15, scale 256): -8 * 256
    assert b[0, 15].item() == -2048.0
    # row 32 (2-bit code 0): -2 * 2^-9; row 35 (code 3): 2^-9
    assert b[32, 7].item() == -(2.0**-8) and b[35, 7].item() == 2.0**-9


def test_hand_example_permutation():
    # q_invperm[j] = (j + 5) mod 48: input feature j is stored row j + 5, so B[j] = stored[(j + 5) % 48]
    # (spec 6.4: stored row k lands in row q_perm[k], q_perm = argsort(q_invperm)).
    b = dequantize(hand_layer([(j + 5) % 48 for j in range(48)]))
    expected = torch.tensor([[hand_value((j + 5) % 48, c) for c in range(32)] for j in range(48)], dtype=torch.float64)
    assert torch.equal(b.to(torch.float64), expected)


# -- float16 subnormals: exact bit patterns worked out by hand ------------------------------------

# Two 4-bit groups of 32 rows, every column with scale nibble 14 (qs = 15, qs^2 = 225), 32 columns.
#
# group 0: q_scale_max bits 0x0580 = 1.375 * 2^-14. /256 = 5.5 * 2^-24: half-way between the
#   subnormals 5 and 6 * 2^-24, ties to even -> 6 * 2^-24 (bits 0x0006).
#   scale = 225 * 6 = 1350 * 2^-24, in [1024, 2048) * 2^-24 (exponent field 1, step 1): exact,
#   bits 0x0400 | (1350 - 1024) = 0x0546.
#   codes of rows 0..3: 15, 0, 11, 13 (q - 8 = 7, -8, 3, 5); word 0 = 0x8888DB0F, the rest code 8.
#     7 * 1350 = 9450: in [8192, 16384) the step is 8, 9450 / 8 = 1181.25 -> 1181 * 8 = 9448:
#       exponent field 4, mantissa (9448 - 8192) / 8 = 157 -> 0x1000 | 0x09D = 0x109D
#     -8 * 1350 = -10800 = -1350 * 8: exact, exponent field 4, mantissa 326 -> 0x9146
#     3 * 1350 = 4050: step 2 in [2048, 4096), even, exact: field 2, mantissa 1001 -> 0x0BE9
#     5 * 1350 = 6750: step 4, 6750 / 4 = 1687.5 ties to even 1688 -> 6752: field 3, mantissa 664 -> 0x0E98
#     code 8: 0 * scale = +0 -> 0x0000
# group 1: q_scale_max bits 0x0980 = 1.375 * 2^-13; /256 = 11 * 2^-24 exactly (bits 0x000B).
#   scale = 225 * 11 = 2475: step 2 in [2048, 4096), 1237.5 ties to even 1238 -> 2476: field 2,
#   mantissa (2476 - 2048) / 2 = 214 -> 0x08D6.
#   codes of rows 32, 33: 9, 5 (q - 8 = 1, -3); word 0 = 0x88888859.
#     1 * 2476 = 2476 -> 0x08D6
#     -3 * 2476 = -7428: step 4, 1857 exact: field 3, mantissa (7428 - 4096) / 4 = 833 -> 0x8F41
SUBNORMAL_EXPECTED = {0: 0x109D, 1: 0x9146, 2: 0x0BE9, 3: 0x0E98, 32: 0x08D6, 33: 0x8F41}


def test_subnormal_group_maximum_exact_bits():
    eights = 0x88888888
    qm = QMatrix(
        q_weight=torch.tensor([i32([w] * 32) for w in [0x8888DB0F, eights, eights, eights,
                                                        0x88888859, eights, eights, eights]], dtype=torch.int32),
        q_scale=torch.tensor([i32([0xEEEEEEEE] * 4)] * 2, dtype=torch.int32),
        q_scale_max=f16_bits(0x0580, 0x0980),
        q_groups=torch.tensor([4, 0, 4, 4], dtype=torch.int16),
        q_invperm=torch.arange(64, dtype=torch.int32),
    )
    bits = as_bits(dequantize(qm))
    for row in range(64):
        want = SUBNORMAL_EXPECTED.get(row, 0x0000)
        assert (bits[row] == want).all(), (row, hex(int(bits[row, 0])), hex(want))


def test_group_maximum_that_underflows_to_zero():
    # q_scale_max = 2^-24 (bits 0x0001, the smallest subnormal): /256 = 2^-32 rounds to +0, so every
    # scale is +0 and every weight is (q - z) * +0: +0 (0x0000) for q >= z, -0 (0x8000) for q < z.
    # 2-bit group of 16 rows, codes 0, 1, 2, 3 repeating (0xE4E4E4E4).
    qm = QMatrix(
        q_weight=torch.tensor([i32([0xE4E4E4E4] * 32)], dtype=torch.int32),
        q_scale=torch.tensor([i32([0xFFFFFFFF] * 4)], dtype=torch.int32),
        q_scale_max=f16_bits(0x0001),
        q_groups=torch.tensor([2, 0], dtype=torch.int16),
        q_invperm=torch.arange(16, dtype=torch.int32),
    )
    bits = as_bits(dequantize(qm))
    assert (bits[0::4] == 0x8000).all() and (bits[1::4] == 0x8000).all()
    assert (bits[2::4] == 0x0000).all() and (bits[3::4] == 0x0000).all()


def test_padded_columns_decode_to_zero():
    # out_features 40 -> 64 columns; columns 40..63 hold the zero point (code 8) and nibble 0xF
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, (4, 64), dtype=np.uint64)
    words[:, 40:] = 0x88888888
    qm = QMatrix(q_weight=torch.tensor(i32(words.reshape(-1).tolist()), dtype=torch.int32).reshape(4, 64),
                 q_scale=torch.tensor([i32([0x12345678] * 5 + [0xFFFFFFFF] * 3)], dtype=torch.int32),
                 q_scale_max=torch.tensor([3.0], dtype=torch.float16),
                 q_groups=torch.tensor([4, 0], dtype=torch.int16),
                 q_invperm=torch.arange(32, dtype=torch.int32),
                 bias=torch.zeros(64, dtype=torch.float16), out_features=40)
    b = dequantize(qm)
    assert qm.out_features == 40 and b.shape == (32, 64)
    assert (as_bits(b)[:, 40:] == 0).all()


# -- the product --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matmul_is_x_times_b_plus_bias(dtype):
    qm = hand_layer([(7 * j) % 48 for j in range(48)])  # 7 is prime to 48: a permutation
    g = torch.Generator().manual_seed(0)
    qm = dataclasses.replace(qm, bias=torch.randn(32, generator=g).to(torch.float16))
    x = (torch.randn(3, 5, 48, generator=g) * 0.1).to(dtype)
    y = matmul(x, qm)
    assert y.shape == (3, 5, 32) and y.dtype == dtype
    b = torch.tensor([[hand_value((7 * j) % 48, c) for c in range(32)] for j in range(48)], dtype=torch.float64)
    y64 = x.to(torch.float64) @ b + qm.bias.to(torch.float64)
    b16 = b.to(torch.float16)
    assert matmul_within_bound(y, y64, x, b16, qm.bias)
    # the bound is tight enough to notice a dropped bias or an unpermuted B
    assert not matmul_within_bound(y - qm.bias.to(dtype), y64, x, b16, qm.bias)
    y_wrong = (x.to(torch.float64) @ b[torch.randperm(48, generator=g)] + qm.bias.to(torch.float64)).to(dtype)
    assert not matmul_within_bound(y_wrong, y64, x, b16, qm.bias)
    assert (matmul_tolerance(x, b16, qm.bias) > 0).all()


def test_matmul_drops_padded_columns_and_checks_width():
    qm = hand_layer(list(range(48)))
    with pytest.raises(FormatError, match="EXL2-S003"):  # its columns 20.. are not the zero point
        dataclasses.replace(qm, out_features=20)
    qm = pack(torch.full((48, 20), 3), [(4, 0, 32), (2, 32, 16)], torch.full((2, 20), 16), torch.ones(2),
              torch.arange(48), 20, bias=torch.ones(20))
    assert qm.bias.shape == (32,) and qm.output_bias.shape == (20,)
    assert matmul(torch.ones(2, 48), qm).shape == (2, 20)
    with pytest.raises(ValueError):
        matmul(torch.ones(2, 47), qm)


# -- malformed layers ---------------------------------------------------------------------------


def valid_tensors() -> dict[str, torch.Tensor]:
    """A valid layer ``layer``: 4-bit group of 64 rows (8 qrows), 3-bit group of 32 rows (3 qrows),
    40 output features padded to 64, with bias."""
    g = torch.Generator().manual_seed(1)
    return {
        "layer.q_weight": torch.randint(-2**31, 2**31, (11, 64), generator=g, dtype=torch.int64).to(torch.int32),
        "layer.q_scale": torch.randint(-2**31, 2**31, (2, 8), generator=g, dtype=torch.int64).to(torch.int32),
        "layer.q_scale_max": torch.tensor([0.1, 0.2], dtype=torch.float16),
        "layer.q_groups": torch.tensor([4, 0, 3, 8], dtype=torch.int16),
        "layer.q_invperm": torch.randperm(96, generator=g).to(torch.int32),
        "layer.bias": torch.zeros(64, dtype=torch.float16),
    }


def test_valid_tensors_are_accepted():
    qm = QMatrix.from_tensors(valid_tensors(), "layer")  # out_features unknown: the padded width
    assert (qm.in_features, qm.out_features, qm.out_features_padded) == (96, 64, 64)
    assert [(g.bits, g.row, g.rows, g.qrow, g.qrows) for g in qm.groups] == [(4, 0, 64, 0, 8), (3, 64, 32, 8, 3)]


def put(name: str, value):
    return lambda t: t.__setitem__(name, value)


MALFORMED = {
    "missing q_scale": (lambda t: t.pop("layer.q_scale"), "layer.q_scale"),
    "missing q_invperm": (lambda t: t.pop("layer.q_invperm"), "layer.q_invperm"),
    "q_scale_max float32": (lambda t: t.__setitem__("layer.q_scale_max", t["layer.q_scale_max"].float()),
                            "layer.q_scale_max"),
    "q_weight int64": (lambda t: t.__setitem__("layer.q_weight", t["layer.q_weight"].long()), "layer.q_weight"),
    "q_groups int32": (put("layer.q_groups", torch.tensor([4, 0, 3, 8], dtype=torch.int32)), "layer.q_groups"),
    "bias float32": (put("layer.bias", torch.zeros(64)), "layer.bias"),
    "widths increase": (put("layer.q_groups", torch.tensor([3, 0, 4, 3], dtype=torch.int16)), "layer.q_groups"),
    "width 7": (put("layer.q_groups", torch.tensor([7, 0, 3, 8], dtype=torch.int16)), "layer.q_groups"),
    "offset past q_weight": (put("layer.q_groups", torch.tensor([4, 0, 3, 11], dtype=torch.int16)), "layer.q_groups"),
    "first offset not 0": (put("layer.q_groups", torch.tensor([4, 1, 3, 8], dtype=torch.int16)), "layer.q_groups"),
    "offsets decrease": (lambda t: t.update({"layer.q_groups": torch.tensor([4, 0, 3, 8, 3, 5], dtype=torch.int16),
                                             "layer.q_scale": torch.zeros(3, 8, dtype=torch.int32),
                                             "layer.q_scale_max": torch.ones(3, dtype=torch.float16)}),
                         "layer.q_groups"),
    "odd q_groups": (lambda t: t.update({"layer.q_groups": torch.tensor([4, 0, 3], dtype=torch.int16),
                                         "layer.q_scale": t["layer.q_scale"][:1],
                                         "layer.q_scale_max": t["layer.q_scale_max"][:1]}), "layer.q_groups"),
    # last group: 3 qrows hold 32 rows, but in_features 80 leaves 16 for it
    "last group mismatch": (put("layer.q_invperm", torch.arange(80, dtype=torch.int32)), "layer.q_groups"),
    "q_invperm repeats": (lambda t: t["layer.q_invperm"].__setitem__(0, t["layer.q_invperm"][1]), "layer.q_invperm"),
    "q_invperm out of range": (lambda t: t["layer.q_invperm"].__setitem__(0, 96), "layer.q_invperm"),
    "q_scale too narrow": (lambda t: t.__setitem__("layer.q_scale", t["layer.q_scale"][:, :7]), "layer.q_scale"),
    "q_scale one group short": (lambda t: t.__setitem__("layer.q_scale", t["layer.q_scale"][:1]), "layer.q_scale"),
    "q_scale_max shape": (put("layer.q_scale_max", torch.tensor([0.1, 0.2, 0.3], dtype=torch.float16)),
                          "layer.q_scale_max"),
    "columns not padded": (lambda t: t.__setitem__("layer.q_weight", t["layer.q_weight"][:, :40]), "layer.q_weight"),
    "bias too long": (put("layer.bias", torch.zeros(65, dtype=torch.float16)), "layer.bias"),
    "q_perm not inverse": (put("layer.q_perm", torch.arange(96, dtype=torch.int32)), "layer.q_perm"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_layer_is_refused_naming_the_tensor(case):
    mutate, tensor = MALFORMED[case]
    t = valid_tensors()
    mutate(t)
    with pytest.raises(FormatError) as e:
        QMatrix.from_tensors(t, "layer")
    assert e.value.tensor == tensor
    assert tensor in e.value.one_line() and "\n" not in e.value.one_line()


@pytest.mark.parametrize("q_groups, num_qrows, in_features", [
    ([4, 0, 3, 8], 11, 80),  # last group short of in_features
    ([2, 0, 4, 1], 9, 80),  # widths increase
    ([4, 0, 4, 0], 8, 64),  # repeated offset
    ([4, 0, 3, 9], 11, 96),  # 3-bit group of 2 qrows: not whole 3-word blocks
    ([4, 0], 1, 8),  # 8 rows: not a multiple of 32
    ([2, 0], 1, 16),  # 16-row 2-bit group: fine
])
def test_group_table_rules(q_groups, num_qrows, in_features):
    table = torch.tensor(q_groups, dtype=torch.int16)
    if (q_groups, num_qrows, in_features) == ([2, 0], 1, 16):
        assert [(g.bits, g.rows) for g in GroupTable.decode(table, num_qrows, in_features)] == [(2, 16)]
        return
    with pytest.raises(FormatError) as e:
        GroupTable.decode(table, num_qrows, in_features)
    assert e.value.tensor == "q_groups"
