"""An independent oracle: exllamav2's packing and decoding transliterated literally, scalar by
scalar, with numpy float16 arithmetic. It imports nothing from exl2.

Sources (exllamav2 v0.2.7):
- ``exllamav2/conversion/adaptivegptq.py`` ``AdaptiveGPTQ.pack``: F.pad of scales with 0, padded
  codes set to 2^(b-1), q_groups offsets written group by group;
- ``exllamav2_ext/cuda/pack_tensor.cu`` ``pack_columns_kernel`` (with ``wshift``) and
  ``pack_rows_4_kernel`` (``x -= 1`` on a uint16);
- ``exllamav2/ext.py`` ``make_q_matrix``: ``q_scale_max *= 1/256`` on the float16 tensor;
- ``exllamav2_ext/cuda/q_matrix.cu`` QMatrix constructor (rows per group) and ``reconstruct_kernel``
  (value ``__hmul2(q - z, scale)``, stored row k written to row q_perm[k]);
- ``exllamav2_ext/cuda/quant/qdq_util.cuh`` ``dq_scale``; ``matrix_view.cuh`` ``MatrixView_q4_row::item``.
The in-memory shuffle (``shuffle_kernel``, ``quant/qdq_*.cuh``) is undone by the matching
``dequant_*`` functions, which yield codes in plain bit-string order, so it is left out here.
"""

from __future__ import annotations

import numpy as np

U32 = 0xFFFFFFFF


def wshift(x: int, j: int) -> int:
    if j < 0:
        return 0 if j <= -32 else (x >> -j) & U32
    return 0 if j >= 32 else (x << j) & U32


def pack_columns(q: np.ndarray, bits: int) -> np.ndarray:
    """``pack_columns_kernel<bits>`` over a [rows, columns] uint16 array -> [rows*bits/32, columns] uint32."""
    rows, columns = q.shape
    out_rows = rows * bits // 32
    out = np.zeros((out_rows, columns), dtype=np.uint32)
    per_thread = {2: (16, 1), 3: (32, 3), 4: (8, 1), 5: (32, 5), 6: (16, 3), 8: (4, 1)}[bits]
    n_in, n_out = per_thread
    for column in range(columns):
        for out_row in range(0, out_rows, n_out):
            row = out_row * 32 // bits
            packed = [0] * n_out
            for i in range(n_in):
                x = int(q[row + i, column])
                for k in range(n_out):
                    packed[k] |= wshift(x, i * bits - 32 * k)
            for k in range(n_out):
                out[out_row + k, column] = packed[k]
    return out


def pack_rows_4(qs: np.ndarray) -> np.ndarray:
    """``pack_rows_4_kernel``: [rows, columns] uint16 scale codes (1..16, or 0 when padded)."""
    rows, columns = qs.shape
    out = np.zeros((rows, columns // 8), dtype=np.uint32)
    for r in range(rows):
        for oc in range(columns // 8):
            packed = 0
            for i in range(8):
                x = (int(qs[r, oc * 8 + i]) - 1) & 0xFFFF  # uint16 wrap
                packed |= (x << (i * 4)) & U32
            out[r, oc] = packed
    return out


def pack_layer(q: np.ndarray, qscale: np.ndarray, scale_max: np.ndarray, groups: list[tuple[int, int]],
               invperm: np.ndarray) -> dict[str, np.ndarray]:
    """``AdaptiveGPTQ.pack``: ``q`` [rows, columns] codes in act order, ``qscale`` [G, columns] in 1..16,
    ``scale_max`` [G] float16, ``groups`` = [(bits, rows)]."""
    rows, columns = q.shape
    padding = -columns % 32
    qst = np.pad(qscale, ((0, 0), (0, padding))).astype(np.uint16)
    qwt = np.pad(q, ((0, 0), (0, padding))).astype(np.uint16)
    q_groups = []
    words = []
    row = out_row = 0
    for bits, n in groups:
        g = qwt[row:row + n].copy()
        if padding:
            g[:, -padding:] = 2 ** (bits - 1)
        packed = pack_columns(g, bits)
        q_groups += [bits, out_row]
        words.append(packed)
        row += n
        out_row += packed.shape[0]
    return {
        "q_weight": np.concatenate(words).view(np.int32),
        "q_scale": pack_rows_4(qst).view(np.int32),
        "q_scale_max": scale_max.astype(np.float16),
        "q_groups": np.array(q_groups, dtype=np.int16),
        "q_invperm": invperm.astype(np.int32),
    }


def reconstruct(t: dict[str, np.ndarray]) -> np.ndarray:
    """exllamav2's reconstruct: float16 [height, width] with rows in input-feature order."""
    q_weight = t["q_weight"].view(np.uint32)
    width = q_weight.shape[1]
    invperm = t["q_invperm"].astype(np.int64)
    height = len(invperm)
    perm = np.argsort(invperm)
    max_scale = (t["q_scale_max"].astype(np.float16) * np.float16(1 / 256)).astype(np.float16)
    qg = t["q_groups"].astype(np.int64) & 0xFFFF
    n_groups = len(qg) // 2
    q_scale = t["q_scale"].view(np.uint32)
    out = np.zeros((height, width), dtype=np.float16)
    row = 0
    for i in range(n_groups):
        bits, qrow = int(qg[2 * i]), int(qg[2 * i + 1])
        rows = (int(qg[2 * i + 3]) - qrow) * 32 // bits if i < n_groups - 1 else height - row
        z = 2 ** (bits - 1)
        for n in range(width):
            c = (int(q_scale[i, n // 8]) >> (4 * (n % 8))) & 0xF
            scale = np.float16(np.float16((c + 1) * (c + 1)) * max_scale[i])
            column_bits = 0
            for w in range(rows * bits // 32):
                column_bits |= int(q_weight[qrow + w, n]) << (32 * w)
            for k in range(rows):
                code = (column_bits >> (k * bits)) & ((1 << bits) - 1)
                out[perm[row + k], n] = np.float16(np.float16(code - z) * scale)
        row += rows
    return out
