"""GPTQ aimed at the float model's outputs (exl2.model.input_error): the corrected weight is the
least-squares solution, checked against torch.linalg.lstsq on the rows themselves."""

from __future__ import annotations

import torch

from exl2.model import input_error
from exl2.model.calibration import BlockInputs
from exl2.qparams import QParams
from exl2.reference import dequantize, quantize


def rows(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) * 0.5 + 2 * torch.randn(k, generator=g)
    x_q = x + 0.1 * torch.randn(n, k, generator=g)  # the quantized model's version of the same rows
    return x, x_q


def stats_of(x: torch.Tensor, x_q: torch.Tensor) -> input_error.CrossStats:
    n, x, x_q = x.shape[0], x.double(), x_q.double()
    return input_error.CrossStats(*(t.float() for t in (x_q.T @ x_q / n, x.T @ x_q / n, x.mean(0), x_q.mean(0))))


def test_target_is_the_least_squares_weight():
    x, x_q = rows(2000, 24, seed=0)
    w = torch.randn(16, 24)
    for centered in (False, True):
        w_star, c = input_error.target(w, stats_of(x, x_q), centered, lam=1e-9)
        a, b = (x - x.mean(0), x_q - x_q.mean(0)) if centered else (x, x_q)
        expected = torch.linalg.lstsq(b.double(), (a.double() @ w.double().T)).solution.T
        assert torch.allclose(w_star.double(), expected, rtol=1e-3, atol=1e-3)
        assert torch.allclose(c.double(), b.double().T @ b.double() / len(b), rtol=1e-4, atol=1e-4)


def test_no_input_error_leaves_the_weight():
    x, _ = rows(500, 16, seed=1)
    w = torch.randn(8, 16)
    w_star, _ = input_error.target(w, stats_of(x, x), centered=True)
    assert torch.allclose(w_star, w, atol=1e-5)


def test_the_ridge_pulls_towards_the_weight():
    x, x_q = rows(300, 16, seed=2)
    w = torch.randn(8, 16)
    far = [float((input_error.target(w, stats_of(x, x_q), True, lam)[0] - w).norm()) for lam in (1e-6, 0.5, 100.0)]
    assert far[0] > far[1] > far[2]


def test_encode_matches_the_mean_output():
    """With a bias, the stored bias makes the quantized layer's mean output on x_q the float
    layer's on x (up to the bias's float16 rounding)."""
    x, x_q = rows(4000, 64, seed=3)
    w, bias = torch.randn(40, 64) * 0.1, torch.randn(40)
    qm = input_error.encode(quantize, w, QParams(32, [4], [1.0]), stats_of(x, x_q), bias)
    y = x @ w.T + bias
    y_q = x_q @ dequantize(qm)[:, :40].float() + qm.output_bias.float()
    assert torch.allclose(y_q.mean(0), y.mean(0), atol=2e-3)
    plain = quantize(w, QParams(32, [4], [1.0]), x_q.T @ x_q / len(x_q), bias=bias)
    y_plain = x_q @ dequantize(plain)[:, :40].float() + plain.output_bias.float()
    assert (y_q - y).square().mean() < (y_plain - y).square().mean()  # aimed at y, not at W x_q


def test_cross_moments_of_one_stream_are_its_hessian():
    lin = torch.nn.Linear(12, 6)
    block = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.GELU(), lin)
    xs = BlockInputs([(torch.randn(2, 5, 12),) for _ in range(3)], [{} for _ in range(3)])
    s = input_error.cross_moments(block, lin, xs, xs)
    assert torch.allclose(s.cross, s.hessian, atol=1e-6)
    assert torch.allclose(s.mean, s.mean_q)
    with torch.no_grad():
        h = torch.cat([torch.nn.functional.gelu(block[0](a[0])).reshape(-1, 12) for a in xs.args])
    assert torch.allclose(s.hessian, h.T @ h / len(h), atol=1e-5)
