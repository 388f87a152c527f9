"""The error bounds of the conformance levels that are not bit-exact (spec 8.2).

Each function returns a boolean tensor or a bool, so that the reference's tests, the fast path's
tests and the conformance harness check one and the same definition.
"""

from __future__ import annotations

import torch

#: Relative slack of a matmul, per output element, against ``sum_k |x_k| * |B_kn|`` (spec 8.2.1):
#: covers rounding of the output to float16 (2^-11) and accumulation in float32 or in float16
#: blocks, with room to spare. bfloat16 outputs round at 2^-8, hence their larger slack.
MATMUL_REL = {torch.float16: 2.0**-9, torch.float32: 2.0**-9, torch.bfloat16: 2.0**-7}
#: Absolute floor, for outputs whose magnitude sum is zero or subnormal.
MATMUL_ABS = 2.0**-24

#: GPTQ (spec 8.2.3): at least this fraction of codes must equal the reference's ...
GPTQ_MIN_CODE_AGREEMENT = 0.99
#: ... and the Hessian-weighted error must be within this factor of the reference's.
GPTQ_MAX_ERROR_RATIO = 1.02

#: Scale search (spec 8.2.2): the chosen multiplier's grid error may exceed the grid minimum by
#: at most this relative amount (ties and near-ties may resolve either way).
SCALE_SEARCH_REL = 1e-5


def matmul_tolerance(x: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed ``|y - y_ref|`` per output element for ``y = x @ b + bias`` (``b`` the float16 decoded
    matrix): the relative slack times ``sum_k |x_k| |b_kn| + |bias_n|``, plus the absolute floor."""
    mag = x.abs().to(torch.float32) @ b.abs().to(torch.float32)
    if bias is not None:
        mag = mag + bias.abs().to(torch.float32)[: mag.shape[-1]]
    return MATMUL_REL.get(x.dtype, 2.0**-9) * mag + MATMUL_ABS


def matmul_within_bound(y: torch.Tensor, y_ref: torch.Tensor, x: torch.Tensor, b: torch.Tensor,
                        bias: torch.Tensor | None = None) -> bool:
    """Whether ``y`` agrees with the reference product ``y_ref`` within :func:`matmul_tolerance`."""
    b = b[:, : y.shape[-1]]
    diff = (y.to(torch.float64) - y_ref.to(torch.float64)).abs()
    return bool((diff <= matmul_tolerance(x, b, bias)).all())


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace(E^T H E)`` with ``E = w_hat - w`` in ``[in_features, out]`` orientation: the error GPTQ minimises."""
    e = (w_hat.to(torch.float64) - w.to(torch.float64))
    return float(torch.einsum("in,ij,jn->", e, hessian.to(torch.float64), e))
