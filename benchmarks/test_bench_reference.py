"""Reference dequantize throughput against gguf-py's numpy Q4_K decoder, side by side.

A 4096 x 11008 layer (in_features 4096, out 11008) at about 4.0 bpw with mixed widths
(5/4/3-bit), and the same number of weights as random valid Q4_K blocks. Target (issue 2): the
reference decodes at least as fast as gguf-py decodes Q4_K on the same machine. Run:

    pytest benchmarks/test_bench_reference.py --benchmark-enable
"""

from __future__ import annotations

import numpy as np
import pytest

from exl2.reference import dequantize

from .layers import random_layer

K, N = 4096, 11008
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def layer():
    return random_layer(K, N, 4.0)


@pytest.fixture(scope="module")
def q4k_blocks() -> np.ndarray:
    nb = K * N // 256  # Q4_K: 256 weights in 144 bytes
    raw = np.random.default_rng(0).integers(0, 256, (nb, 144), dtype=np.uint8)
    # d and dmin (the first two float16 of a block) set to finite values
    raw[:, :4] = np.frombuffer(np.full(nb * 2, 0.01, dtype=np.float16).tobytes(), dtype=np.uint8).reshape(nb, 4)
    return raw.reshape(-1)


def test_reference_dequantize(benchmark, layer):
    out = benchmark.pedantic(dequantize, args=(layer,), rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (K, N)
    RESULTS["exl2"] = benchmark.stats.stats.median
    benchmark.extra_info["weights_per_second"] = K * N / benchmark.stats.stats.median
    benchmark.extra_info["bpw"] = layer.bits_per_weight


def test_gguf_q4_k_dequantize(benchmark, q4k_blocks):
    import gguf

    out = benchmark.pedantic(gguf.quants.dequantize, args=(q4k_blocks, gguf.GGMLQuantizationType.Q4_K), rounds=5,
                             iterations=1, warmup_rounds=1)
    assert out.size == K * N
    RESULTS["gguf"] = benchmark.stats.stats.median
    benchmark.extra_info["weights_per_second"] = K * N / benchmark.stats.stats.median
    if "exl2" in RESULTS:
        ratio = RESULTS["gguf"] / RESULTS["exl2"]
        benchmark.extra_info["exl2_speed_over_gguf_q4_k"] = ratio
        print(f"\nexl2 reference: {K * N / RESULTS['exl2'] / 1e6:.0f} M weights/s; gguf Q4_K: "
              f"{K * N / RESULTS['gguf'] / 1e6:.0f} M weights/s; ratio {ratio:.2f}x")
