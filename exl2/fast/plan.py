"""Load-time tables that let one kernel serve every width (spec 5.1).

The decoding kernels walk the layer in tiles (:class:`TileTable`): 32 stored rows (16 in 2-bit
groups), which never cross a group and start on a word boundary. Within a tile of width ``b``,
code ``j`` of column ``n`` starts ``j * b`` bits into the tile's first word, so every shift is a
function of the width alone (a compile-time constant where the kernel branches on the width),
and each column has one scale. :func:`permutation` gives the input feature of each stored row,
``q_perm`` (spec 4.5). The tables are derived from the group table alone; q_weight is used as
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


def permutation(qm: QMatrix) -> torch.Tensor:
    """``q_perm`` of ``qm`` as int32 on its device: stored row ``k`` holds input feature
    ``q_perm[k]`` (cached on it)."""
    return cached(qm, "_fast_permutation", lambda q: q.q_perm.to(device=q.q_weight.device, dtype=torch.int32))


def word_table(rows: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For packing ``rows`` codes of one width: per output word, the first row of its block and
    the word's index inside the block (int32 each, ``[rows * bits / 32]``)."""
    blk = BLOCKS[bits]
    words = rows // blk.rows * blk.words
    q = torch.arange(words, device=device)
    return ((q // blk.words) * blk.rows).to(torch.int32), (q % blk.words).to(torch.int32)


def tile_rows(bits: int) -> int:
    """Rows of one tile of a ``bits``-bit group: the row granule of spec 4.4 (32, or 16 for
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
    """The tile table of ``qm`` (cached on it)."""
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
