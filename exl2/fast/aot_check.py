"""Compile every fast-path kernel for a GPU target without a GPU (ahead of time, to cubin with
the ptxas that Triton ships), in the configurations :mod:`exl2.fast.ops` launches, so that errors
only the compiler sees (constexpr handling, types of branches, layouts) show up on a machine
without a GPU too, and so that the compiled code can be read.

    python exl2/fast/aot_check.py [--arch 90] [--arch 80] [--sass] [--json]

Per kernel it prints registers per thread and the stack frame (non-zero: registers spilled to
local memory), read from the cubin with Triton's ``cuobjdump``. With ``--sass`` it also
disassembles the GEMV (Triton's ``nvdisasm``) and counts the instructions of each width's branch
per decoded weight and row of x: the figure the kernel's speed at M = 1 hangs on (see
docs/performance.md). ``--json`` prints one JSON object per compiled kernel instead of text.

Run as a script, with TRITON_INTERPRET unset: it loads ``kernels.py`` and ``tuning.py`` by path,
so that importing :mod:`exl2.fast` (which turns the interpreter on where there is no GPU) is not
needed. Exits 1 if any kernel fails to compile.

Integer arguments are compiled as the launches specialize them on a GPU: pointers and the
strides and sizes that are multiples of 16 for the benchmark's shapes carry Triton's
divisibility hint, so that vectorized loads show as they will run.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Per kernel: pointer argument types, and the int arguments a launch sees as multiples of 16.
#: Arguments not named are int32 scalars.
POINTERS: dict[str, dict[str, str]] = {
    "gemv_kernel": dict(x_ptr="*fp16", dest_ptr="*i32", qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16",
                        tile_bits_ptr="*i32", tile_row_ptr="*i32", tile_qrow_ptr="*i32", tile_group_ptr="*i32",
                        part_ptr="*fp32"),
    "split_sum_kernel": dict(part_ptr="*fp32", bias_ptr="*fp16", y_ptr="*fp16"),
    "gptq_group_kernel": dict(w_ptr="*fp32", u_ptr="*fp32", scale_ptr="*fp32", code_ptr="*i64", err_ptr="*fp32"),
    "dequantize_kernel": dict(qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16", qrow_ptr="*i32", shift_ptr="*i32",
                              bits_ptr="*i32", group_ptr="*i32", dest_ptr="*i32", out_ptr="*fp16"),
    "matmul_kernel": dict(x_ptr="*fp16", qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16", qrow_ptr="*i32",
                          shift_ptr="*i32", bits_ptr="*i32", group_ptr="*i32", bias_ptr="*fp16", y_ptr="*fp16"),
    "encode_kernel": dict(w_ptr="*fp32", scale_ptr="*fp32", code_ptr="*i64", value_ptr="*fp32"),
    "pack_kernel": dict(code_ptr="*i64", row0_ptr="*i32", word_ptr="*i32", out_ptr="*i32"),
}
ALIGNED_INTS = {"stride_xm", "stride_qw", "stride_qs", "stride_out", "stride_ym", "N", "K", "MN"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"exl2_fast_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def launches(tuning) -> list[tuple[str, str, dict[str, object], int]]:
    """(kernel, label, constexprs, num_warps) for every configuration ops launches."""
    out = [("gemv_kernel", f"M_MAX={m} {c.block_n}x{c.warps}w",
            dict(M_MAX=m, BLOCK_N=c.block_n, X_PERMUTED=c.permute_x), c.warps)
           for m, c in sorted(tuning.GEMV_CONFIGS.items())]
    out += [
        ("split_sum_kernel", "", dict(HAS_BIAS=True, BLOCK=1024), 4),
        ("gptq_group_kernel", "", dict(BLOCK_R=tuning.GPTQ_GROUP_MAX_ROWS, BLOCK_N=tuning.GPTQ_BLOCK_N), 4),
        ("dequantize_kernel", "", dict(BLOCK_K=tuning.BLOCK_K, BLOCK_N=tuning.BLOCK_N), 4),
        ("matmul_kernel", "", dict(HAS_BIAS=True, X_IS_F16=True, BLOCK_M=tuning.FUSED_BLOCK_M,
                                   BLOCK_N=tuning.BLOCK_N, BLOCK_K=tuning.BLOCK_K), 4),
        ("encode_kernel", "", dict(BLOCK_R=16, BLOCK_N=tuning.BLOCK_N), 4),
        ("pack_kernel", "", dict(MAX_CODES=18, BLOCK_W=16, BLOCK_N=tuning.BLOCK_N), 4),
    ]
    return out


def compile_kernel(kernels, name: str, constexprs: dict[str, object], warps: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernels, name)
    pointers = POINTERS[name]
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in pointers or a in ALIGNED_INTS}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack frame bytes of the cubin's kernel (``cuobjdump``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups())))


def gemv_instructions(cubin: bytes, constexprs: dict[str, object], warps: int) -> dict[int, float]:
    """Per width: the SASS instructions one pass of the GEMV's tile loop executes for a tile of
    that width (the loop's head: tile table, scales, the jump; that width's branch; the join
    they share, up to the jump back), per decoded weight and row of x: the pass covers ``ROWS``
    stored rows x the thread's columns x ``M_MAX`` rows of x. The branches are the targets of
    the loop's jump table, in the order of ``bits - 2`` (2, 3, 4, 5, 6 bits)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"^(\.L_x_\d+):", line))}
    is_instruction = re.compile(r"/\*[0-9a-f]+\*/\s")
    jump = re.compile(r"/\*[0-9a-f]+\*/\s+BRA `\((\.L_x_\d+)\)")  # unconditional: no @P guard

    def jump_at(i: int) -> str | None:
        m = jump.search(sass[i])
        return m.group(1) if m else None

    join = collections.Counter(t for i in range(len(sass)) if (t := jump_at(i))).most_common(1)[0][0]
    i = labels[join]
    while not jump_at(i):
        i += 1
    head, join_end = jump_at(i), i  # the jump back to the loop's head ends the join
    brx = next(i for i, line in enumerate(sass) if "BRANCH_TARGETS" in line)
    targets = re.search(r"BRANCH_TARGETS ([^\"]*)\"", sass[brx]).group(1).split(",")

    def count(first: int, last: int) -> int:
        return sum(bool(is_instruction.search(line)) for line in sass[first:last + 1])

    def branch(label: str) -> int:  # follows unconditional jumps until the join
        n, i = 0, labels[label] + 1
        while not sass[i].startswith(join + ":"):
            if is_instruction.search(sass[i]):
                n += 1
                if (t := jump_at(i)) is not None:
                    if t == join:
                        break
                    i = labels[t]
            i += 1
        return n

    shared = count(labels[head], brx) + count(labels[join], join_end)
    per_thread = constexprs["BLOCK_N"] // (32 * warps) * constexprs["M_MAX"]
    return {bits: (shared + branch(t)) / ((16 if bits == 2 else 32) * per_thread)
            for bits, t in zip((2, 3, 4, 5, 6), targets)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="CUDA compute capability, e.g. 90 (default: 80 and 90)")
    p.add_argument("--sass", action="store_true", help="count the GEMV's instructions per weight (nvdisasm)")
    p.add_argument("--json", action="store_true", help="one JSON object per compiled kernel")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    kernels, tuning = load("kernels"), load("tuning")
    failed = 0
    for arch in args.arch or [80, 90]:
        for name, label, constexprs, warps in launches(tuning):
            t0 = time.perf_counter()
            row = dict(arch=arch, kernel=name, config=label, warps=warps)
            try:
                compiled = compile_kernel(kernels, name, constexprs, warps, arch)
                cubin = compiled.asm["cubin"]
                row.update(ok=True, seconds=round(time.perf_counter() - t0, 1), **resources(cubin))
                if args.sass and name == "gemv_kernel":
                    row["instructions_per_weight"] = {b: round(v, 2) for b, v in
                                                      gemv_instructions(cubin, constexprs, warps).items()}
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failed += 1
                cause = f" ({e.__cause__!r})" if e.__cause__ else ""
                row.update(ok=False, error=f"{type(e).__name__}: {e}{cause}"[:4000])
            if args.json:
                print(json.dumps(row), flush=True)
            elif row["ok"]:
                ipw = row.get("instructions_per_weight")
                print(f"sm_{arch} {name} {label}: ok ({row['seconds']} s, {row['registers']} registers, "
                      f"stack {row['stack']} B" + (", instructions per weight " + " ".join(
                          f"{b}b {v}" for b, v in ipw.items()) if ipw else "") + ")", flush=True)
            else:
                print(f"sm_{arch} {name} {label}: FAILED {row['error']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
