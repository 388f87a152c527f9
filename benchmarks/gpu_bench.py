"""GPU benchmark of the fast path (run by benchmarks/gpu.sh; needs an NVIDIA or AMD GPU).

Times ``exl2.fast.matmul`` for 4096x4096, 4096x14336 and 14336x4096 layers (in x out) at 2.5,
4.0 and 6.0 bpw for M = 1, 4, 16, 128, 2048 against torch float16 matmul of the same shape and,
for M <= 128, against exllamav2's own ``gemm_half_q_half`` on the same layer (its extension built
by build_exllamav2.sh, loaded by exllamav2_kernels.py; the column stays empty where it is not
there), reports the achieved memory bandwidth as a fraction of the device's peak, checks the
targets of issues 4 and 14, checks that exllamav2's ``reconstruct`` of each benchmark layer equals
``exl2.fast.dequantize`` bit for bit, times each of the three matmul paths over M (the data to
set ``GEMV_MAX_M`` and ``MATMUL_CROSSOVER_M``), times quantize (round-to-nearest and GPTQ) of one
4096x14336 layer, and writes a markdown report (rewritten after every row, so a run cut short
keeps what it measured).

    python benchmarks/gpu_bench.py --out results.md [--quick]
    python benchmarks/gpu_bench.py --out tuning.md --sweep       # launch configurations instead
    python benchmarks/gpu_bench.py --out smoke.md --cpu-smoke   # tiny shapes, Triton interpreter

``--sweep`` times the GEMV at M = 1, 2, 4 over columns per program, warps, programs per
multiprocessor and x gathered or not, and the fused kernel's rows and columns per program at
M = 16 and 32, on one
4096x14336 4.0-bpw layer, and names the fastest of each: the values for exl2/fast/tuning.py.

Layers are built from random codes on the device (no encoder run): the kernels' work does not
depend on the values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before torch and triton are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exl2 import QMatrix, QParams  # noqa: E402

#: Peak memory bandwidth, bytes/s, by device-name substring, most specific first (vendor figures).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                  "H100 NVL": 3.9e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12, "A100 80GB PCIe": 1.94e12,
                  "A100": 1.56e12, "L40S": 0.864e12, "RTX 4090": 1.008e12, "RTX 3090": 0.936e12,
                  "MI300X": 5.3e12, "MI250": 3.2e12}
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 4, 16, 128, 2048]
#: Mixes near the three bitrates the issue names (the report gives the stored bits per weight).
MIXES = {
    2.5: QParams({3: 64, 2: 64}, [3, 2], [0.3, 0.7]),
    4.0: QParams({5: 64, 4: 64, 3: 64}, [5, 4, 3], [0.2, 0.6, 0.2]),
    6.0: QParams({8: 64, 6: 64, 5: 64}, [8, 6, 5], [0.1, 0.6, 0.3]),
}
#: M values of the path comparison (every path is timed at each).
PATH_MS = [1, 2, 4, 8, 16, 32, 64, 128]
#: Largest M at which exllamav2's gemm_half_q_half is timed beside ours.
EXLLAMAV2_MAX_M = 128
#: Calls before timing exllamav2's kernel: its autotuner measures the first 200 calls of each
#: shape (AT_NUM_MEASURE, exllamav2_ext/cuda/q_gemm_autotune.cuh) before it settles.
EXLLAMAV2_WARMUP_CALLS = 250


def random_layer(in_features: int, out_features: int, bpw: float, device: str, seed: int = 0) -> QMatrix:
    """A valid layer of the mix for ``bpw``, from random codes, scales and permutation, built on ``device``."""
    from exl2 import fast
    from exl2.reference import pack

    g = torch.Generator(device=device).manual_seed(seed)
    plan = MIXES[bpw].plan(in_features).groups
    codes = torch.cat([torch.randint(0, 1 << b, (n, out_features), generator=g, device=device) for b, _, n in plan])
    qs = torch.randint(1, 17, (len(plan), out_features), generator=g, device=device)
    smax = torch.rand(len(plan), generator=g, device=device) * 0.1 + 0.01
    perm = torch.randperm(in_features, generator=g, device=device)
    return pack(codes, plan, qs, smax, perm, out_features, pack_group=fast.pack_codes)


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: ``triton.testing.do_bench`` (CUDA events, L2 flushed) on a
    GPU, wall clock on the CPU (smoke runs only: interpreted kernels, meaningless figures)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def peak_bandwidth(device: str, bench) -> tuple[float | None, str]:
    """Bytes/s of the device: the vendor figure when the name is in the table, else a measured
    device-to-device copy (read + write)."""
    if device != "cuda":
        return None, "CPU (Triton interpreter): smoke run, times are not performance figures"
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return bw, f"{name} (vendor peak {bw / 1e12:.2f} TB/s)"
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    bw = 2 * a.numel() / (ms / 1e3)
    return bw, f"{name} (no table entry; measured copy {bw / 1e12:.2f} TB/s used as peak)"


def layer_bytes(qm: QMatrix) -> int:
    """Bytes a product must read of the layer: every stored tensor once."""
    return sum(t.numel() * t.element_size() for t in (qm.q_weight, qm.q_scale, qm.q_scale_max, qm.q_invperm))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="one shape, M = 1 and 2048, no path sweep")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under Triton's interpreter (no GPU)")
    p.add_argument("--sweep", action="store_true", help="time launch configurations (exl2/fast/tuning.py) instead")
    args = p.parse_args()
    from exl2 import fast
    from exl2.fast import ops

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench.py needs a GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    bench = timer(device)
    peak, device_line = peak_bandwidth(device, bench)
    if args.sweep:
        return sweep(args.out, device, device_line, bench, args.cpu_smoke)
    shapes, ms_list, path_ms = SHAPES, MS, PATH_MS
    if args.quick:
        shapes, ms_list, path_ms = SHAPES[:1], [1, 2048], []
    if args.cpu_smoke:
        shapes, ms_list, path_ms = [(128, 96)], [1, 4, 16, 40], [1, 8, 40]
    frac = (lambda nbytes, ms: f"{nbytes / (ms / 1e3) / peak:.0%}") if peak else (lambda nbytes, ms: "n/a")

    exllamav2, exllamav2_note = exllamav2_kernels(device)
    lines = [f"Device: {device_line}", f"torch {torch.__version__}", f"exllamav2's kernels: {exllamav2_note}", "",
             "## exl2.fast.matmul against torch float16 matmul and exllamav2's gemm_half_q_half", "",
             "| in x out | bpw (mix/stored) | M | exl2 fast (ms) | fp16 (ms) | speed-up | exllamav2 (ms) | "
             "exllamav2 / exl2 fast | exl2 bandwidth / peak | fp16 bandwidth / peak | dequantize (ms) | "
             "fp16 + dequantize (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts, same_decode = [], []
    layers: dict[tuple[int, int, float], QMatrix] = {}
    for k, n in shapes:
        w16 = torch.randn(k, n, device=device, dtype=torch.float16)
        for bpw in MIXES:
            qm = layers[k, n, bpw] = random_layer(k, n, bpw, device)
            ours = fast.dequantize(qm)  # checks the layer once, compiles
            t_deq = bench(lambda: fast.dequantize(qm))
            theirs = exllamav2.Exllamav2Layer(qm.to_tensors()) if exllamav2 else None
            if theirs is not None:
                equal = torch.equal(theirs.reconstruct().view(torch.int16), ours.view(torch.int16))
                same_decode.append(f"- {k}x{n}, {bpw} bpw: exllamav2's reconstruct "
                                   f"{'equals' if equal else 'DIFFERS FROM'} exl2.fast.dequantize bit for bit")
            del ours
            for m in ms_list:
                x = torch.randn(m, k, device=device, dtype=torch.float16)
                t_q = bench(lambda: fast.matmul(x, qm))
                t_h = bench(lambda: x @ w16)
                t_ex = None
                if theirs is not None and m <= EXLLAMAV2_MAX_M:
                    for _ in range(EXLLAMAV2_WARMUP_CALLS):
                        theirs.gemm(x)
                    t_ex = bench(lambda: theirs.gemm(x))
                moved = layer_bytes(qm) + x.numel() * 2 + m * n * 2
                moved_h = w16.numel() * 2 + x.numel() * 2 + m * n * 2
                ex_cells = f"{t_ex:.4f} | {t_ex / t_q:.2f}x" if t_ex else "- | -"
                lines.append(f"| {k}x{n} | {bpw}/{qm.bits_per_weight:.2f} | {m} | {t_q:.4f} | {t_h:.4f} | "
                             f"{t_h / t_q:.2f}x | {ex_cells} | {frac(moved, t_q)} | {frac(moved_h, t_h)} | "
                             f"{t_deq:.4f} | {t_h + t_deq:.4f} |")
                report(args.out, lines)
                if bpw == 4.0 and m == 1 and peak:
                    ok = t_h / t_q >= 3 and moved / (t_q / 1e3) / peak >= 0.7
                    verdicts.append(f"- {k}x{n}, 4.0 bpw, M = 1: {t_h / t_q:.2f}x fp16, "
                                    f"{moved / (t_q / 1e3) / peak:.0%} of peak: {'met' if ok else 'NOT met'} "
                                    f"(target: >= 3x and >= 70 %)")
                    if t_ex:
                        verdicts.append(f"- {k}x{n}, 4.0 bpw, M = 1: exl2 fast {t_q:.4f} ms, exllamav2 {t_ex:.4f} ms: "
                                        f"{'met' if t_q <= t_ex else 'NOT met'} (target: at least as fast)")
                if m == max(ms_list) and peak:
                    ok = t_q <= (t_h + t_deq) * 1.05
                    verdicts.append(f"- {k}x{n}, {bpw} bpw, M = {m}: {t_q:.3f} ms vs fp16 + dequantize "
                                    f"{t_h + t_deq:.3f} ms: {'met' if ok else 'NOT met'} (5 % timing slack)")
            if theirs is not None:
                theirs.close()
        del w16
    lines += ["", "## Targets (issues 4 and 14)", ""] + (verdicts or ["- not judged (no GPU)"])
    lines += ["", "## exllamav2's reconstruct of the benchmark layers", ""] + (same_decode or [f"- not run: {exllamav2_note}"])

    if path_ms:
        k, n = shapes[1] if len(shapes) > 1 else shapes[0]
        qm = layers[k, n, 4.0]
        lines += ["", f"## The three paths over M ({k}x{n}, 4.0 bpw; ms)", "",
                  f"GEMV_MAX_M = {fast.GEMV_MAX_M}, MATMUL_CROSSOVER_M = {fast.MATMUL_CROSSOVER_M} now.", "",
                  "| M | gemv | fused | dequantize + matmul |", "|---:|---:|---:|---:|"]
        for m in path_ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            t_gemv = f"{bench(lambda: ops.gemv(x, qm)):.4f}" if m <= fast.GEMV_MAX_M else "-"
            lines.append(f"| {m} | {t_gemv} | {bench(lambda: ops.fused_matmul(x, qm)):.4f} | "
                         f"{bench(lambda: ops.dequantize_matmul(x, qm)):.4f} |")
            report(args.out, lines)

    k, n = (4096, 14336) if not args.cpu_smoke else (128, 96)
    g = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(n, k, generator=g, device=device)
    xs = torch.randn(2048 if not args.cpu_smoke else 256, k, generator=g, device=device)
    h = xs.T @ xs / xs.shape[0]
    lines += ["", f"## Quantize one {k}x{n} layer ({MIXES[4.0].desc()})", ""]
    for label, hessian in (("round-to-nearest", None), ("GPTQ", h)):
        fast.quantize(w[:64], MIXES[4.0], None if hessian is None else hessian)  # compile outside the timing
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fast.quantize(w, MIXES[4.0], hessian)
        if device == "cuda":
            torch.cuda.synchronize()
        lines.append(f"- {label}: {time.perf_counter() - t0:.2f} s")
        report(args.out, lines)
    return 0


def exllamav2_kernels(device: str):
    """benchmarks.exllamav2_kernels when exllamav2's extension can run here, else None; and a line
    for the report saying which."""
    if device != "cuda":
        return None, "not run (no GPU)"
    from benchmarks import exllamav2_kernels as kernels

    ok, why = kernels.available()
    if not ok:
        return None, f"not run ({why})"
    so = next(kernels.extension_dir().glob("exllamav2_ext*.so"))
    return kernels, f"exllamav2_ext from {so.name} (gemm_half_q_half, force_cuda off: its own choice of path)"


def report(path: Path, lines: list[str]) -> None:
    """Print the newest line and rewrite the report with every line so far."""
    print(lines[-1], flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def sweep(out: Path, device: str, device_line: str, bench, smoke: bool) -> int:
    """Time the GEMV and fused kernel over launch configurations on one 4.0-bpw layer; name the
    fastest per M. Each configuration is checked against the default one's result first."""
    from exl2.fast import ops, tuning
    from exl2.fast.tuning import GemvConfig

    k, n = (128, 96) if smoke else (4096, 14336)
    qm = random_layer(k, n, 4.0, device)
    lines = [f"Device: {device_line}", f"torch {torch.__version__}", "",
             f"## GEMV launch configurations ({k}x{n}, 4.0 bpw; ms, median)", "",
             "Now: " + ", ".join(f"M_MAX={m}: {c}" for m, c in tuning.GEMV_CONFIGS.items()), "",
             "| M | columns per program | warps | columns per thread | programs per SM | x gathered | ms |",
             "|---:|---:|---:|---:|---:|---|---:|"]
    shapes = {1: [(256, 4), (512, 4), (512, 2), (1024, 4), (1024, 2)], 2: [(512, 4), (512, 2), (1024, 2)],
              4: [(256, 4), (512, 4), (512, 2)]}
    best = []
    for m, configs in shapes.items():
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        expected = ops.gemv(x, qm)
        results = []
        for (block_n, warps), pps, gather in ((c, p, g) for c in configs for p in ((4,) if smoke else (2, 4, 8))
                                              for g in ((False, True) if m == 1 else (False,))):
            cfg = GemvConfig(block_n, warps, pps, gather)
            y = ops.gemv(x, qm, None, cfg)
            if not torch.allclose(y.float(), expected.float(), rtol=1e-2, atol=1e-2):
                lines.append(f"| {m} | {block_n} | {warps} | {cfg.columns_per_thread} | {pps} | {gather} | WRONG RESULT |")
                report(out, lines)
                continue
            t = bench(lambda: ops.gemv(x, qm, None, cfg))
            results.append((t, cfg))
            lines.append(f"| {m} | {block_n} | {warps} | {cfg.columns_per_thread} | {pps} | {gather} | {t:.4f} |")
            report(out, lines)
        if results:
            t, cfg = min(results, key=lambda r: r[0])
            now = min((r for r in results if r[1] == tuning.GEMV_CONFIGS[m]), default=None,
                      key=lambda r: r[0])
            best.append(f"- M_MAX={m}: fastest {cfg} at {t:.4f} ms" +
                        (f"; the current setting {now[0]:.4f} ms" if now else ""))

    lines += ["", f"## Fused kernel tile ({k}x{n}, 4.0 bpw; ms)", "", "| M | FUSED_BLOCK_M | FUSED_BLOCK_N | ms |",
              "|---:|---:|---:|---:|"]
    saved = ops.FUSED_BLOCK_M, ops.FUSED_BLOCK_N
    for m in (16, 32):
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        results = []
        for block_m, block_n in ((16, 64), (16, 128), (16, 256), (32, 64), (32, 128)):
            if block_m > m:
                continue
            ops.FUSED_BLOCK_M, ops.FUSED_BLOCK_N = block_m, block_n
            try:
                t = bench(lambda: ops.fused_matmul(x, qm))
            finally:
                ops.FUSED_BLOCK_M, ops.FUSED_BLOCK_N = saved
            results.append((t, block_m, block_n))
            lines.append(f"| {m} | {block_m} | {block_n} | {t:.4f} |")
            report(out, lines)
        t, block_m, block_n = min(results)
        best.append(f"- fused, M = {m}: fastest FUSED_BLOCK_M={block_m}, FUSED_BLOCK_N={block_n} at {t:.4f} ms")
    lines += ["", "## Fastest (set these in exl2/fast/tuning.py)", ""] + best
    report(out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
