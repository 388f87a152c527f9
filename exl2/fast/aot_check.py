"""Compile every fast-path kernel for a GPU target without a GPU (ahead of time, to cubin with
the ptxas that Triton ships), so that errors only the compiler sees (constexpr handling, types
of branches, layouts) show up on a machine without a GPU too.

    python exl2/fast/aot_check.py [--arch 90] [--arch 80]

Run as a script, with TRITON_INTERPRET unset: it loads ``kernels.py`` by path, so that importing
:mod:`exl2.fast` (which turns the interpreter on where there is no GPU) is not needed. Prints one
line per kernel and exits 1 if any fails to compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

#: Per kernel: pointer argument types and the constexpr values to compile with. Arguments not
#: named are int32 scalars.
KERNELS: dict[str, tuple[dict[str, str], dict[str, object]]] = {
    "gemv_kernel": (dict(x_ptr="*fp16", dest_ptr="*i32", qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16",
                         tile_bits_ptr="*i32", tile_row_ptr="*i32", tile_qrow_ptr="*i32", tile_group_ptr="*i32",
                         part_ptr="*fp32"), dict(M_MAX=2, BLOCK_N=256)),
    "split_sum_kernel": (dict(part_ptr="*fp32", bias_ptr="*fp16", y_ptr="*fp16"), dict(HAS_BIAS=True, BLOCK=1024)),
    "gptq_group_kernel": (dict(w_ptr="*fp32", u_ptr="*fp32", scale_ptr="*fp32", code_ptr="*i64", err_ptr="*fp32"),
                          dict(BLOCK_R=128, BLOCK_N=32)),
    "dequantize_kernel": (dict(qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16", qrow_ptr="*i32", shift_ptr="*i32",
                               bits_ptr="*i32", group_ptr="*i32", dest_ptr="*i32", out_ptr="*fp16"),
                          dict(BLOCK_K=32, BLOCK_N=64)),
    "matmul_kernel": (dict(x_ptr="*fp16", qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16", qrow_ptr="*i32",
                           shift_ptr="*i32", bits_ptr="*i32", group_ptr="*i32", bias_ptr="*fp16", y_ptr="*fp16"),
                      dict(HAS_BIAS=True, X_IS_F16=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32)),
    "encode_kernel": (dict(w_ptr="*fp32", scale_ptr="*fp32", code_ptr="*i64", value_ptr="*fp32"),
                      dict(BLOCK_R=16, BLOCK_N=64)),
    "pack_kernel": (dict(code_ptr="*i64", row0_ptr="*i32", word_ptr="*i32", out_ptr="*i32"),
                    dict(MAX_CODES=18, BLOCK_W=16, BLOCK_N=64)),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="CUDA compute capability, e.g. 90 (default: 80 and 90)")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("exl2_fast_kernels", Path(__file__).with_name("kernels.py"))
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    failed = 0
    for arch in args.arch or [80, 90]:
        for name, (pointers, constexprs) in KERNELS.items():
            fn = getattr(kernels, name)
            signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
                ptx = compiled.asm.get("ptx", "")
                print(f"sm_{arch} {name}: ok ({time.perf_counter() - t0:.1f} s, {ptx.count(chr(10))} PTX lines, "
                      f"{'cubin' if 'cubin' in compiled.asm else 'no cubin'})", flush=True)
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failed += 1
                cause = f" ({e.__cause__!r})" if e.__cause__ else ""
                print(f"sm_{arch} {name}: FAILED {type(e).__name__}: {e}{cause}"[:4000], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
