"""Reference dequantize throughput against gguf-py's numpy Q4_K decoder, side by side (issue 2).

A 4096 x 11008 layer (in_features 4096, out_features 11008) at about 4.0 stored bits per weight
with mixed widths (5/4/3-bit groups of 64), built from random codes with ``exl2.reference.pack``
(no encoder run), and the same number of weights as random valid Q4_K blocks. Target: the
reference decodes at least as fast as gguf-py decodes Q4_K on the same machine. Run:

    pytest benchmarks/test_bench_reference.py --benchmark-enable

The ratios are printed at the end of the run and stored in the gguf benchmark's ``extra_info``.
gguf-py decodes with numpy on one thread, so the side-by-side ratio is the one with the reference
on one torch thread; the reference is also measured with torch's default thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exl2 import QMatrix, QParams
from exl2.reference import dequantize, pack

from .conftest import RATIOS

K, N = 4096, 11008
QPARAMS = QParams({5: 64, 4: 64, 3: 64}, [5, 4, 3], [0.2, 0.6, 0.2])
Q4_K_WEIGHTS, Q4_K_BYTES = 256, 144  # one block: d, dmin (float16), 12 bytes of 6-bit scales, 128 of nibbles
ROUNDS = 5
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def exl2_layer() -> QMatrix:
    g = torch.Generator().manual_seed(0)
    plan = QPARAMS.plan(K).groups
    codes = torch.cat([torch.randint(0, 1 << bits, (rows, N), generator=g) for bits, _, rows in plan])
    return pack(codes, plan, torch.randint(1, 17, (len(plan), N), generator=g),
                torch.rand(len(plan), generator=g) * 0.05 + 0.005, torch.randperm(K, generator=g), N)


@pytest.fixture(scope="module")
def q4_k_blocks() -> np.ndarray:
    blocks = K * N // Q4_K_WEIGHTS
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (blocks, Q4_K_BYTES), dtype=np.uint8)
    # d and dmin: finite positive float16 (random bytes could be NaN or Inf); scales and nibbles:
    # every byte pattern is valid
    d = rng.uniform(1e-3, 1e-2, (blocks, 2)).astype(np.float16)
    raw[:, :4] = d.view(np.uint8).reshape(blocks, 4)
    return raw


@pytest.fixture
def torch_threads(request):
    """Run with ``request.param`` torch threads (None: torch's default), restored afterwards."""
    before = torch.get_num_threads()
    if request.param:
        torch.set_num_threads(request.param)
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def record(benchmark, name: str) -> None:
    median = benchmark.stats.stats.median
    TIMES[name] = median
    benchmark.extra_info["weights_per_second"] = K * N / median
    if "gguf_q4_k" not in TIMES:
        return
    for exl2_name in [n for n in TIMES if n.startswith("exl2")]:
        ratio = TIMES["gguf_q4_k"] / TIMES[exl2_name]
        benchmark.extra_info[f"{exl2_name}_speed_over_gguf_q4_k"] = ratio
        RATIOS[f"{exl2_name} / gguf-py Q4_K, dequantize {K} x {N}"] = (
            ratio, {exl2_name: K * N / TIMES[exl2_name], "gguf_q4_k": K * N / TIMES["gguf_q4_k"]})
        print(f"\n{exl2_name} {K * N / TIMES[exl2_name] / 1e6:.0f} M weights/s, gguf-py Q4_K "
              f"{K * N / TIMES['gguf_q4_k'] / 1e6:.0f} M weights/s: ratio {ratio:.2f}")


# gguf-py decodes with numpy on one thread; the reference is measured on one torch thread (the
# side-by-side figure) and with torch's default thread count.
@pytest.mark.parametrize("torch_threads", [1, None], ids=["1-thread", "default-threads"], indirect=True)
def test_exl2_reference_dequantize(benchmark, exl2_layer, torch_threads):
    out = benchmark.pedantic(dequantize, args=(exl2_layer,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert out.shape == (K, -(-N // 32) * 32) and out.dtype == torch.float16
    benchmark.extra_info["bpw"] = exl2_layer.bits_per_weight
    benchmark.extra_info["torch_threads"] = torch_threads
    record(benchmark, f"exl2_reference_{torch_threads}_thread{'s' if torch_threads > 1 else ''}")


def test_gguf_q4_k_dequantize(benchmark, q4_k_blocks):
    import gguf

    out = benchmark.pedantic(gguf.quants.dequantize, args=(q4_k_blocks, gguf.GGMLQuantizationType.Q4_K),
                             rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert out.size == K * N and np.isfinite(out).all()
    benchmark.extra_info["bpw"] = 8 * Q4_K_BYTES / Q4_K_WEIGHTS
    record(benchmark, "gguf_q4_k")
