"""Candidate QParams per layer for the measurement pass.

:data:`EXLLAMAV2_OPTIONS` are the distinct entries of exllamav2's tables ``qparams_attn`` and
``qparams_mlp`` (``exllamav2/conversion/qparams.py``), spanning about 2.1 to 8.1 stored bits per
weight. They have no option between about 2.4 and 3.3 bits but mixes of 3 and 2 or of 4 and 3
bits with large groups: :data:`OPTIONS` adds six that fill that range (pure 3-bit with groups of
64 and 32, 3/2 and 4/3 mixes with groups of 32, 4-bit with groups of 64; three of them are
entries of exllamav2's other tables), so a 3 bpw target need not pair 2-bit-heavy layers with
4-bit ones (measured: docs/results/ablation.json, step "options"). Any QParams is plain EXL2:
exllamav2 reads what its kernels support, whatever table it came from. exllamav2 measures
options per module group (attention / MLP) with one entry per linear; here every linear is
measured and allocated on its own, which the allocator can afford.
"""

from __future__ import annotations

from ..qparams import QParams

EXLLAMAV2_OPTIONS: tuple[QParams, ...] = (
    QParams(64, [3, 2], [0.05, 0.95]),
    QParams(64, [3, 2], [0.25, 0.75]),
    QParams(128, [4, 3], [0.1, 0.9]),
    QParams(128, [4, 3], [0.25, 0.75]),
    QParams(128, [4], [1.0]),
    QParams(32, [4], [1.0]),
    QParams(128, [5, 4], [0.1, 0.9]),
    QParams(32, [5, 4], [0.1, 0.9]),
    QParams(128, [6, 5], [0.1, 0.9]),
    QParams(128, [6], [1.0]),
    QParams(32, [6], [1.0]),
    QParams(128, [8], [1.0]),
)

#: What ``exl2 quantize`` measures: exllamav2's options and six for the range from 2.4 to 3.3
#: bits, in order of their cost.
OPTIONS: tuple[QParams, ...] = tuple(sorted(EXLLAMAV2_OPTIONS + (
    QParams(32, [3, 2], [0.25, 0.75]),
    QParams(64, [3], [1.0]),
    QParams(32, [3], [1.0]),
    QParams(32, [4, 3], [0.1, 0.9]),
    QParams(32, [4, 3], [0.25, 0.75]),
    QParams(64, [4], [1.0]),
), key=lambda q: q.total_bits(4096, 4096)))


#: exllamav2's ``qparams_headoptions``: ``--head-bits`` names an entry, not a width (6 means 15 %
#: of the rows at 8 bits and 85 % at 6).
HEAD_OPTIONS: dict[int, QParams] = {
    2: QParams(32, [4, 2], [0.3, 0.7]),
    3: QParams(32, [4, 3], [0.15, 0.85]),
    4: QParams(32, [6, 4], [0.15, 0.85]),
    5: QParams(128, [6, 5], [0.15, 0.85]),
    6: QParams(128, [8, 6], [0.15, 0.85]),
    8: QParams(128, [8], [1.0]),
}


def head_option(bits: int) -> QParams:
    """The output head's option for ``--head-bits`` (one of 2, 3, 4, 5, 6, 8)."""
    if bits not in HEAD_OPTIONS:
        raise ValueError(f"--head-bits must be one of {sorted(HEAD_OPTIONS)}")
    return HEAD_OPTIONS[bits]
