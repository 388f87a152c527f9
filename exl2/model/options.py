"""Candidate QParams per layer for the measurement pass.

Distinct entries of exllamav2's tables ``qparams_attn`` and ``qparams_mlp``
(``exllamav2/conversion/qparams.py``), spanning about 2.1 to 8.1 stored bits per weight. exllamav2
measures options per module group (attention / MLP) with one entry per linear; here every linear
is measured and allocated on its own, which the allocator can afford.
"""

from __future__ import annotations

from ..qparams import QParams

OPTIONS: tuple[QParams, ...] = (
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
