"""Decoding (spec 6): bit-identical to a literal transliteration of exllamav2, a hand-computed
example, the subnormal group maximum, the permutation, and rejection of malformed layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from exl2 import FormatError, QMatrix
from exl2.format import WIDTHS
from exl2.reference import dequantize, matmul, pack
from exl2.reference.bounds import matmul_within_bound

from . import exllamav2_emulation as ex


@st.composite
def raw_layers(draw):
    """Codes, scale codes, float16 maxima, group plan and permutation, as exllamav2 would hold them."""
    widths = sorted(draw(st.sets(st.sampled_from(WIDTHS), min_size=1, max_size=3)), reverse=True)
    groups = []
    for b in widths:
        for _ in range(draw(st.integers(1, 2))):
            groups.append((b, draw(st.sampled_from([16, 32] if b == 2 else [32, 64]))))
    k = sum(n for _, n in groups)
    n_out = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    q = np.concatenate([rng.integers(0, 1 << b, (n, n_out)) for b, n in groups])
    qscale = rng.integers(1, 17, (len(groups), n_out))
    # float16 maxima spanning normal values and ones whose /256 is subnormal
    exps = rng.uniform(-14, 4, len(groups)) if draw(st.booleans()) else rng.uniform(-22, -14, len(groups))
    scale_max = (2.0 ** exps * rng.uniform(1, 2, len(groups))).astype(np.float16)
    invperm = rng.permutation(k)
    return q, qscale, scale_max, groups, invperm, n_out


def ours(q, qscale, scale_max, groups, invperm, n_out) -> QMatrix:
    rows, plan = 0, []
    for b, n in groups:
        plan.append((b, rows, n))
        rows += n
    return pack(torch.from_numpy(q), plan, torch.from_numpy(qscale), torch.from_numpy(scale_max),
                torch.from_numpy(invperm), n_out)


@given(raw_layers())
def test_packing_and_decoding_match_exllamav2(layer):
    q, qscale, scale_max, groups, invperm, n_out = layer
    theirs = ex.pack_layer(q, qscale, scale_max, groups, invperm)
    qm = ours(*layer)
    for name, t in theirs.items():
        assert np.array_equal(getattr(qm, name).numpy(), t), name
    expected = ex.reconstruct(theirs)
    got = dequantize(qm).numpy()
    assert np.array_equal(got.view(np.int16), expected.view(np.int16))


def test_hand_computed_example():
    # One 4-bit group of 32 rows then one 2-bit group of 16 rows, 32 columns (no padding), identity order.
    # 4-bit: every code 9 (0x99999999 per word), scale code 3 -> qs 4 -> (qs)^2 = 16, q_scale_max 256
    #   -> group max 1.0 -> scale 16; value (9 - 8) * 16 = 16.
    # 2-bit: codes alternate 0, 3 (word 0b11001100... = 0xCCCCCCCC), scale code 0 -> qs 1, q_scale_max 0.5
    #   -> group max 2^-9 -> scale 2^-9; values (0 - 2) * 2^-9 = -2^-8 and (3 - 2) * 2^-9 = 2^-9.
    u32 = lambda v: v - (1 << 32) if v >= 1 << 31 else v  # noqa: E731
    qm = QMatrix(
        q_weight=torch.tensor([[u32(0x99999999)] * 32] * 4 + [[u32(0xCCCCCCCC)] * 32], dtype=torch.int32),
        q_scale=torch.tensor([[0x33333333] * 4, [0] * 4], dtype=torch.int32),
        q_scale_max=torch.tensor([256.0, 0.5], dtype=torch.float16),
        q_groups=torch.tensor([4, 0, 2, 4], dtype=torch.int16),
        q_invperm=torch.arange(48, dtype=torch.int32),
    )
    b = dequantize(qm).to(torch.float64)
    assert b.shape == (48, 32)
    assert (b[:32] == 16).all()
    assert (b[32::2] == -(2.0**-8)).all() and (b[33::2] == 2.0**-9).all()


def test_subnormal_group_maximum_loses_bits_once():
    # q_scale_max = 1.5 * 2^-14 (normal float16); /256 = 1.5 * 2^-22, below the smallest float16
    # subnormal step 2^-24 by a factor 6: representable exactly as 6 * 2^-24. With q_scale_max =
    # (1 + 2^-10) * 2^-14, /256 = 2^-22 + 2^-32, which rounds to 2^-22 = 4 * 2^-24 (bits lost).
    for smax, group_max in [(1.5 * 2**-14, 6 * 2**-24), ((1 + 2**-10) * 2**-14, 4 * 2**-24)]:
        qm = pack(torch.full((16, 32), 3), [(2, 0, 16)], torch.full((1, 32), 1), torch.tensor([smax]),
                  torch.arange(16), 32)
        # code 3, zero point 2, qs 1: value = 1 * 1 * group_max, exactly representable
        assert (dequantize(qm).to(torch.float64) == group_max).all()


def test_permutation_places_stored_rows():
    k = 32
    codes = torch.arange(k)[:, None].repeat(1, 32) % 256  # stored row r holds code r (8-bit)
    invperm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    qm = pack(codes, [(8, 0, k)], torch.full((1, 32), 16), torch.tensor([256.0]), invperm, 32)
    b = dequantize(qm).to(torch.float64)
    # scale (16^2) * 1 = 256: value (code - 128) * 256; B[j] = stored[invperm[j]]
    assert torch.equal(b[:, 0], (invperm.to(torch.float64) - 128) * 256)


def test_matmul_within_bound():
    g = torch.Generator().manual_seed(0)
    qm = pack(torch.randint(0, 16, (64, 40), generator=g), [(4, 0, 64)], torch.randint(1, 17, (1, 40), generator=g),
              torch.tensor([0.02]), torch.randperm(64, generator=g), 40)
    qm.bias = torch.randn(40, generator=g).half()
    x = torch.randn(5, 64, generator=g).half()
    y = matmul(x, qm)
    b = dequantize(qm)[:, :40]
    y64 = x.double() @ b.double() + qm.bias.double()
    assert y.shape == (5, 40) and y.dtype == torch.float16
    assert matmul_within_bound(y, y64, x, b, qm.bias)
    # the bound is tight enough to catch a dropped bias
    assert not matmul_within_bound(y - qm.bias, y64, x, b, qm.bias)


def valid_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    qm = pack(torch.randint(0, 16, (96, 40), generator=g), [(4, 0, 64), (3, 64, 32)],
              torch.randint(1, 17, (2, 40), generator=g), torch.tensor([0.1, 0.2]), torch.randperm(96, generator=g), 40)
    return qm.to_tensors("layer")


@pytest.mark.parametrize("mutate, tensor", [
    (lambda t: t.pop("layer.q_scale"), "layer.q_scale"),
    (lambda t: t.__setitem__("layer.q_scale_max", t["layer.q_scale_max"].float()), "layer.q_scale_max"),
    (lambda t: t.__setitem__("layer.q_groups", torch.tensor([3, 0, 4, 8], dtype=torch.int16)), "layer.q_groups"),
    (lambda t: t.__setitem__("layer.q_groups", torch.tensor([4, 0, 3, 99], dtype=torch.int16)), "layer.q_groups"),
    (lambda t: t.__setitem__("layer.q_groups", torch.tensor([4, 0, 3, 6], dtype=torch.int16)), "layer.q_groups"),
    (lambda t: t["layer.q_invperm"].__setitem__(0, t["layer.q_invperm"][1]), "layer.q_invperm"),
    (lambda t: t.__setitem__("layer.q_scale", t["layer.q_scale"][:, :2]), "layer.q_scale"),
    (lambda t: t.__setitem__("layer.q_weight", t["layer.q_weight"][:, :40]), "layer.q_weight"),
])
def test_malformed_layers_are_refused(mutate, tensor):
    t = valid_tensors()
    mutate(t)
    with pytest.raises(FormatError) as e:
        QMatrix.from_tensors(t, "layer")
    assert e.value.tensor == tensor
