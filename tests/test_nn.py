"""Exl2Linear: a module over a QMatrix."""

from __future__ import annotations

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
