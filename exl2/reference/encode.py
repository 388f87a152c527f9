"""Encoding (spec 7): from float weights to a QMatrix, as exllamav2's converter does it.

The steps, for a weight ``W`` (``nn.Linear`` orientation ``[out_features, in_features]``):

1. transpose to ``[in_features, out_features]``: rows are input features;
2. act-order: with a Hessian, rows sorted by its diagonal, largest first; without, kept in order;
3. the group plan of the QParams (widths non-increasing);
4. per group, in order: the scale search (:func:`find_scales`), then codes, row by row with GPTQ's
   error feedback when a Hessian is given (:func:`quantize` ), all at once without one;
5. padding of the columns to a multiple of 32, and packing.

Bit-exact parts (spec 8.1): the codes given the scales, the scales given the chosen multiplier,
packing. Parts within a bound (spec 8.2): the multiplier search (exllamav2 sums errors with
atomics and a fast ``powf``, so near-ties can resolve differently) and GPTQ's float32 feedback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import padded_columns, zero_point
from ..qmatrix import QMatrix
from ..qparams import QParams
from .packing import pack_codes, pack_scales

#: The multiplier grid of the scale search (exllamav2 ``AdaptiveQuantizer``): 97 points from
#: 0.70 to 1.20, error norm 3.5.
P_MIN, P_MAX, P_GRID, ERR_NORM = 0.70, 1.20, 96, 3.5

#: GPTQ damping, as a fraction of the mean Hessian diagonal (``AdaptiveGPTQ.percdamp``).
PERCDAMP = 0.12


@dataclass(frozen=True)
class GroupScales:
    """Result of the scale search for one group."""

    codes: torch.Tensor  #: int64 ``[N]``, the 4-bit scale code plus one, ``qs`` in 1..16
    scale_max: torch.Tensor  #: float16 scalar, the stored ``q_scale_max``
    scale: torch.Tensor  #: float32 ``[N]``, the decoded column scales (float16 values)


def decoded_scales(qs: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]`` of float16 values: the scales a decoder computes from ``qs`` (1..16) and the
    stored float16 maximum (spec 6.1, 6.2). The encoder quantizes with exactly these."""
    group_max = (scale_max.to(torch.float32) / 256).to(torch.float16).to(torch.float32)
    return (qs.square().to(torch.float32) * group_max).to(torch.float16).to(torch.float32)


def _multipliers(device: torch.device) -> torch.Tensor:
    """The 97 grid multipliers as exllamav2's error kernel computes them (float32)."""
    pi = torch.arange(P_GRID + 1, dtype=torch.float32, device=device) / P_GRID
    return P_MIN * (1 - pi) + P_MAX * pi


def find_scales(w: torch.Tensor, bits: int, err_norm: float = ERR_NORM) -> GroupScales:
    """Scale search for one group ``w`` ``[rows, N]`` float32 (spec 7.2; ``find_params``).

    Per column the ideal scale ``base = (max|w| + 1e-12) / (maxq / 2)``; its ratio to the group's
    largest is coded in 4 bits as ``qs = clamp(round(sqrt(base / smax) * 16), 1, 16)``; then one
    multiplier ``p`` for the whole group is chosen from the grid to minimise
    ``sum |clamp(rint(w / s), -z, maxq - z) * s - w| ^ 3.5`` with ``s = (qs / 16)^2 * smax * p``
    (``err_norm`` replaces 3.5 for experiments).
    """
    maxq = (1 << bits) - 1
    z = zero_point(bits)
    base = (w.abs().amax(dim=0) + 1e-12) / (maxq / 2)
    smax = base.max()
    qs = torch.clamp(torch.round(torch.sqrt(base / smax) * 16), 1, 16)
    trial = (qs / 16) ** 2 * smax

    # The grid is tried in chunks of multipliers at once: [chunk, rows, N] per step.
    grid = _multipliers(w.device)
    chunk = max(1, min(len(grid), (1 << 22) // max(1, w.numel())))
    errors = []
    for ps in grid.split(chunk):
        s = trial[None, None, :] * ps[:, None, None]
        # |clamp(round(w / s)) * s - w| ^ err_norm, each step in place on one [chunk, rows, N]
        # buffer: the same elementwise float32 operations, in the same order, as separate tensors.
        e = w[None] / s
        e.round_().clamp_(-z, maxq - z).mul_(s).sub_(w[None]).abs_().pow_(err_norm)
        errors.append(e.sum(dim=(1, 2)))
        del e
    best = torch.argmin(torch.cat(errors))  # first of equal minima
    frac = best.to(torch.float32) / P_GRID
    p = P_MAX * frac + P_MIN * (1 - frac)

    scale_max = (smax * p).to(torch.float16)
    qs = qs.to(torch.int64)
    return GroupScales(codes=qs, scale_max=scale_max, scale=decoded_scales(qs, scale_max))


def encode_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and their decoded values for rows ``w`` ``[..., N]`` under ``scale`` ``[N]`` (spec 7.3).

    ``q = clamp(rint(w / s) + 2^(b-1), 0, 2^b - 1)`` in float32 with a correctly rounded division
    and round-half-to-even; the decoded value is ``half(half(q - z) * half(s))``."""
    maxq = (1 << bits) - 1
    z = zero_point(bits)
    q = torch.clamp(torch.round(w / scale) + z, 0, maxq).nan_to_num(nan=maxq)  # CUDA clamp: NaN (0/0) -> maxq
    value = ((q - z) * scale).to(torch.float16).to(torch.float32)
    return q.to(torch.int64), value


#: Columns of a ``[K, K]`` matrix handled at once where a whole-matrix temporary is avoidable.
_COLUMN_CHUNK = 256
#: Columns of a group packed at once (:func:`pack`).
_PACK_COLUMNS = 1024


def _permuted(h: torch.Tensor, perm: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = h[perm[i], perm[j]]`` (``h[perm][:, perm]``), filled a slice of columns at a
    time so that no second ``[K, K]`` temporary exists."""
    for j in range(0, len(perm), _COLUMN_CHUNK):
        cols = perm[j:j + _COLUMN_CHUNK]
        out[:, j:j + len(cols)] = h.index_select(1, cols).index_select(0, perm)
    return out


def _has_nan(m: torch.Tensor) -> bool:
    """``torch.isnan(m).any()``, a slice of columns at a time (no ``[K, K]`` bool temporary)."""
    return any(bool(torch.isnan(m[:, j:j + _COLUMN_CHUNK]).any()) for j in range(0, m.shape[1], _COLUMN_CHUNK))


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float = PERCDAMP,
                            perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (``AdaptiveGPTQ.prepare``) of
    ``h[perm][:, perm]`` (``h`` itself without ``perm``); ``h`` is not changed.

    One ``[K, K]`` buffer beyond ``h``: it is column-major, the layout LAPACK works in, so the
    Cholesky factor, its inverse and the inverse's factor are each computed in place in it (the
    same routines on the same values as out-of-place calls, so the same result). On a failed
    attempt it is filled again from ``h`` and damped once more than before."""
    k = h.shape[0]
    perm = torch.arange(k, device=h.device) if perm is None else perm
    work = torch.empty_strided((k, k), (1, k), dtype=torch.float32, device=h.device)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    _permuted(h, perm, work)
    damp = torch.clamp(percdamp * torch.diagonal(work).mean(), min=1e-5)
    for attempt in range(10):
        if attempt:
            _permuted(h, perm, work)
        for _ in range(attempt + 1):  # the damping added as often, and in the same steps, as before
            work.diagonal().add_(damp)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info != 0:
            continue
        torch.cholesky_inverse(work, out=work)
        if _has_nan(work):
            continue
        torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
        if info == 0:
            return work
    raise ValueError("Hessian is not invertible, even with extra damping")


def gptq_group(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, bits: int, *,
               encode: Callable = encode_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's row loop inside one group (spec 7.1): codes (int64) and scaled errors (float32) of
    the group's rows ``w`` ``[R, N]``, ``u`` the group's ``[R, R]`` diagonal block of the
    inverse-Hessian factor. ``w`` is not changed."""
    w = w.clone()
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)
    err = torch.empty_like(w)
    for r in range(w.shape[0]):
        codes[r], value = encode(w[r], scale, bits)
        err[r] = (w[r] - value) / u[r, r]
        # Feed the error forward to the rows of this group not yet quantized.
        w[r + 1:] -= u[r, r + 1:, None] * err[r][None, :]
    return codes, err


def quantize(weight: torch.Tensor, qparams: QParams, hessian: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, *, encode: Callable = encode_rows,
             pack_group: Callable = pack_codes, group_loop: Callable | None = None,
             percdamp: float = PERCDAMP, err_norm: float = ERR_NORM) -> QMatrix:
    """Encode ``weight`` (``[out_features, in_features]``, any float dtype) to a QMatrix.

    Without ``hessian``: round-to-nearest per group, rows in their original order. With
    ``hessian`` (``[in_features, in_features]``, the mean of ``X^T X`` over calibration inputs):
    act-order and GPTQ's error feedback. ``encode`` (as :func:`encode_rows`), ``pack_group``
    (as :func:`pack_codes`) and ``group_loop`` (as :func:`gptq_group`) let another engine
    (``exl2.fast``) run the same algorithm on its own kernels. ``percdamp`` (GPTQ damping) and
    ``err_norm`` (the scale search's error norm) default to exllamav2's values."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, has shape {list(weight.shape)}")
    out_features, in_features = weight.shape
    device = weight.device
    if not _finite(weight.detach()):
        raise ValueError("weight holds NaN or Inf")
    if hessian is None:
        perm = torch.arange(in_features, device=device)
        u = None
    else:
        if hessian.shape != (in_features, in_features):
            raise ValueError(f"hessian must be [{in_features}, {in_features}], has {list(hessian.shape)}")
        h = hessian.detach().to(device=device, dtype=torch.float32)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    w = _rows_float32(weight.detach(), perm)  # [K, N], act-order rows
    if hessian is not None:
        u = _inverse_hessian_factor(h, percdamp, perm)
        del h

    plan = qparams.plan(in_features)
    # Codes are below 2^8 at every width: one byte each until packing.
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale_codes, scale_maxes = [], []
    for bits, a, n in plan.groups:
        b = a + n
        found = find_scales(w[a:b], bits, err_norm)
        scale_codes.append(found.codes)
        scale_maxes.append(found.scale_max)
        if u is None:
            codes[a:b], _ = encode(w[a:b], found.scale, bits)
            continue
        if group_loop is None:
            codes[a:b], err = gptq_group(w[a:b], u[a:b, a:b], found.scale, bits, encode=encode)
        else:
            codes[a:b], err = group_loop(w[a:b], u[a:b, a:b], found.scale, bits)
        w[b:] -= u[a:b, b:].T @ err  # once per group, the feedback into every later row

    return pack(codes, plan.groups, torch.stack(scale_codes), torch.stack(scale_maxes),
                torch.argsort(perm).to(torch.int32), out_features, bias, pack_group=pack_group)


def _finite(weight: torch.Tensor) -> bool:
    """Whether ``weight`` converted to float32 holds no NaN or Inf (a float64 weight may overflow
    float32), a slice of rows at a time."""
    return all(bool(torch.isfinite(weight[a:a + _COLUMN_CHUNK].to(torch.float32)).all())
               for a in range(0, weight.shape[0], _COLUMN_CHUNK))


def _rows_float32(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``weight.T[perm]`` in float32 ``[K, N]``, made directly (no float32 or transposed copy of
    the whole weight on the way), a slice of rows at a time."""
    k, n = weight.shape[1], weight.shape[0]
    w = torch.empty((k, n), dtype=torch.float32, device=weight.device)
    for a in range(0, k, _COLUMN_CHUNK):
        w[a:a + _COLUMN_CHUNK].copy_(weight.index_select(1, perm[a:a + _COLUMN_CHUNK]).T)
    return w


def pack(codes: torch.Tensor, groups, scale_codes: torch.Tensor, scale_max: torch.Tensor,
         q_invperm: torch.Tensor, out_features: int, bias: torch.Tensor | None = None, *,
         pack_group: Callable = pack_codes) -> QMatrix:
    """Assemble a QMatrix from codes ``[K, N]`` (act-order rows), the group plan
    ``(bits, first_row, rows)``, scale codes ``qs`` ``[G, N]`` (1..16) and float16 maxima ``[G]``.

    Padded columns get the zero-point code and scale code 0xF (spec 3.2, exllamav2 ``pack``); a
    bias of ``out_features`` entries is stored padded with zeros to the padded width, the length
    exllamav2's loader requires (spec 3.3)."""
    cols = padded_columns(out_features)
    pad = cols - out_features
    words, offsets = [], []
    qrow = 0
    for bits, a, n in groups:
        # A slice of columns at a time (each column packs on its own): packing works in int64
        # with several temporaries per code, too many to make for a whole group of a wide layer.
        parts = []
        for c in range(0, cols, _PACK_COLUMNS):
            block = torch.full((n, min(_PACK_COLUMNS, cols - c)), zero_point(bits), dtype=torch.int64,
                               device=codes.device)
            block[:, :max(0, min(out_features - c, block.shape[1]))] = codes[a:a + n, c:c + block.shape[1]]
            parts.append(pack_group(block, bits))
        packed = torch.cat(parts, dim=1)
        words.append(packed)
        offsets += [bits, qrow]
        qrow += packed.shape[0]
    nibbles = torch.nn.functional.pad(scale_codes - 1, (0, pad), value=15)
    return QMatrix(
        q_weight=torch.cat(words),
        q_scale=pack_scales(nibbles),
        q_scale_max=scale_max.to(device=codes.device, dtype=torch.float16).reshape(-1),
        q_groups=torch.tensor(offsets, dtype=torch.int16, device=codes.device),
        q_invperm=q_invperm.to(device=codes.device, dtype=torch.int32),
        bias=None if bias is None else torch.nn.functional.pad(bias.detach().to(device=codes.device,
                                                                                 dtype=torch.float16), (0, pad)),
        out_features=out_features,
    )
