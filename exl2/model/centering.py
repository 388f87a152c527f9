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
    """The moments of each linear's inputs over the calibration rows (linears that read the
    same tensor share them: :func:`calibration.input_groups`)."""
    out: dict[str, LinearStats] = {}
    for group in calibration.input_groups(block, layers, inputs):
        stats = LinearStats(*calibration.group_moments(block, layers[group[0]], inputs))
        out.update(dict.fromkeys(group, stats))
    return out


def decoded(qm: QMatrix) -> torch.Tensor:
    """float32 ``[K, N]``: the decoded weights of a quantized layer."""
    from ..reference import dequantize

    return dequantize(qm)[:, : qm.out_features].to(torch.float32)


def encode(encoder: Callable, weight: torch.Tensor, qparams: QParams, stats: LinearStats,
           bias: torch.Tensor | None, *, centered: bool = True, **kw) -> QMatrix:
    """``encoder(weight, qparams, hessian, bias=bias, **kw)`` (the reference or fast quantize);
    with ``centered`` and a bias: on the covariance, then the bias corrected."""
    # The weight goes to the encoder in its own dtype (the encoder makes its float32 working copy
    # from it); a float32 copy here is made only for the bias correction, once the encoder is done.
    weight = weight.detach()
    if not centered or bias is None:
        return encoder(weight, qparams, stats.hessian, bias=bias, **kw)
    covariance = stats.hessian - torch.outer(stats.mean, stats.mean)
    qm = encoder(weight, qparams, covariance, bias=bias, **kw)
    del covariance
    w = weight.to(torch.float32)
    shift = (w - decoded(qm).T.to(w.device)) @ stats.mean.to(w.device)
    return with_bias(qm, bias.detach().to(torch.float32) + shift)


def with_bias(qm: QMatrix, values: torch.Tensor) -> QMatrix:
    """``qm`` storing ``values`` (``[out_features]``) as its bias, in float16, padded like
    ``qm.bias`` to q_weight's columns (spec 3.3; the padding stays 0)."""
    corrected = qm.bias.clone()
    corrected[: qm.out_features] = values.to(corrected.device, torch.float16)
    return replace(qm, bias=corrected)
