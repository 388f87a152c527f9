"""Fast-path benchmarks on a GPU (skipped without one): fused matmul against float16 matmul.
The full sweep with bandwidth figures is benchmarks/gpu_bench.py (run by benchmarks/gpu.sh)."""

from __future__ import annotations

import pytest
import torch

from exl2 import fast

from .layers import random_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("m", [1, 16, 2048])
def test_fast_matmul_4bpw_4096(benchmark, m):
    qm = random_layer(4096, 4096, 4.0, device="cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)

    def run():
        fast.matmul(x, qm)
        torch.cuda.synchronize()
    benchmark(run)


@pytest.mark.parametrize("m", [1, 16, 2048])
def test_torch_fp16_matmul_4096(benchmark, m):
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)

    def run():
        x @ w
        torch.cuda.synchronize()
    benchmark(run)
