"""GPTQ aimed at the float model's outputs, from the inputs the quantized model gives the layer.

In the quantization pass a linear of block ``i`` reads ``x_q``, the activations of the model whose
blocks before ``i`` are already quantized, not ``x``, the float model's. Plain GPTQ fits
``W_hat x_q`` to ``W x_q``: the error that reached the layer passes on untouched. What the model
needs is ``W_hat x_q + b_hat ≈ W x + b``. Over the calibration rows that least-squares problem
splits exactly (for ``lam = 0``) into

    ``W* = W A C^-1``  and  ``||W x - W_hat x_q||^2 = const + tr((W* - W_hat) C (W* - W_hat)^T)``

with ``C = E[x_q x_q^T]`` and ``A = E[x x_q^T]``: so GPTQ (and :mod:`exl2.model.refine`) run
unchanged on the corrected weight ``W*`` with the quantized model's Hessian ``C``. For a layer
with a bias the same holds for the centred moments, and the bias absorbs the means:
``b_hat = b + W mu - W_hat mu_q`` (:mod:`exl2.model.centering` is the case ``x = x_q``).
``W* = W (A + lam I)(C + lam I)^-1`` with ``lam`` a fraction :data:`LAMBDA` of ``C``'s mean
diagonal is a ridge pull towards ``W``: without it ``W*`` follows noise in the directions the
calibration rows hardly excite and its range, so its quantization step, grows.

This is the asymmetric calibration of GPTAQ (Li et al., 2025), in closed form for the whole
weight before GPTQ rather than inside GPTQ's column loop. The file format does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..qmatrix import QMatrix
from ..qparams import QParams
from .calibration import BlockInputs, _Stop, input_groups
from .centering import decoded, with_bias

#: Ridge of ``W*``, a fraction of the mean diagonal of ``C`` (measured on MiniLM from 0.1 to 3:
#: 0.3 to 1 best; docs/quantizing.md).
LAMBDA = 0.5


@dataclass
class CrossStats:
    """Moments of a linear's inputs in the float model (``x``) and the quantized one (``x_q``),
    over the same calibration rows."""

    hessian: torch.Tensor  #: ``E[x_q x_q^T]`` ``[K, K]`` float32
    cross: torch.Tensor | None  #: ``E[x x_q^T]`` ``[K, K]`` float32 (None once released)
    mean: torch.Tensor  #: ``E[x]`` ``[K]`` float32
    mean_q: torch.Tensor  #: ``E[x_q]`` ``[K]`` float32
    #: set by :func:`quantize_block` for the group's last linear to encode: :func:`target` then
    #: releases ``cross`` as soon as it is used, before the factor and the encoder's work
    last_use: bool = False


class _Capture:
    """A forward pre-hook that keeps the module's input (rows flattened) and stops the forward."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def __call__(self, _module, args) -> None:
        self.x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        raise _Stop


def _input(block: torch.nn.Module, capture: _Capture, args: tuple, kwargs: dict) -> torch.Tensor:
    try:
        block(*args, **kwargs)
    except _Stop:
        pass
    if capture.x is None:
        raise ValueError("no calibration input reached the layer")
    x, capture.x = capture.x, None
    return x


def cross_moments(block: torch.nn.Module, module: torch.nn.Linear, reference: BlockInputs, inputs: BlockInputs,
                  swap: Callable[[bool], None] = lambda quantized: None) -> CrossStats:
    """The :class:`CrossStats` of ``module``'s input, batch by batch: ``block`` run on the float
    model's inputs ``reference`` and on the quantized model's ``inputs``. ``swap(quantized)``
    puts the block's already quantized linears in place (True) or their float weights (False)
    before each of the two runs, so that ``x`` is the float model's all through the block."""
    capture = _Capture()
    handle = module.register_forward_pre_hook(capture)
    k = module.in_features
    hessian = torch.zeros(k, k)
    cross = torch.zeros(k, k)
    sums = torch.zeros(2, k, dtype=torch.float64)
    count = 0
    try:
        with torch.inference_mode():
            for (ra, rk), (qa, qk) in zip(zip(reference.args, reference.kwargs), zip(inputs.args, inputs.kwargs)):
                swap(False)
                x = _input(block, capture, ra, rk)
                swap(True)
                xq = _input(block, capture, qa, qk)
                hessian.addmm_(xq.T, xq)
                cross.addmm_(x.T, xq)
                sums[0] += x.sum(0).to(torch.float64)
                sums[1] += xq.sum(0).to(torch.float64)
                count += x.shape[0]
    finally:
        handle.remove()
        swap(True)
    n = max(1, count)
    mean, mean_q = (sums / n).to(torch.float32)
    return CrossStats(hessian / n, cross / n, mean, mean_q)


def target(weight: torch.Tensor, stats: CrossStats, centered: bool, lam: float = LAMBDA) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """``(W*, C)``: the weight GPTQ should aim at and the Hessian it should use (centred moments
    when ``centered``). In float32, with two ``[K, K]`` buffers beyond the shared moments (``C``
    when centred, and ``C + lam I`` factored in place); ``stats`` is not changed (the linears
    reading one input share it), except that with ``stats.last_use`` the cross moment is
    released as soon as it is used, before the factor is made."""
    c = stats.hessian
    if centered:
        c = c - torch.outer(stats.mean_q, stats.mean_q)
    ridge = lam * float(c.diagonal().mean().clamp(min=1e-12))
    w = weight.detach().to(device=c.device, dtype=torch.float32)
    # (A + ridge I)^T W^T, with A centred as a rank-one correction rather than a [K, K] copy:
    # A_c^T W^T = A^T W^T - mu_q (W mu)^T
    rhs = stats.cross.T @ w.T
    rhs.add_(w.T, alpha=ridge)
    if centered:
        rhs.sub_(torch.outer(stats.mean_q, w @ stats.mean))
    if stats.last_use:
        stats.cross = None  # no linear needs E[x x_q^T] again: its K^2 floats are free from here on
    damped = c.clone()
    damped.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(damped, out=(damped, torch.empty((), dtype=torch.int32)))
    if int(info) != 0:
        raise ValueError("the quantized model's input moments are not positive definite, even with the ridge")
    solution = torch.cholesky_solve(rhs, factor)  # W*^T: W* = W (A + ridge I)(C + ridge I)^-1
    del rhs, factor, damped  # before the transposed copy
    return solution.T.contiguous(), c


def encode(encoder: Callable, weight: torch.Tensor, qparams: QParams, stats: CrossStats, bias: torch.Tensor | None,
           *, centered: bool = True, lam: float = LAMBDA, **kw) -> QMatrix:
    """``encoder(W*, qparams, C, bias=bias, **kw)`` (reference or fast quantize, refined or
    not); with ``centered`` and a bias, the bias set to ``b + W mu - W_hat mu_q``. With
    ``stats.last_use`` the cross moment is released before the encoder runs (:func:`target`)."""
    centered = centered and bias is not None
    w_star, c = target(weight, stats, centered, lam)
    qm = encoder(w_star, qparams, c, bias=bias, **kw)
    if not centered:
        return qm
    w = weight.detach().to(torch.float32)
    shift = w @ stats.mean - decoded(qm).T.to(w.device) @ stats.mean_q
    return with_bias(qm, bias.detach().to(torch.float32) + shift)


class _Swap:
    """The float and the decoded parameters of a block's quantized linears, either put in place
    (``self(True)``: the quantized model; ``self(False)``: the float one) without copying. The
    parameter objects are swapped, not their data: ``put`` may give a linear a new weight of
    another dtype (:func:`exl2.model.held.put_weight`)."""

    def __init__(self, put: Callable[[torch.nn.Linear, QMatrix], None]) -> None:
        self.put = put
        self.layers: list[tuple[torch.nn.Linear, tuple, tuple]] = []
        self.released = False

    def release(self) -> None:
        """No float forward follows: drop the float parameters kept for one (the decoded ones
        stay in place), and from now on put decoded weights without keeping the float ones."""
        self(True)
        self.layers = []
        self.released = True

    @staticmethod
    def _params(module: torch.nn.Linear) -> tuple:
        return module._parameters["weight"], module._parameters.get("bias")

    @staticmethod
    def _set(module: torch.nn.Linear, params: tuple) -> None:
        module._parameters["weight"] = params[0]
        if params[1] is not None:
            module._parameters["bias"] = params[1]

    def keep(self, module: torch.nn.Linear, qm: QMatrix) -> None:
        if self.released:
            self.put(module, qm)
            return
        original = self._params(module)
        self._set(module, tuple(None if p is None else torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                                for p in original))
        self.put(module, qm)
        self.layers.append((module, original, self._params(module)))

    def __call__(self, quantized: bool) -> None:
        for module, original, decoded_ in self.layers:
            self._set(module, decoded_ if quantized else original)


def quantize_block(block: torch.nn.Module, modules: dict[str, torch.nn.Linear], inputs: BlockInputs,
                   reference: BlockInputs, encode_one: Callable[[str, CrossStats], QMatrix],
                   put: Callable[[torch.nn.Linear, QMatrix], None],
                   saved: Callable[[str], QMatrix | None] = lambda key: None) -> dict[str, QMatrix]:
    """Quantize a block's linears group by group (those reading one tensor, in the order the
    block reads them): each group's :class:`CrossStats` from ``reference`` (the float model's
    block inputs) through the float block and from ``inputs`` (the quantized model's) through the
    block with the groups before it quantized, then ``encode_one(key, stats)`` per linear (or
    ``saved(key)`` when it is already done) and ``put`` once the whole group is encoded. So GPTQ
    also makes up for the error of the block's earlier linears. On return every linear computes
    with its decoded weights; the float ones are dropped."""
    swap = _Swap(put)
    done: dict[str, QMatrix] = {}
    groups = input_groups(block, modules, inputs)
    for i, group in enumerate(groups):
        held = {k: saved(k) for k in group}
        stats = None
        if any(qm is None for qm in held.values()):
            stats = cross_moments(block, modules[group[0]], reference, inputs, swap)
        if i == len(groups) - 1:
            # the float model has run its last forward through this block: the earlier groups'
            # float weights go before the last group's encoder needs its memory
            swap.release()
        pending = [k for k in group if held[k] is None]
        for key in group:
            if held[key] is None:
                stats.last_use = key == pending[-1]
                done[key] = encode_one(key, stats)
            else:
                done[key] = held[key]
        del stats
        for key in group:  # after the whole group: its linears read the same input
            swap.keep(modules[key], done[key])
    swap(True)
    return done
