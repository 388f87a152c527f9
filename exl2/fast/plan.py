"""Load-time tables that let one kernel serve every width (spec 5.1).

For each stored row ``k`` of a layer, :class:`RowTable` gives the q_weight row holding the
first bit of its code, the bit offset inside that word, the width, the group and the output
row ``q_perm[k]``. The code of row ``k`` in column ``n`` is then

    ((w[qrow, n] >> shift) | (w[qrow + 1, n] << (32 - shift))) & (2^bits - 1)

where the second word is needed only when ``shift + bits > 32`` (a straddling code).

The GEMV works per tile instead (:class:`TileTable`): 32 stored rows (16 in 2-bit groups), which
never cross a group and start on a word boundary, so within a tile every shift is a compile-time
constant of the width. The tables are derived from the group table alone; q_weight is used as
the file stores it. Tables are cached on the QMatrix and rebuilt when its tensors change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import BLOCKS, row_granule
from ..qmatrix import QMatrix


def contents_key(qm: QMatrix) -> tuple:
    """Identifies the current contents of ``qm``'s tensors: their storage and their version
    counters (bumped by every in-place change), so that caches kept on a QMatrix are rebuilt
    after its tensors are replaced or modified."""
    tensors = (qm.q_weight, qm.q_scale, qm.q_scale_max, qm.q_groups, qm.q_invperm, qm.bias)
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


def cached(qm: QMatrix, name: str, build):
    """``build(qm)``, kept on ``qm`` under ``name`` while :func:`contents_key` is unchanged."""
    key = contents_key(qm)
    hit = getattr(qm, name, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build(qm)
    object.__setattr__(qm, name, (key, value))
    return value


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
    """The per-row table of ``qm`` (cached on it)."""
    return cached(qm, "_fast_row_table", _build_row_table)


def _build_row_table(qm: QMatrix) -> RowTable:
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
    return table


def word_table(rows: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For packing ``rows`` codes of one width: per output word, the first row of its block and
    the word's index inside the block (int32 each, ``[rows * bits / 32]``)."""
    blk = BLOCKS[bits]
    words = rows // blk.rows * blk.words
    q = torch.arange(words, device=device)
    return ((q // blk.words) * blk.rows).to(torch.int32), (q % blk.words).to(torch.int32)


def tile_rows(bits: int) -> int:
    """Rows of one GEMV tile of a ``bits``-bit group: the row granule of spec 4.4 (32, or 16 for
    2-bit groups). Every group is a whole number of tiles, so a tile never crosses a group (one
    scale per column) and starts on a word boundary (its codes are whole blocks)."""
    return row_granule(bits)


@dataclass(frozen=True)
class TileTable:
    """Per tile of stored rows, in order: width, first stored row, first q_weight row, group
    (int32 ``[tiles]`` each)."""

    bits: torch.Tensor
    row: torch.Tensor
    qrow: torch.Tensor
    group: torch.Tensor

    @property
    def count(self) -> int:
        return self.bits.numel()


def tile_table(qm: QMatrix) -> TileTable:
    """The GEMV tile table of ``qm`` (cached on it)."""
    return cached(qm, "_fast_tile_table", _build_tile_table)


def _build_tile_table(qm: QMatrix) -> TileTable:
    bits, row, qrow, group = [], [], [], []
    for g in qm.groups:
        t = tile_rows(g.bits)
        for i in range(0, g.rows, t):
            bits.append(g.bits)
            row.append(g.row + i)
            qrow.append(g.qrow + i * g.bits // 32)
            group.append(g.index)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=qm.q_weight.device)  # noqa: E731
    return TileTable(as_tensor(bits), as_tensor(row), as_tensor(qrow), as_tensor(group))
