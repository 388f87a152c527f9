"""GPU benchmark of the fast path (run by benchmarks/gpu.sh; needs an NVIDIA or AMD GPU).

Times ``exl2.fast.matmul`` for 4096x4096, 4096x14336 and 14336x4096 layers (in x out) at 2.5,
4.0 and 6.0 bpw for M = 1, 4, 16, 128, 2048 against torch float16 matmul of the same shape,
reports the achieved memory bandwidth as a fraction of the device's peak, times quantize of one
4096x14336 layer, and writes a markdown table.

    python benchmarks/gpu_bench.py --out results.md [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layers import random_layer  # noqa: E402

#: Peak memory bandwidth, bytes/s, by device-name substring (vendor figures).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                  "A100 80GB": 1.94e12, "A100": 1.56e12, "L40S": 0.864e12, "RTX 4090": 1.008e12, "RTX 3090": 0.936e12,
                  "MI300X": 5.3e12, "MI250": 3.2e12}
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
BPWS = [2.5, 4.0, 6.0]
MS = [1, 4, 16, 128, 2048]


def peak_bandwidth() -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return bw, f"{name} (vendor peak {bw / 1e12:.2f} TB/s)"
    # unknown device: measure a device-to-device copy
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    bw = 2 * a.numel() / (ms / 1e3)
    return bw, f"{name} (measured copy {bw / 1e12:.2f} TB/s)"


def bench(fn) -> float:
    """Median milliseconds."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def layer_bytes(qm) -> int:
    return sum(t.numel() * t.element_size() for t in (qm.q_weight, qm.q_scale, qm.q_scale_max, qm.q_invperm))


def main() -> None:
    from exl2 import QParams, fast

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="one shape, two M values (a smoke run)")
    args = p.parse_args()
    assert torch.cuda.is_available(), "gpu_bench.py needs a GPU"
    peak, device = peak_bandwidth()
    shapes, ms_list = (SHAPES[:1], [1, 2048]) if args.quick else (SHAPES, MS)
    rows = []
    for k, n in shapes:
        w16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
        for bpw in BPWS:
            qm = random_layer(k, n, bpw, device="cuda")
            fast.dequantize(qm)  # compile, and check once
            t_deq = bench(lambda: fast.dequantize(qm))
            for m in ms_list:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                t_q = bench(lambda: fast.matmul(x, qm))
                t_h = bench(lambda: x @ w16)
                moved = layer_bytes(qm) + x.numel() * 2 + m * n * 2
                rows.append((k, n, bpw, m, qm.bits_per_weight, t_q, t_h, t_h / t_q, moved / (t_q / 1e3) / peak, t_deq))
                print(rows[-1], flush=True)
    w = torch.randn(14336, 4096, device="cuda")
    t0 = time.perf_counter()
    fast.quantize(w, QParams(64, [5, 4, 3], [0.2, 0.6, 0.2]))
    torch.cuda.synchronize()
    t_rtn = time.perf_counter() - t0
    lines = [f"Device: {device}", "", "| in x out | bpw (target/stored) | M | exl2 fast (ms) | torch fp16 (ms) | speed-up | "
             "bandwidth / peak | dequantize alone (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k, n, bpw, m, real, t_q, t_h, su, frac, t_deq in rows:
        lines.append(f"| {k}x{n} | {bpw}/{real:.2f} | {m} | {t_q:.4f} | {t_h:.4f} | {su:.2f}x | {frac:.0%} | {t_deq:.4f} |")
    lines += ["", f"Quantize (round-to-nearest, scale search + encode + pack) of one 4096x14336 layer: {t_rtn:.2f} s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
