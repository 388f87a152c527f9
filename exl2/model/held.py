"""A block's linear weights held in 16 bits, upcast to float32 one linear at a time while it runs.

The linears are most of a block's memory. The streaming source keeps their weights as the
checkpoint stores them when that is float16 or bfloat16 (2 bytes a weight, not float32's 4).
Each such linear's forward upcasts its weight for its own product only: the upcast is exact, so
the block computes with the float32 values a float32 copy would hold, and its outputs are the
same bits. The encoder makes its own float32 working copy (exactly too).

Decoded weights (float16 values, spec 6.3) go in as float16, which holds them exactly (bfloat16
would round them); a weight put back after measuring goes back in its own dtype.
"""

from __future__ import annotations

import torch
from torch import nn

#: Weight dtypes kept as they are (all others are upcast to float32 when loaded).
HELD_DTYPES = (torch.float16, torch.bfloat16)


def upcast_forward(module: nn.Linear) -> None:
    """Make ``module`` compute in float32 from a weight held in a dtype of :data:`HELD_DTYPES`
    (``nn.Linear.forward`` with the weight upcast for this product only)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        return nn.functional.linear(x, w.to(torch.float32) if w.dtype in HELD_DTYPES else w, module.bias)

    module.forward = forward


def put_weight(module: nn.Linear, values: torch.Tensor) -> None:
    """Set the weight's values (``[out, in]``, float16, bfloat16 or float32): copied into the
    weight when it has their dtype or is float32 (which holds the 16-bit ones exactly); otherwise
    the weight becomes a tensor of ``values``' dtype."""
    w = module.weight
    if w.dtype in (values.dtype, torch.float32):
        with torch.no_grad():
            w.copy_(values.to(w.device))
    else:
        module._parameters["weight"] = nn.Parameter(values.to(w.device).contiguous(), requires_grad=False)


def put_decoded(module: nn.Linear, qm) -> None:
    """The module computes with ``qm``'s decoded weights (float16 values, spec 6.3, which a
    float32 or float16 weight holds exactly: :func:`put_weight`) and its stored bias from now on."""
    from ..reference import dequantize

    put_weight(module, dequantize(qm)[:, : qm.out_features].T)
    bias = decoded_bias(module, qm)
    if bias is not module.bias:
        with torch.no_grad():
            module.bias.copy_(bias)


def decoded_bias(module: nn.Linear, qm) -> torch.Tensor | None:
    """The bias ``module`` computes with once it holds ``qm``: the stored one (float32) when both
    have a bias, else its own (the encoder stores a bias only for a layer that has one)."""
    if module.bias is not None and qm.bias is not None:
        return qm.output_bias.to(module.bias.device, torch.float32)
    return module.bias


def compute_decoded(encodings: list[tuple[nn.Linear, object]]):
    """Until the returned function is called, each module computes with its encoding's decoded
    weights (and stored bias, as :func:`put_decoded` would put them), decoded anew for every
    forward: its own weights stay as they are and are not copied, so a whole block can run
    quantized while holding one decoded linear at a time."""
    from .centering import decoded

    previous = []
    for module, qm in encodings:
        def forward(x: torch.Tensor, module=module, qm=qm) -> torch.Tensor:
            return nn.functional.linear(x, decoded(qm).T.to(x.device), decoded_bias(module, qm))

        previous.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def restore() -> None:
        for module, forward in previous:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
    return restore
