"""Fast-path benchmarks: the fused/GEMV matmul and dequantize against float16 matmul of the same
shape, side by side in one run (GPU cases skip without a GPU). The full sweep with bandwidth
figures and the issue-4 targets is benchmarks/gpu_bench.py, run by benchmarks/gpu.sh; its CPU
smoke runs are in tests/test_gpu_scripts.py, so that CI keeps the script runnable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from exl2 import fast

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
SHAPE = (4096, 4096)


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.fixture(scope="module")
def layer():
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_bench import random_layer

    return random_layer(*SHAPE, 4.0, device="cuda")


@gpu
@pytest.mark.parametrize("m", [1, 16, 2048])
def test_fast_matmul_4bpw(benchmark, layer, m):
    x = torch.randn(m, SHAPE[0], device="cuda", dtype=torch.float16)
    fast.matmul(x, layer)
    benchmark(_sync(lambda: fast.matmul(x, layer)))


@gpu
@pytest.mark.parametrize("m", [1, 16, 2048])
def test_torch_fp16_matmul(benchmark, m):
    w = torch.randn(*SHAPE, device="cuda", dtype=torch.float16)
    x = torch.randn(m, SHAPE[0], device="cuda", dtype=torch.float16)
    benchmark(_sync(lambda: x @ w))


@gpu
@pytest.mark.parametrize("m", [1, 2048])
def test_ratio_fp16_time_over_fast_time(benchmark, layer, m):
    """Side by side (CUDA-event timing of both): float16 matmul time / exl2 fast time, printed at
    the end of the run (benchmarks/conftest.py)."""
    import triton.testing

    from .conftest import RATIOS

    w = torch.randn(*SHAPE, device="cuda", dtype=torch.float16)
    x = torch.randn(m, SHAPE[0], device="cuda", dtype=torch.float16)
    t_fast = triton.testing.do_bench(lambda: fast.matmul(x, layer), return_mode="median")
    t_fp16 = triton.testing.do_bench(lambda: x @ w, return_mode="median")
    n = SHAPE[0] * SHAPE[1] * m
    RATIOS[f"fp16 / exl2 fast matmul, {SHAPE[0]}x{SHAPE[1]} 4.0 bpw, M={m}"] = (
        t_fp16 / t_fast, {"exl2 fast": n / (t_fast / 1e3), "fp16": n / (t_fp16 / 1e3)})
    benchmark(_sync(lambda: fast.matmul(x, layer)))


@gpu
def test_fast_dequantize_4bpw(benchmark, layer):
    fast.dequantize(layer)
    benchmark(_sync(lambda: fast.dequantize(layer)))
