"""Compile every fast-path kernel for GPU targets without a GPU (ahead of time: to a cubin with
the ptxas Triton ships for NVIDIA, to an hsaco with Triton's AMD back end for ROCm), in the
configurations :mod:`exl2.fast.ops` launches, so that errors only the compiler sees (constexpr
handling, types of branches, layouts) show up on a machine without a GPU too, and so that the
compiled code can be read.

    python exl2/fast/aot_check.py [--arch 90] [--arch 80] [--arch gfx942] [--sass] [--json]
    python exl2/fast/aot_check.py --arch 90 --sass --alternatives --results docs/results

``--arch`` takes a CUDA compute capability (80: A100, 90: H100/H200) or an AMD ``gfx`` name
(gfx942: MI300X, gfx90a: MI250); by default 80, 90 and gfx942. Per kernel it prints registers per
thread and the stack frame (non-zero: registers spilled to memory), read from the cubin with
Triton's ``cuobjdump`` (NVIDIA) or from the AMDGCN listing (VGPRs, scratch size). With ``--sass`` it also
disassembles the GEMV and dequantize kernels (Triton's ``nvdisasm``) and counts, per width, the
instructions a thread spends per decoded weight (and row of x, for the GEMV): the figure their
speed hangs on when memory is not the limit (see docs/performance.md). ``--json`` prints one JSON object per compiled kernel instead of text.
``--alternatives`` also compiles the GEMV's other launch configurations at M = 1
(:data:`GEMV_ALTERNATIVES`); ``--results DIR`` writes ``DIR/compiled.json`` and the table
``DIR/compiled.md``, which docs/performance.md and README.md quote (docs/figures.py).

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
    "dequantize_kernel": dict(qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16", dest_ptr="*i32", tile_bits_ptr="*i32",
                              tile_row_ptr="*i32", tile_qrow_ptr="*i32", tile_group_ptr="*i32", out_ptr="*fp16"),
    "matmul_kernel": dict(x_ptr="*fp16", qw_ptr="*i32", qs_ptr="*i32", smax_ptr="*fp16", tile_bits_ptr="*i32",
                          tile_row_ptr="*i32", tile_qrow_ptr="*i32", tile_group_ptr="*i32", bias_ptr="*fp16",
                          y_ptr="*fp16"),
    "encode_kernel": dict(w_ptr="*fp32", scale_ptr="*fp32", code_ptr="*i64", value_ptr="*fp32"),
    "pack_kernel": dict(code_ptr="*i64", row0_ptr="*i32", word_ptr="*i32", out_ptr="*i32"),
}
ALIGNED_INTS = {"stride_xm", "stride_qw", "stride_qs", "stride_out", "stride_ym", "N", "K", "MN"}

#: GEMV launches at M = 1 compared with the chosen one by ``--alternatives``: (columns per
#: program, warps, x gathered), each compiled and counted like the configurations in use.
GEMV_ALTERNATIVES = [(256, 4, False), (512, 4, False), (512, 2, False), (1024, 2, False), (1024, 2, True)]


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
        ("dequantize_kernel", "", dict(BLOCK_N=tuning.DEQUANT_BLOCK_N), tuning.DEQUANT_WARPS),
        ("matmul_kernel", "", dict(HAS_BIAS=True, X_IS_F16=True, BLOCK_M=tuning.FUSED_BLOCK_M,
                                   BLOCK_N=tuning.FUSED_BLOCK_N, BLOCK_K=tuning.FUSED_BLOCK_K), 4),
        ("encode_kernel", "", dict(BLOCK_R=16, BLOCK_N=tuning.ENCODE_BLOCK_N), 4),
        ("pack_kernel", "", dict(MAX_CODES=18, BLOCK_W=16, BLOCK_N=tuning.ENCODE_BLOCK_N), 4),
    ]
    return out


def alternatives() -> list[tuple[str, str, dict[str, object], int]]:
    return [("gemv_kernel", f"M_MAX=1 {n}x{w}w" + (" gathered" if g else ""), dict(M_MAX=1, BLOCK_N=n, X_PERMUTED=g), w)
            for n, w, g in GEMV_ALTERNATIVES]


def target(arch: str):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("hip", arch, 64) if arch.startswith("gfx") else GPUTarget("cuda", int(arch), 32)


def compile_kernel(kernels, name: str, constexprs: dict[str, object], warps: int, arch: str | int):
    import triton
    from triton.compiler import ASTSource

    fn = getattr(kernels, name)
    pointers = POINTERS[name]
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in pointers or a in ALIGNED_INTS}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target(str(arch)), options={"num_warps": warps})


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def amd_resources(amdgcn: str) -> dict[str, int]:
    """VGPRs per thread and scratch bytes (spills) from Triton's AMDGCN listing."""
    value = lambda key: int(re.search(rf"; {key}: (\d+)", amdgcn).group(1))  # noqa: E731
    return dict(registers=value("TotalNumVgprs"), stack=value("ScratchSize"))


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack frame bytes of the cubin's kernel (``cuobjdump``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups())))


def tile_instructions(cubin: bytes, weights_per_pass: dict[int, int]) -> dict[int, float]:
    """Per width: the SASS instructions a thread executes for one tile of that width, per
    decoded weight (``weights_per_pass[bits]``: the weights one thread decodes per tile, times
    the rows of x for the GEMV). Both tile-walking kernels pick the width by a jump table whose
    targets are in the order of ``bits - 2`` (2, 3, 4, 5, 6 bits; 8 is the fall-through). The
    GEMV loops over tiles: a pass is the loop's head (tile table, scales, the jump), the width's
    branch and the join they share, up to the jump back. Dequantize decodes one tile per
    program: the code before the jump, then the width's branch up to its exit."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"^(\.L_x_\d+):", line))}
    is_instruction = re.compile(r"/\*[0-9a-f]+\*/\s")
    jump = re.compile(r"/\*[0-9a-f]+\*/\s+BRA `\((\.L_x_\d+)\)")  # unconditional: no @P guard
    exit_ = re.compile(r"/\*[0-9a-f]+\*/\s+EXIT\b")

    def jump_at(i: int) -> str | None:
        m = jump.search(sass[i])
        return m.group(1) if m else None

    def count(first: int, last: int) -> int:
        return sum(bool(is_instruction.search(line)) for line in sass[first:last + 1])

    brx = next(i for i, line in enumerate(sass) if "BRANCH_TARGETS" in line)
    targets = re.search(r"BRANCH_TARGETS ([^\"]*)\"", sass[brx]).group(1).split(",")
    join, joins = collections.Counter(t for i in range(len(sass)) if (t := jump_at(i))).most_common(1)[0]
    looped = joins >= len(targets)  # every branch jumps to a shared join

    def branch(label: str) -> int:  # follows unconditional jumps until the join or an exit
        n, i = 0, labels[label] + 1
        while not (looped and sass[i].startswith(join + ":")):
            if is_instruction.search(sass[i]):
                n += 1
                if not looped and exit_.search(sass[i]):
                    break
                if (t := jump_at(i)) is not None:
                    if looped and t == join:
                        break
                    i = labels[t]
            i += 1
        return n

    if looped:
        i = labels[join]
        while not jump_at(i):
            i += 1
        shared = count(labels[jump_at(i)], brx) + count(labels[join], i)  # the jump back names the loop's head
    else:
        shared = count(0, brx)
    return {bits: (shared + branch(t)) / weights_per_pass[bits] for bits, t in zip((2, 3, 4, 5, 6), targets)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append",
                   help="CUDA compute capability (90) or AMD gfx name (gfx942); default 80, 90 and gfx942")
    p.add_argument("--sass", action="store_true", help="count the GEMV's instructions per weight (nvdisasm)")
    p.add_argument("--json", action="store_true", help="one JSON object per compiled kernel")
    p.add_argument("--alternatives", action="store_true", help="also the GEMV's other launches at M = 1")
    p.add_argument("--results", type=Path, metavar="DIR", help="write DIR/compiled.json and DIR/compiled.md")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    kernels, tuning = load("kernels"), load("tuning")
    failed = 0
    rows = []
    for arch in args.arch or ["80", "90", "gfx942"]:
        prefix = arch if arch.startswith("gfx") else f"sm_{arch}"
        extra = [(n, label, c, w, True) for n, label, c, w in alternatives()] if args.alternatives else []
        for name, label, constexprs, warps, alternative in [(*x, False) for x in launches(tuning)] + extra:
            t0 = time.perf_counter()
            row = dict(arch=arch, kernel=name, config=label, warps=warps, alternative=alternative,
                       block_n=constexprs.get("BLOCK_N"), gathered=bool(constexprs.get("X_PERMUTED", False)))
            try:
                compiled = compile_kernel(kernels, name, constexprs, warps, arch)
                amd = arch.startswith("gfx")
                cubin = None if amd else compiled.asm["cubin"]
                row.update(ok=True, seconds=round(time.perf_counter() - t0, 1),
                           **(amd_resources(compiled.asm["amdgcn"]) if amd else resources(cubin)))
                if args.sass and not amd and name in ("gemv_kernel", "dequantize_kernel"):
                    per_thread = constexprs["BLOCK_N"] // (32 * warps) * constexprs.get("M_MAX", 1)
                    weights = {b: (16 if b == 2 else 32) * per_thread for b in (2, 3, 4, 5, 6)}
                    row["instructions_per_weight"] = {b: round(v, 2) for b, v in
                                                      tile_instructions(cubin, weights).items()}
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failed += 1
                cause = f" ({e.__cause__!r})" if e.__cause__ else ""
                row.update(ok=False, error=f"{type(e).__name__}: {e}{cause}"[:4000])
            if args.json:
                print(json.dumps(row), flush=True)
            elif row["ok"]:
                ipw = row.get("instructions_per_weight")
                print(f"{prefix} {name} {label}: ok ({row['seconds']} s, {row['registers']} registers, "
                      f"stack {row['stack']} B" + (", instructions per weight " + " ".join(
                          f"{b}b {v}" for b, v in ipw.items()) if ipw else "") + ")", flush=True)
            else:
                print(f"{prefix} {name} {label}: FAILED {row['error']}", flush=True)
            rows.append(row)
    if args.results:
        write_results(rows, args.results)
    return 1 if failed else 0


def write_results(rows: list[dict], directory: Path) -> None:
    """``compiled.json``: per target (``sm_90``, ``gfx942``) and kernel, registers, stack and
    instructions per weight (keys without spaces or dots, for docs/figures.py): ``gemv.m1`` for
    the GEMV launched at M <= 1, ``gemv_alternatives`` for ``--alternatives``; with those,
    ``compiled.md``: the GEMV's launches at M = 1 in sm_90 code as a table."""
    import triton

    out: dict[str, dict] = {}
    for row in (r for r in rows if r["ok"]):
        target = row["arch"] if row["arch"].startswith("gfx") else f"sm_{row['arch']}"
        entry = {k: row[k] for k in ("registers", "stack", "warps") if k in row}
        if row.get("block_n"):
            entry.update(block_n=row["block_n"], gathered=row["gathered"])
        if "instructions_per_weight" in row:
            entry["per_weight"] = {f"b{b}": v for b, v in row["instructions_per_weight"].items()}
        kernels_out = out.setdefault(target, {})
        name = row["kernel"].removesuffix("_kernel")
        if row["alternative"]:
            kernels_out.setdefault("gemv_alternatives", []).append(entry)
        elif name == "gemv":
            kernels_out.setdefault("gemv", {})[f"m{row['config'].split()[0].split('=')[1]}"] = entry
        else:
            kernels_out[name] = entry
    directory.mkdir(parents=True, exist_ok=True)
    data = dict(triton=triton.__version__, command=" ".join(["python exl2/fast/aot_check.py", *sys.argv[1:]]),
                targets=out)
    (directory / "compiled.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.get("sm_90", {}).get("gemv_alternatives"):
        (directory / "compiled.md").write_text(gemv_table(out["sm_90"]), encoding="utf-8")


def gemv_table(sm90: dict) -> str:
    """The GEMV's launches at M = 1 in sm_90 code: instructions per weight by width, registers, spills."""
    chosen = sm90.get("gemv", {}).get("m1", {})
    lines = ["| columns per program x warps | columns per thread | registers | stack (spills) | 2-bit | 3-bit | 4-bit "
             "| 5-bit | 6-bit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sm90.get("gemv_alternatives", []):
        label = f"{e['block_n']} x {e['warps']}" + (", x gathered" if e["gathered"] else "")
        if (e["block_n"], e["warps"], e["gathered"]) == (chosen.get("block_n"), chosen.get("warps"), chosen.get("gathered")):
            label = f"**{label}** (chosen)"
        per = e.get("per_weight", {})
        lines.append(f"| {label} | {e['block_n'] // (32 * e['warps'])} | {e['registers']} | {e['stack']} | "
                     + " | ".join(f"{per.get(f'b{b}', float('nan')):.2f}" for b in (2, 3, 4, 5, 6)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
