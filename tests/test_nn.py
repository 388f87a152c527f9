"""Exl2Linear: a module over a QMatrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exl2 import QParams, reference
from exl2.nn import Exl2Linear


def test_from_linear_forward_and_state_dict():
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = Exl2Linear.from_linear(linear, QParams(32, [5, 4], [0.5, 0.5]))
    assert (layer.in_features, layer.out_features) == (64, 40)
    x = torch.randn(3, 64)
    y = layer(x)
    b = reference.dequantize(layer.qmatrix)[:, :40].float()
    assert torch.allclose(y, x @ b + linear.bias.half().float(), atol=1e-5)
    # close to the float layer (5/4-bit quantization)
    assert (y - linear(x)).abs().max() < 0.25 * linear(x).abs().max()

    sd = layer.state_dict()
    assert set(sd) == {"q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"}
    other = Exl2Linear(reference.quantize(torch.randn(40, 64), QParams(32, [5, 4], [0.5, 0.5]), bias=torch.zeros(40)))
    other.load_state_dict(sd)
    assert torch.equal(other(x), y)


def test_exl2_names_round_trip_through_a_file(tmp_path):
    from exl2.io import open_model, save_tensors

    layer = Exl2Linear(reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0])))
    save_tensors(tmp_path / "m.safetensors", {f"proj.{k}": v for k, v in layer.state_dict().items() if v is not None})
    qm = open_model(tmp_path / "m.safetensors").qmatrix("proj")
    assert torch.equal(reference.dequantize(qm), reference.dequantize(layer.qmatrix))


def test_load_state_dict_replaces_the_layer_it_computes():
    """Loading copies into the buffers in place: the module must not keep using tables of the
    previous contents (the act-order permutation differs here, the shapes do not)."""
    qp = QParams(32, [4, 3], [0.5, 0.5])
    g = torch.Generator().manual_seed(1)
    # GPTQ with act-order by a random diagonal Hessian: a random permutation each
    a, b = (Exl2Linear(reference.quantize(torch.randn(40, 64, generator=g), qp,
                                          torch.diag(torch.rand(64, generator=g) + 0.5))) for _ in range(2))
    assert not torch.equal(a.q_invperm, b.q_invperm)
    x = torch.randn(2, 64, generator=g)
    from exl2 import fast

    fast.matmul(x, a.qmatrix)  # builds a's QMatrix and the fast path's tables on it
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))
    assert torch.equal(fast.matmul(x, a.qmatrix), fast.matmul(x, b.qmatrix))


def test_dtype_casts_keep_the_exl2_dtypes():
    layer = Exl2Linear(reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0]), bias=torch.randn(40)))
    x = torch.randn(3, 64)
    y = layer(x)
    layer.float()
    layer.to(torch.bfloat16)
    assert layer.q_scale_max.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert torch.equal(layer(x), y)
    assert layer(x.half()).dtype == torch.float16


def test_from_linear_with_a_hessian_is_gptq():
    """With a Hessian, from_linear runs GPTQ: its Hessian-weighted error is no worse than
    round-to-nearest's on the same layer (up to the GPTQ bound)."""
    from exl2.reference.bounds import GPTQ_MAX_ERROR_RATIO, hessian_weighted_error

    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    h = x.T @ x / 512
    linear = nn.Linear(64, 40)
    qp = QParams(32, [3], [1.0])
    gptq = Exl2Linear.from_linear(linear, qp, h)
    rtn = Exl2Linear.from_linear(linear, qp)
    w = linear.weight.detach().T
    err = [hessian_weighted_error(w, reference.dequantize(m.qmatrix)[:, :40], h) for m in (gptq, rtn)]
    assert err[0] <= err[1] * GPTQ_MAX_ERROR_RATIO


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_forward_on_a_gpu_is_the_fast_path():
    layer = Exl2Linear(reference.quantize(torch.randn(40, 64), QParams(32, [5, 4], [0.5, 0.5]), bias=torch.randn(40)))
    x = torch.randn(3, 64, dtype=torch.float16)
    y_ref = layer(x)
    from exl2.reference.bounds import matmul_within_bound

    y = layer.cuda()(x.cuda()).cpu()
    assert matmul_within_bound(y, y_ref.double(), x, reference.dequantize(layer.cpu().qmatrix), layer.bias)
