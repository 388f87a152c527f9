"""GPTQ on the input covariance, with the bias corrected: for layers that have a bias.

A linear ``y = W x + b`` quantized to ``W_hat`` has the output error ``(W - W_hat) x``. Split
``x = mu + (x - mu)`` (``mu`` the mean calibration input): the part ``(W - W_hat) mu`` is the same
for every input, so the bias absorbs it exactly, ``b' = b + (W - W_hat) mu`` (the least-squares
bias for ``W_hat``; bias correction, Nagel et al. 2019). What is left is ``(W - W_hat)(x - mu)``,
whose mean square is ``tr(dW Σ dW^T)`` with ``Σ = E[x x^T] - mu mu^T``: so GPTQ is run with the
covariance ``Σ`` in place of the second moment ``E[x x^T]``. Inputs with a large mean (after a
LayerNorm's bias, after GELU) otherwise spend GPTQ's effort, and its damping, which is relative
to the Hessian's diagonal, on a direction the bias handles for free.

The file format does not change: EXL2 stores a float16 bias per layer already. A layer without
a bias is quantized as before (second moment, no correction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..qmatrix import QMatrix
from ..qparams import QParams
from . import calibration


@dataclass
class LinearStats:
    """First and second moments of a linear's inputs over the calibration rows."""

    hessian: torch.Tensor  #: ``E[x x^T]`` ``[K, K]`` float32
    mean: torch.Tensor  #: ``E[x]`` ``[K]`` float32


def input_stats(block: torch.nn.Module, layers: dict[str, torch.nn.Linear],
                inputs: calibration.BlockInputs) -> dict[str, LinearStats]:
    """:func:`calibration.hessians` plus the mean input of each linear, in one pass of the block."""
    sums = {k: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for k, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def make(key):
        def hook(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[key] += x.sum(0).to(torch.float64)
            counts[key] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in layers.items()]
    try:
        h = calibration.hessians(block, layers, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {k: LinearStats(h[k], (sums[k] / max(1, counts[k])).to(torch.float32)) for k in layers}


def decoded(qm: QMatrix) -> torch.Tensor:
    """float32 ``[K, N]``: the decoded weights of a quantized layer."""
    from ..reference import dequantize

    return dequantize(qm)[:, : qm.out_features].to(torch.float32)


def encode(encoder: Callable, weight: torch.Tensor, qparams: QParams, stats: LinearStats,
           bias: torch.Tensor | None, *, centered: bool = True, **kw) -> QMatrix:
    """``encoder(weight, qparams, hessian, bias=bias, **kw)`` (the reference or fast quantize);
    with ``centered`` and a bias: on the covariance, then the bias corrected."""
    w = weight.detach().to(torch.float32)
    if not centered or bias is None:
        return encoder(w, qparams, stats.hessian, bias=bias, **kw)
    covariance = stats.hessian - torch.outer(stats.mean, stats.mean)
    qm = encoder(w, qparams, covariance, bias=bias, **kw)
    shift = (w - decoded(qm).T.to(w.device)) @ stats.mean.to(w.device)
    return replace(qm, bias=(bias.detach().to(torch.float32) + shift).to(torch.float16))
