"""Layers as exllamav2's converter holds them just before ``AdaptiveGPTQ.pack``
(``exllamav2/conversion/adaptivegptq.py``): int16 codes in act-order, int16 scale codes 1..16
per group and column, float16 maxima, ``(bits, 0)`` pairs in q_groups, one group size per width
and a short last group. Built from numpy; packed either by exllamav2's ``pack`` flow
(:mod:`tests.exllamav2_emulation`, with the transliterated kernels or, in
``benchmarks/golden_fixtures.py``, exllamav2's own) or by exl2's reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RawLayer:
    """A layer as exllamav2's quantizer holds it just before ``pack``."""

    qweight: np.ndarray  # int16 [K, N] codes, act-order rows
    qscale: np.ndarray  # int16 [G, N], 1..16
    qscale_max: np.ndarray  # float16 [G]
    qgroups: np.ndarray  # int16 [2G], (bits, 0) pairs
    group_size: dict[int, int]
    invperm: np.ndarray  # int32 [K]
    bias: np.ndarray | None  # float16 [N]

    @property
    def plan(self) -> list[tuple[int, int, int]]:
        """(bits, first row, rows) per group, cut as ``pack`` cuts them: min(group_size, rows left)."""
        out, row = [], 0
        for bits in self.qgroups[0::2].tolist():
            n = min(self.group_size[bits], self.qweight.shape[0] - row)
            out.append((bits, row, n))
            row += n
        return out

    def pack_by_exllamav2(self, key: str, **kernels) -> dict[str, np.ndarray]:
        """The tensors ``AdaptiveGPTQ.pack`` writes under ``key``; ``kernels`` may name other
        ``pack_columns`` / ``pack_rows_4`` functions than the transliterated ones."""
        from . import exllamav2_emulation as ex

        return ex.adaptive_gptq_pack(key, self.qweight.copy(), self.qscale.copy(), self.qscale_max.copy(),
                                     self.qgroups.copy(), self.group_size, self.invperm,
                                     None if self.bias is None else self._padded_bias(), **kernels)

    def _padded_bias(self) -> np.ndarray:
        # exllamav2's loader takes only a bias of N' entries (make_q_matrix; spec 3.3), so the bias a
        # loadable file holds is the layer's, padded with zeros to N'
        return np.pad(self.bias, (0, -self.bias.shape[0] % 32))

    def pack_by_reference(self):
        """The same layer packed by exl2's reference (:func:`exl2.reference.pack`), a QMatrix."""
        import torch

        from exl2.reference import pack

        return pack(torch.from_numpy(self.qweight.astype(np.int64)), self.plan,
                    torch.from_numpy(self.qscale.astype(np.int64)), torch.from_numpy(self.qscale_max),
                    torch.from_numpy(self.invperm), self.qweight.shape[1],
                    None if self.bias is None else torch.from_numpy(self.bias))


#: Binary exponents of random group maxima: the whole float16 range (the default: normal maxima,
#: ones whose /256 is a float16 subnormal, i.e. below 2^-6, float16 subnormals whose /256 rounds
#: to 0), and the range of real layers (about 6e-5 to 0.25, most of them subnormal after /256),
#: where products stay far from float16 overflow.
FULL_RANGE = (-24, 6)
REALISTIC = (-14, -2)


def random_scale_max(rng: np.random.Generator, g: int, exponents: tuple[int, int] = FULL_RANGE) -> np.ndarray:
    """float16 maxima ``m * 2^e``, m uniform in [1, 2), e uniform in ``exponents`` (end excluded)."""
    exps = rng.integers(*exponents, g)
    return (np.ldexp(rng.uniform(1, 2, g), exps)).astype(np.float16)


def build_layer(widths: list[int], group_size: dict[int, int], counts: list[int], cut: int, n: int, seed: int,
                with_bias: bool, scale_exponents: tuple[int, int] = FULL_RANGE) -> RawLayer:
    rng = np.random.default_rng(seed)
    bits_of_groups = [b for b, c in zip(widths, counts) for _ in range(c)]
    k = sum(group_size[b] for b in bits_of_groups) - cut
    rows = []
    left = k
    for b in bits_of_groups:
        r = min(group_size[b], left)
        rows.append(rng.integers(0, 1 << b, (r, n)))
        left -= r
    g = len(bits_of_groups)
    return RawLayer(
        qweight=np.concatenate(rows).astype(np.int16),
        qscale=rng.integers(1, 17, (g, n)).astype(np.int16),
        qscale_max=random_scale_max(rng, g, scale_exponents),
        qgroups=np.array([v for b in bits_of_groups for v in (b, 0)], dtype=np.int16),
        group_size=group_size,
        invperm=rng.permutation(k).astype(np.int32),
        bias=rng.normal(size=n).astype(np.float16) if with_bias else None,
    )


def extreme_layer() -> RawLayer:
    """Extreme codes and scales: a 5-bit group of lowest codes (-z) and one of highest
    (2^b - 1 - z), scale codes 16 and 1, and float16 maxima at the edges: the largest normal, the
    smallest normal (/256 is the subnormal 2^-22), the smallest subnormal (/256 rounds to 0, so
    every weight is +-0), and one whose mantissa bits are lost in /256."""
    layer = build_layer([5, 2], {5: 64, 2: 32}, [2, 2], 0, 70, 3, False)
    layer.qweight[:64] = 0
    layer.qweight[64:128] = 31
    layer.qscale[0] = 16
    layer.qscale[1] = 1
    layer.qscale_max = np.array([65504.0, 2.0**-14, 2.0**-24, (1 + 2**-10) * 2.0**-14], dtype=np.float16)
    return layer
