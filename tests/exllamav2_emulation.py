"""An independent oracle: exllamav2's packing and decoding, transliterated literally with Python
integers and numpy float16 scalars. It imports nothing from ``exl2``, so that a test comparing the
reference codec with it compares two implementations written from the source, not one with itself.

Code paths followed (exllamav2 v0.2.x / v0.3.x; ``ext/`` is ``exllamav2/exllamav2_ext/``):

- writing: ``exllamav2/conversion/adaptivegptq.py`` ``AdaptiveGPTQ.pack`` (F.pad of q_scale and
  q_weight with 0, padded codes overwritten with 2^(b-1), one ``pack_columns`` call per group, the
  q_groups offsets filled in group by group); ``ext/cuda/pack_tensor.cu`` ``pack_rows_4_kernel``
  (``uint16_t x; x -= 1`` wraps 0 to 0xFFFF, OR-ed in unmasked) and ``pack_columns_kernel<bits>``
  (``wshift``, one thread per column and block of output rows);
- loading: ``exllamav2/module.py`` ``load_weight`` (``q_perm = argsort(q_invperm)``),
  ``exllamav2/ext.py`` ``make_q_matrix`` (``q_scale_max *= 1/256`` on the float16 tensor, q_perm
  and q_invperm narrowed with ``.short()``), ``make_group_map_py``, and the ``QMatrix`` constructor
  of ``ext/cuda/q_matrix.cu`` (``height`` = group-map length / 2, cumulative ``rows_8 .. rows_2``);
- decoding: ``reconstruct_kernel`` of ``ext/cuda/q_matrix.cu`` (blocks of 128 rows, the group map
  to find the first group, ``pre_rows_*`` to find the first q_weight row, 32 rows per step, 16 for
  2-bit), ``dq_scale`` of ``ext/cuda/quant/qdq_util.cuh``, ``MatrixView_q4_row::item`` of
  ``ext/cuda/matrix_view.cuh``, and ``__hmul2(half(q - z), scale)`` written to row ``q_perm[k]``.

The in-memory shuffle is left out. At load time ``shuffle_kernel`` (``q_matrix.cu``) reorders the
bits of each block (``shuffle_{2,3,4,5,6}bit_*`` in ``ext/cuda/quant/qdq_{2,3,4,5,6}.cuh``; the
8-bit shuffle is empty since ``QMODE_8BIT`` is 0 in ``ext/config.h``), and the ``dequant_*bit_*``
functions of the same files read the shuffled words back. Read together, each pair hands out
``half(q_i - z)`` for i = 0, 1, 2, ... in plain bit-string order: e.g. in ``qdq_4.cuh``
``shuffle_4bit_8`` turns nibbles c0..c7 into c0 c2 c4 c6 c1 c3 c5 c7 and ``dequant_4bit_8`` takes
(nibble 0, nibble 4) = (c0, c1), then (c2, c3) via the ``*16`` lanes, etc.; the 3-, 5- and 6-bit
versions gather the straddling codes back into the last half2. :func:`shuffled_dequant` below
transliterates those shuffle and dequant functions, so that a test can check this claim on random
words instead of taking it on trust; :func:`reconstruct` then reads codes straight from the file's
bit string (:func:`dequant_plain`).
"""

from __future__ import annotations

import math

import numpy as np

U32 = 0xFFFFFFFF
BLOCK_KN_SIZE = 128  # q_matrix.cu


# ------------------------------------------------------------------------------------------
# pack_tensor.cu


def wshift(x: int, j: int) -> int:
    """``wshift``: a uint32 shift left by ``j``, right by ``-j`` when negative; 0 for |j| >= 32."""
    if j < 0:
        return 0 if j <= -32 else (x >> -j) & U32
    return 0 if j >= 32 else (x << j) & U32


#: pack_columns_kernel<bits>: (input rows, output rows) handled by one thread, and whether the
#: branch goes through wshift (3, 5, 6) or a plain ``x << j`` (2, 4, 8).
_PACK_COLUMNS = {2: (16, 1, False), 3: (32, 3, True), 4: (8, 1, False), 5: (32, 5, True), 6: (16, 3, True),
                 8: (4, 1, False)}


def pack_columns_kernel(inp: np.ndarray, out_rows: int, bits: int) -> np.ndarray:
    """``pack_columns_kernel<bits>`` over every (column, out_row) thread. ``inp`` is the int16
    ``[in_rows, columns]`` tensor read as ``uint16_t``; returns the int32 output tensor."""
    inp = inp.astype(np.int16).view(np.uint16)
    columns = inp.shape[1]
    out = np.zeros((out_rows, columns), dtype=np.uint32)
    n_in, n_out, uses_wshift = _PACK_COLUMNS[bits]
    for column in range(columns):
        for out_row in range(out_rows):
            if out_row % n_out:  # "Only run for every third (fifth) row"
                continue
            row = out_row * 32 // bits
            packed = [0] * n_out
            j = 0
            for i in range(n_in):
                x = int(inp[row + i, column])  # (uint32_t) input[...]
                if uses_wshift:
                    for w in range(n_out):
                        packed[w] |= wshift(x, j - 32 * w)
                else:
                    packed[0] |= (x << j) & U32
                j += bits
            for w in range(n_out):
                out[out_row + w, column] = packed[w]
    return out.view(np.int32)


def pack_rows_4_kernel(inp: np.ndarray) -> np.ndarray:
    """``pack_rows_4_kernel``: int16 ``[rows, columns]`` scale codes -> int32 ``[rows, columns/8]``.
    ``x -= 1`` is done on a uint16_t, so a padded 0 becomes 0xFFFF and is OR-ed in whole (the
    bits that spill over land on the following padded columns' nibbles, themselves 0xF)."""
    inp = inp.astype(np.int16).view(np.uint16)
    rows, columns = inp.shape
    out_columns = columns * 4 // 32
    out = np.zeros((rows, out_columns), dtype=np.uint32)
    for row in range(rows):
        for out_column in range(out_columns):
            packed = 0
            for i in range(8):
                x = int(inp[row, out_column * 8 + i])
                x = (x - 1) & 0xFFFF
                packed |= (x << (i * 4)) & U32
            out[row, out_column] = packed
    return out.view(np.int32)


# ------------------------------------------------------------------------------------------
# adaptivegptq.py


def adaptive_gptq_pack(key: str, qweight: np.ndarray, qscale: np.ndarray, qscale_max: np.ndarray,
                       qgroups: np.ndarray, group_size: dict[int, int], invperm: np.ndarray,
                       bias: np.ndarray | None = None, *, pack_columns=pack_columns_kernel,
                       pack_rows_4=pack_rows_4_kernel) -> dict[str, np.ndarray]:
    """``AdaptiveGPTQ.pack(key, qparams)``.

    As the quantizer leaves them: ``qweight`` int16 ``[rows, columns]`` codes in act-order,
    ``qscale`` int16 ``[G, columns]`` in 1..16, ``qscale_max`` float16 ``[G]``, ``qgroups`` int16
    ``[2G]`` as ``(bits, 0)`` pairs, ``group_size`` per width (``qparams.group_size``), ``invperm``
    the inverse act-order permutation. ``pack_columns`` and ``pack_rows_4`` default to the
    transliterated kernels above; benchmarks/golden_fixtures.py passes exllamav2's own (same
    signatures: numpy int16 in, int32 out)."""
    qgroups = qgroups.astype(np.int16).copy()
    output: dict[str, np.ndarray] = {}
    output[key + ".q_invperm"] = invperm.astype(np.int32)
    output[key + ".q_scale_max"] = qscale_max.astype(np.float16)
    output[key + ".q_groups"] = qgroups  # filled in below, as the tensor is shared
    if bias is not None:
        output[key + ".bias"] = bias.astype(np.float16)

    rows, columns = qweight.shape
    rem_rows = rows
    padding = -columns % 32
    if padding != 0:
        qst = np.pad(qscale.astype(np.int16), ((0, 0), (0, padding)))  # F.pad(..., (0, padding)): zeros
        qwt = np.pad(qweight.astype(np.int16), ((0, 0), (0, padding)))
    else:
        qst = qscale.astype(np.int16)
        qwt = qweight.astype(np.int16)

    output[key + ".q_scale"] = pack_rows_4(qst)

    qwt_packed = []
    i = row = out_row = 0
    while i < qscale.shape[0]:
        bits = int(qgroups[i * 2])
        qgroups[i * 2 + 1] = out_row
        i += 1
        g_rows = min(group_size[bits], rem_rows)
        wpqr = 32 / bits
        qrows = g_rows / wpqr
        assert qrows == int(qrows)
        qrows = math.ceil(qrows)
        g_qwt = qwt[row:row + g_rows, :]  # a view, as .contiguous() of a contiguous slice is
        if padding > 0:
            g_qwt[:, -padding:] = 2 ** (bits - 1)
        qwt_packed.append(pack_columns(g_qwt, qrows, bits))
        row += g_rows
        out_row += qrows
        rem_rows -= g_rows

    output[key + ".q_weight"] = np.concatenate(qwt_packed, axis=0)
    return output


# ------------------------------------------------------------------------------------------
# module.py, ext.py, q_matrix.cu (loading)


def load_weight(tensors: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """``ExLlamaV2Module.load_weight``: the layer's tensors, ``q_perm`` recomputed as
    ``argsort(q_invperm)`` (int32)."""
    w = {name: tensors[f"{key}.{name}"].copy() for name in ("q_weight", "q_invperm", "q_scale", "q_scale_max",
                                                              "q_groups")}
    if f"{key}.bias" in tensors:
        w["bias"] = tensors[f"{key}.bias"].copy()
    w["q_perm"] = np.argsort(w["q_invperm"]).astype(np.int32)
    return w


def make_group_map_py(q_groups: np.ndarray, num_qrows: int) -> np.ndarray:
    """``make_group_map_py``: per row, (group index, rows left in the group including this one)."""
    gr = [int(v) for v in q_groups]
    group_map: list[int] = []
    num_groups = len(gr) // 2
    for i in range(num_groups):
        bits = gr[i * 2]
        if i < num_groups - 1:
            qrows = gr[i * 2 + 3] - gr[i * 2 + 1]
        else:
            qrows = num_qrows - gr[i * 2 + 1]
        rows = qrows * 32 // bits
        for j in range(rows):
            group_map += [i]
            group_map += [rows - j]
    return np.array(group_map, dtype=np.int16)


class EmulatedQMatrix:
    """What ``make_q_matrix`` and the ``QMatrix`` constructor hold for an EXL2 layer."""

    def __init__(self, w: dict[str, np.ndarray]) -> None:
        # ext.py make_q_matrix: w["q_scale_max"] *= prescale / 256 with prescale 1. PyTorch
        # multiplies the float16 tensor by the scalar in float32 and rounds once to float16,
        # which is what numpy's float16 multiply does (1/256 is exact in float16).
        self.q_scale_max = (w["q_scale_max"].astype(np.float16) * np.float16(1 / 256)).astype(np.float16)
        self.q_perm = w["q_perm"].astype(np.int16).view(np.uint16)  # .short(), read as uint16_t
        self.q_invperm = w["q_invperm"].astype(np.int16).view(np.uint16)
        self.q_group_map = make_group_map_py(w["q_groups"], w["q_weight"].shape[0]).view(np.uint16)
        self.q_weight = w["q_weight"].view(np.uint32)
        self.q_scale = w["q_scale"].view(np.uint32)
        self.q_groups = w["q_groups"].astype(np.int16).view(np.uint16)  # uint16_t* cpu_q_groups

        # ext_qmatrix.cpp make_q_matrix
        self.width = self.q_weight.shape[1]
        self.groups = self.q_scale.shape[0]
        self.height = len(self.q_group_map) // 2

        # QMatrix::QMatrix: rows per width, then made cumulative
        rows_by_bits = {8: 0, 6: 0, 5: 0, 4: 0, 3: 0, 2: 0}
        row = 0
        for i in range(self.groups):
            bits = int(self.q_groups[i * 2])
            if i < self.groups - 1:
                qrows = int(self.q_groups[i * 2 + 3]) - int(self.q_groups[i * 2 + 1])
                rows = qrows * 32 // bits
            else:
                rows = self.height - row
            rows_by_bits[bits] += rows
            row += rows
        self.rows_8 = rows_by_bits[8]
        self.rows_6 = rows_by_bits[6] + self.rows_8
        self.rows_5 = rows_by_bits[5] + self.rows_6
        self.rows_4 = rows_by_bits[4] + self.rows_5
        self.rows_3 = rows_by_bits[3] + self.rows_4
        self.rows_2 = rows_by_bits[2] + self.rows_3


def make_q_matrix(w: dict[str, np.ndarray]) -> EmulatedQMatrix:
    return EmulatedQMatrix(w)


# ------------------------------------------------------------------------------------------
# qdq_util.cuh, matrix_view.cuh, q_matrix.cu (decoding)


def dq_scale(qs: int, max_scale: np.float16) -> np.float16:
    """``dq_scale``: ``__hmul(__int2half_rn((qs + 1)^2), max_scale)``."""
    qs_i = qs + 1
    qs_h = np.float16(qs_i * qs_i)
    return np.float16(qs_h * max_scale)


def q4_row_item(data: np.ndarray, width: int, row: int, column: int) -> int:
    """``MatrixView_q4_row::item``."""
    shift = (column & 0x07) * 4
    return (int(data.reshape(-1)[row * width // 8 + column // 8]) >> shift) & 0x0F


def dequant_plain(words: list[int], bits: int, count: int) -> list[np.float16]:
    """``half(q_i - 2^(bits-1))`` for the first ``count`` codes of the little-endian bit string
    ``words`` (what shuffle + ``dequant_*bit_*`` hand out; see the module docstring)."""
    string = 0
    for w, v in enumerate(words):
        string |= v << (32 * w)
    z = 1 << (bits - 1)
    return [np.float16(((string >> (i * bits)) & ((1 << bits) - 1)) - z) for i in range(count)]


#: Per width: q_weight rows read per 32-row step (16 rows for 2-bit) of reconstruct_kernel.
_STEP = {8: (8, 32), 6: (6, 32), 5: (5, 32), 4: (4, 32), 3: (3, 32), 2: (1, 16)}


def reconstruct(m: EmulatedQMatrix | dict[str, np.ndarray]) -> np.ndarray:
    """``QMatrix::reconstruct`` / ``reconstruct_kernel``: float16 ``[height, width]``, rows in
    input-feature order. One loop iteration per (blockIdx.y, column) thread. ``m`` may also be a
    layer's tensors under their bare names (``q_weight`` ...), loaded as exllamav2 loads them."""
    if isinstance(m, dict):
        m = make_q_matrix(load_weight({f"layer.{k}": v for k, v in m.items()}, "layer"))
    size_k, size_n = m.height, m.width
    b = np.zeros((size_k, size_n), dtype=np.float16)
    with np.errstate(over="ignore"):  # float16 overflow gives inf, as __hmul2 does
        _reconstruct_into(b, m)
    return b


def _reconstruct_into(b: np.ndarray, m: EmulatedQMatrix) -> None:
    size_k, size_n = m.height, m.width
    q_weight = m.q_weight.tolist()
    q_group_map = m.q_group_map
    rows_by_width = [(8, m.rows_8), (6, m.rows_6), (5, m.rows_5), (4, m.rows_4), (3, m.rows_3), (2, m.rows_2)]
    for offset_k in range(0, size_k, BLOCK_KN_SIZE):
        perm = [int(m.q_perm[offset_k + t]) for t in range(BLOCK_KN_SIZE) if offset_k + t < size_k]
        for n in range(size_n):
            group = int(q_group_map[offset_k * 2])
            pre_rows_8 = min(m.rows_8, offset_k)
            pre_rows_6 = min(m.rows_6, offset_k) - m.rows_8 if offset_k > m.rows_8 else 0
            pre_rows_5 = min(m.rows_5, offset_k) - m.rows_6 if offset_k > m.rows_6 else 0
            pre_rows_4 = min(m.rows_4, offset_k) - m.rows_5 if offset_k > m.rows_5 else 0
            pre_rows_3 = min(m.rows_3, offset_k) - m.rows_4 if offset_k > m.rows_4 else 0
            pre_rows_2 = min(m.rows_2, offset_k) - m.rows_3 if offset_k > m.rows_3 else 0
            qk = 0
            qk += pre_rows_8 // 32 * 8
            qk += pre_rows_6 // 32 * 6
            qk += pre_rows_5 // 32 * 5
            qk += pre_rows_4 // 32 * 4
            qk += pre_rows_3 // 32 * 3
            qk += pre_rows_2 // 32 * 2
            b_ptr = qk  # row of q_weight; the column is n

            qs_h = dq_scale(q4_row_item(m.q_scale, size_n, group, n), m.q_scale_max[group])
            nextgroup = offset_k + int(q_group_map[offset_k * 2 + 1])
            end_k = min(offset_k + BLOCK_KN_SIZE, size_k)
            k = offset_k
            lk = 0
            for bits, rows_end in rows_by_width:
                words_per_step, rows_per_step = _STEP[bits]
                while k < rows_end and k < end_k:
                    if k == nextgroup:
                        group += 1
                        qs_h = dq_scale(q4_row_item(m.q_scale, size_n, group, n), m.q_scale_max[group])
                        nextgroup += int(q_group_map[k * 2 + 1])
                    words = [q_weight[b_ptr + w][n] for w in range(words_per_step)]
                    b_ptr += words_per_step
                    for dq in dequant_plain(words, bits, rows_per_step):
                        b[perm[lk], n] = np.float16(dq * qs_h)  # __hmul2(dq, qs_h2)
                        lk += 1
                    k += rows_per_step


# ------------------------------------------------------------------------------------------
# The in-memory shuffle and the shuffled dequant functions (qdq_{2,3,4,5,6}.cuh), integer part


def _halves(x: int) -> tuple[int, int]:
    """The two 16-bit lanes of a ``half2_uint32``: (low, high)."""
    return x & 0xFFFF, (x >> 16) & 0xFFFF


def _lane_value(lane: int, divisor: int, z: int) -> int:
    """A lane built as ``(q * divisor) | 0x6400`` is the half ``1024 + q * divisor``;
    ``__hfma2(lane, 1/divisor, -1024/divisor - z)`` (``__hadd2(lane, -1024 - z)`` when divisor is 1)
    is exactly ``q - z`` (small integers, exact in float16). Returns that integer after checking
    the lane has the form the trick needs."""
    assert lane & 0xFC00 == 0x6400, hex(lane)
    m = lane & 0x03FF
    assert m % divisor == 0
    return m // divisor - z


def _pairs(qs: list[tuple[int, int]], z: int) -> list[int]:
    out = []
    for value, divisor in qs:
        lo, hi = _halves(value | 0x64006400)
        out += [_lane_value(lo, divisor, z), _lane_value(hi, divisor, z)]
    return out


def shuffle_and_dequant(words: list[int], bits: int) -> list[int]:
    """``shuffle_{bits}bit_*`` on one block of words, then ``dequant_{bits}bit_*`` on the shuffled
    words: the integers ``q_i - z`` in the order the kernel hands them out. 8-bit has neither (the
    unshuffled ``dequant_8bit_8`` reads bytes in order with ``exb``)."""
    z = 1 << (bits - 1)
    if bits == 2:
        (qa,) = words
        qb = 0
        for i in range(8):
            qa0 = qa & 0x03
            qa1 = (qa & 0x0C) >> 2
            qa >>= 4
            qb |= qa1 << (i * 2 + 16)
            qb |= qa0 << (i * 2)
        qa = qb & U32
        lanes = [((qa & 0x00030003), 1), ((qa & 0x000C000C), 4), ((qa & 0x00300030), 16), ((qa & 0x00C000C0), 64)]
        qa >>= 8
        lanes += [((qa & 0x00030003), 1), ((qa & 0x000C000C), 4), ((qa & 0x00300030), 16), ((qa & 0x00C000C0), 64)]
        return _pairs(lanes, z)
    if bits == 4:
        (qa,) = words
        qb = 0
        for i in range(4):
            qa0 = qa & 0x0F
            qa1 = (qa & 0xF0) >> 4
            qa >>= 8
            qb |= qa1 << (i * 4 + 16)
            qb |= qa0 << (i * 4)
        qa = qb & U32
        lanes = [((qa & 0x000F000F), 1), ((qa & 0x00F000F0), 16)]
        qa >>= 8
        lanes += [((qa & 0x000F000F), 1), ((qa & 0x00F000F0), 16)]
        return _pairs(lanes, z)
    if bits == 3:
        qa, qb, qc = words
        qd = qc >> 26
        qc = (qc << 4) & U32
        qc |= qb >> 28
        qb = (qb << 2) & U32
        qb |= qa >> 30
        zs = []
        for q in (qa, qb, qc):
            zq = 0
            for i in range(5):
                t0 = q & 0x07
                t1 = (q & 0x38) >> 3
                q >>= 6
                zq |= t0 << (i * 3)
                zq |= t1 << (i * 3 + 16)
            zs.append(zq)
        za, zb, zc = zs
        za |= ((qd & 0x01) >> 0) << 15
        zb |= ((qd & 0x02) >> 1) << 15
        zc |= ((qd & 0x04) >> 2) << 15
        za |= ((qd & 0x08) >> 3) << 31
        zb |= ((qd & 0x10) >> 4) << 31
        zc |= ((qd & 0x20) >> 5) << 31
        qa, qb, qc = za & U32, zb & U32, zc & U32
        # dequant_3bit_32
        lanes = [(qa & 0x00070007, 1), (qa & 0x00380038, 8)]
        qa >>= 6
        lanes += [(qa & 0x00070007, 1), (qa & 0x00380038, 8), (qa & 0x01C001C0, 64)]
        qa >>= 9
        qa &= 0x00010001
        lanes += [(qb & 0x00070007, 1), (qb & 0x00380038, 8)]
        qb >>= 6
        lanes += [(qb & 0x00070007, 1), (qb & 0x00380038, 8), (qb & 0x01C001C0, 64)]
        qb >>= 8
        qb &= 0x00020002
        lanes += [(qc & 0x00070007, 1), (qc & 0x00380038, 8)]
        qc >>= 6
        lanes += [(qc & 0x00070007, 1), (qc & 0x00380038, 8), (qc & 0x01C001C0, 64)]
        qc >>= 7
        qc &= 0x00040004
        lanes += [(qa | qb | qc, 1)]
        return _pairs(lanes, z)
    if bits == 5:
        qa, qb, qc, qd, qe = words
        qf = qe >> 22
        qe = (qe << 8) & U32
        qe |= qd >> 24
        qd = (qd << 6) & U32
        qd |= qc >> 26
        qc = (qc << 4) & U32
        qc |= qb >> 28
        qb = (qb << 2) & U32
        qb |= qa >> 30
        zs = []
        for q in (qa, qb, qc, qd, qe):
            zq = 0
            for i in range(3):
                t0 = q & 0x1F
                t1 = (q & 0x3E0) >> 5
                q >>= 10
                zq |= t0 << (i * 5)
                zq |= t1 << (i * 5 + 16)
            zs.append(zq)
        for w in range(5):
            zs[w] |= ((qf >> w) & 1) << 15
            zs[w] |= ((qf >> (w + 5)) & 1) << 31
        qa, qb, qc, qd, qe = (v & U32 for v in zs)
        # dequant_5bit_32
        lanes = [(qa & 0x001F001F, 1), (qa & 0x03E003E0, 32)]
        qa >>= 10
        lanes += [(qa & 0x001F001F, 1)]
        qa >>= 5
        qa &= 0x00010001
        lanes += [(qb & 0x001F001F, 1), (qb & 0x03E003E0, 32)]
        qb >>= 10
        lanes += [(qb & 0x001F001F, 1)]
        qb >>= 4
        qb &= 0x00020002
        lanes += [(qc & 0x001F001F, 1), (qc & 0x03E003E0, 32)]
        qc >>= 10
        lanes += [(qc & 0x001F001F, 1)]
        qc >>= 3
        qc &= 0x00040004
        lanes += [(qd & 0x001F001F, 1), (qd & 0x03E003E0, 32)]
        qd >>= 10
        lanes += [(qd & 0x001F001F, 1)]
        qd >>= 2
        qd &= 0x00080008
        lanes += [(qe & 0x001F001F, 1), (qe & 0x03E003E0, 32)]
        qe >>= 10
        lanes += [(qe & 0x001F001F, 1)]
        qe >>= 1
        qe &= 0x00100010
        lanes += [(qa | qb | qc | qd | qe, 1)]
        return _pairs(lanes, z)
    if bits == 6:
        qa, qb, qc = words
        q0 = [(qa) & 0x3F, (qa >> 6) & 0x3F, (qa >> 12) & 0x3F, (qa >> 18) & 0x3F, (qa >> 24) & 0x3F,
              ((qa >> 30) & 0x3) | ((qb & 0xF) << 2), (qb >> 4) & 0x3F, (qb >> 10) & 0x3F, (qb >> 16) & 0x3F,
              (qb >> 22) & 0x3F, ((qb >> 28) & 0xF) | ((qc & 0x3) << 4), (qc >> 2) & 0x3F, (qc >> 8) & 0x3F,
              (qc >> 14) & 0x3F, (qc >> 20) & 0x3F, (qc >> 26) & 0x3F]
        qa = q0[0] | (q0[1] << 16) | (q0[2] << 6) | (q0[3] << 22)
        qb = q0[4] | (q0[5] << 16) | (q0[6] << 6) | (q0[7] << 22)
        qc = q0[8] | (q0[9] << 16) | (q0[10] << 6) | (q0[11] << 22)
        qa |= (q0[12] & 0b001111) << 12
        qc |= (q0[12] & 0b110000) << 8
        qa |= (q0[13] & 0b001111) << 28
        qc |= (q0[13] & 0b110000) << 24
        qb |= (q0[14] & 0b001111) << 12
        qc |= (q0[14] & 0b110000) << 10
        qb |= (q0[15] & 0b001111) << 28
        qc |= (q0[15] & 0b110000) << 26
        qa, qb, qc = qa & U32, qb & U32, qc & U32
        # dequant_6bit_16
        lanes = [(qa & 0x003F003F, 1)]
        qa >>= 6
        lanes += [(qa & 0x003F003F, 1)]
        qa >>= 6
        lanes += [(qb & 0x003F003F, 1)]
        qb >>= 6
        lanes += [(qb & 0x003F003F, 1)]
        qb >>= 6
        lanes += [(qc & 0x003F003F, 1)]
        qc >>= 6
        lanes += [(qc & 0x003F003F, 1)]
        qc >>= 2
        lanes += [((qa & 0x000F000F) | (qc & 0x00300030), 1)]
        qc >>= 2
        lanes += [((qb & 0x000F000F) | (qc & 0x00300030), 1)]
        return _pairs(lanes, z)
    if bits == 8:
        q_0, q_1 = words
        return [((q_0 >> (i * 8)) & 0xFF) - z for i in range(4)] + [((q_1 >> (i * 8)) & 0xFF) - z for i in range(4)]
    raise ValueError(bits)
