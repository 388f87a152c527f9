"""Load-time tables that let one kernel serve every width (spec 5.1).

For each stored row ``k`` of a layer, :class:`RowTable` gives the q_weight row holding the
first bit of its code, the bit offset inside that word, the width, the group and the output
row ``q_perm[k]``. The code of row ``k`` in column ``n`` is then

    ((w[qrow, n] >> shift) | (w[qrow + 1, n] << (32 - shift))) & (2^bits - 1)

where the second word is needed only when ``shift + bits > 32`` (a straddling code). The tables
are derived from the group table alone; q_weight is used as the file stores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import BLOCKS
from ..qmatrix import QMatrix


@dataclass(frozen=True)
class RowTable:
    qrow: torch.Tensor  #: int32 [K]
    shift: torch.Tensor  #: int32 [K]
    bits: torch.Tensor  #: int32 [K]
    group: torch.Tensor  #: int32 [K]
    dest: torch.Tensor  #: int32 [K], q_perm


def _per_group(qm: QMatrix, device: torch.device) -> tuple[torch.Tensor, ...]:
    gs = qm.groups.groups
    t = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    return (t([g.bits for g in gs]), t([g.row for g in gs]), t([g.rows for g in gs]), t([g.qrow for g in gs]),
            t([BLOCKS[g.bits].rows for g in gs]), t([BLOCKS[g.bits].words for g in gs]))


def row_table(qm: QMatrix) -> RowTable:
    """The per-row table of ``qm`` (built once per QMatrix and cached on it)."""
    cached = getattr(qm, "_fast_row_table", None)
    if cached is not None:
        return cached
    device = qm.q_weight.device
    bits, row, rows, qrow, block_rows, block_words = _per_group(qm, device)
    group = torch.repeat_interleave(torch.arange(len(rows), device=device), rows)
    i = torch.arange(qm.in_features, device=device) - row[group]  # row inside its group
    b = bits[group]
    offset = (i % block_rows[group]) * b  # bit offset inside its block
    table = RowTable(
        qrow=(qrow[group] + (i // block_rows[group]) * block_words[group] + offset // 32).to(torch.int32),
        shift=(offset % 32).to(torch.int32),
        bits=b.to(torch.int32),
        group=group.to(torch.int32),
        dest=qm.q_perm.to(device),
    )
    object.__setattr__(qm, "_fast_row_table", table)
    return table


def word_table(rows: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For packing ``rows`` codes of one width: per output word, the first row of its block and
    the word's index inside the block (int32 each, ``[rows * bits / 32]``)."""
    blk = BLOCKS[bits]
    words = rows // blk.rows * blk.words
    q = torch.arange(words, device=device)
    return ((q // blk.words) * blk.rows).to(torch.int32), (q % blk.words).to(torch.int32)
