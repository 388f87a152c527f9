"""Compile exllamav2's extension for sm_90 and check the result without a GPU (run by
benchmarks/build_exllamav2.sh inside its Python 3.12 + torch 2.11 build environment).

The build is what exllamav2's own first import does when no prebuilt extension is installed
(``exllamav2/ext.py``: ``torch.utils.cpp_extension.load`` of every ``*.cpp`` / ``*.cu`` of
``exllamav2_ext/`` with ``-Ofast`` for C++ and ``-lineinfo -O3`` for nvcc), with the target fixed
to ``TORCH_CUDA_ARCH_LIST=9.0`` instead of the GPUs of the building machine (it has none).

Checks, as far as a machine without a GPU can go:

- the extension imports under CPython 3.12 with torch 2.11.0+cu130 (``load`` imports it; the
  stripped copy is imported again in a fresh interpreter), and exposes the functions that
  ``benchmarks/golden_fixtures.py`` calls;
- ``make_group_map``, the one of them that runs on the CPU, returns the group map of a small
  two-width layer (each row: its group, and the rows left in the group);
- every undefined dynamic symbol of the ``.so`` is defined by a library it names (DT_NEEDED),
  by the Python interpreter, or by cuBLAS (loaded globally by torch);
- the fatbin holds sm_90 machine code only (cuobjdump from Triton's package).

Writes the result, stripped, to ``OUT/exllamav2_ext.cpython-312-x86_64-linux-gnu.so`` and the
figures (build time, sizes, versions, checks) to ``--results`` (JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Functions of the extension that the golden-fixture script calls.
USED_FUNCTIONS = ("pack_columns", "pack_rows_4", "make_group_map", "make_q_matrix", "free_q_matrix",
                  "reconstruct", "gemm_half_q_half")
SO_NAME = "exllamav2_ext.cpython-312-x86_64-linux-gnu.so"
ARCH = "9.0"


def run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def cuda_home() -> Path:
    """The CUDA 13 toolkit that the cuda-toolkit wheels install beside torch (bin/nvcc,
    include/, lib/). torch's library search looks for libcudart.so, which the runtime wheel
    ships only as libcudart.so.13: a link in a private lib64/ gives it the name."""
    import torch

    home = Path(torch.__file__).resolve().parent.parent / "nvidia" / "cu13"
    if not (home / "bin" / "nvcc").is_file():
        sys.exit(f"exllamav2_build.py: no nvcc in {home} (install cuda-toolkit[nvcc])")
    lib64 = home / "lib64"
    lib64.mkdir(exist_ok=True)
    for name in ("libcudart.so", "libcublas.so"):
        target = next(iter(sorted((home / "lib").glob(name + ".*"))), None)
        if target is not None and not (lib64 / name).exists():
            (lib64 / name).symlink_to(target)
    return home


def expected_group_map(groups: list[tuple[int, int]]) -> list[int]:
    """(bits, rows) per group -> the flat group map: per row (group index, rows left in it)."""
    out: list[int] = []
    for i, (_, rows) in enumerate(groups):
        for j in range(rows):
            out += [i, rows - j]
    return out


def check_group_map(ext) -> dict:
    """Run the extension's make_group_map (C++, CPU) on a 4-bit group of 64 rows and a 3-bit group
    of 32 rows (q_weight rows 0..7 and 8..10)."""
    import torch

    groups = [(4, 64), (3, 32)]
    q_groups = torch.tensor([4, 0, 3, 8], dtype=torch.int16)
    got = ext.make_group_map(q_groups, 11).tolist()
    return {"groups": groups, "equal": got == expected_group_map(groups)}


def dynamic_symbols(path: Path, defined: bool) -> set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = run(["nm", "-D", flag, str(path)])
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        kind, name = parts[-2], parts[-1]
        if not defined and kind == "w":  # weak: may stay undefined
            continue
        names.add(name.split("@")[0])
    return names


def needed_libraries(path: Path) -> list[str]:
    return re.findall(r"\(NEEDED\).*\[(.+?)\]", run(["readelf", "-d", str(path)]))


def resolve_library(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        if (d / name).exists():
            return (d / name).resolve()
    for line in run(["ldconfig", "-p"]).splitlines():
        if line.strip().startswith(name + " "):
            return Path(line.split("=>")[-1].strip()).resolve()
    return None


def check_symbols(so: Path, cuda: Path) -> dict:
    """Every undefined dynamic symbol of ``so`` must be defined somewhere it will be found on the
    device: a DT_NEEDED library, the interpreter (Py*), or cuBLAS (torch loads it globally)."""
    import torch

    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    dirs = [torch_lib, cuda / "lib"]
    needed = needed_libraries(so)
    providers, missing_libs = [], []
    for name in needed:
        p = resolve_library(name, dirs)
        (providers.append(p) if p else missing_libs.append(name))
    cublas = resolve_library("libcublas.so.13", dirs)
    if cublas:
        providers.append(cublas)
    interpreter = Path(sys.executable).resolve()
    libpython = Path(os.path.dirname(interpreter)).parent / "lib" / f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so"
    providers.append(libpython if libpython.exists() else interpreter)
    defined: set[str] = set()
    for p in providers:
        defined |= dynamic_symbols(p, True)
    unresolved = sorted(dynamic_symbols(so, False) - defined)
    return {"needed": needed, "needed_not_found": missing_libs, "undefined_symbols": len(dynamic_symbols(so, False)),
            "unresolved_symbols": unresolved[:50], "unresolved_count": len(unresolved)}


def cubin_archs(so: Path) -> list[str]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = run([str(tool), "--list-elf", str(so)])
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.", out)))


def import_in_fresh_interpreter(directory: Path) -> str:
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import exllamav2_ext as e; "
            f"missing = [f for f in {USED_FUNCTIONS!r} if not hasattr(e, f)]; "
            "assert not missing, missing; print(e.__file__)")
    return run([sys.executable, "-c", code, str(directory)]).strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=Path, required=True, help="exllamav2/exllamav2_ext of the pinned release")
    p.add_argument("--build-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--exllamav2-version", required=True)
    p.add_argument("--wheel-sha256", required=True)
    p.add_argument("--incremental", action="store_true",
                   help="keep the build folder's objects (development; the recorded time is then not a full build)")
    args = p.parse_args()

    cuda = cuda_home()
    os.environ["CUDA_HOME"] = str(cuda)
    os.environ["PATH"] = f"{cuda / 'bin'}{os.pathsep}{os.environ['PATH']}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH
    import torch
    from torch.utils import cpp_extension

    src = args.sources.resolve()
    sources = sorted(str(f) for pattern in ("*.cpp", "cpp/*.cpp", "cuda/*.cu", "cuda/comp_units/*.cu")
                     for f in src.glob(pattern))
    cflags, cuda_cflags = ["-Ofast"], ["-lineinfo", "-O3"]
    if not args.incremental:
        shutil.rmtree(args.build_dir, ignore_errors=True)
    args.build_dir.mkdir(parents=True, exist_ok=True)
    nvcc_version = run([str(cuda / "bin" / "nvcc"), "--version"]).strip().splitlines()[-1]
    print(f"== compiling {len(sources)} sources for sm_90 with {nvcc_version}, MAX_JOBS={os.environ.get('MAX_JOBS')}",
          flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    ext = cpp_extension.load(name="exllamav2_ext", sources=sources, extra_include_paths=[str(src)],
                             extra_cflags=cflags, extra_cuda_cflags=cuda_cflags, build_directory=str(args.build_dir),
                             verbose=True)
    build_seconds = time.perf_counter() - t0
    load_after = os.getloadavg()[2]  # the last 15 minutes of the build
    built = Path(ext.__file__)
    print(f"== built {built} in {build_seconds:.0f} s", flush=True)

    missing = [f for f in USED_FUNCTIONS if not hasattr(ext, f)]
    group_map = check_group_map(ext)

    args.out.mkdir(parents=True, exist_ok=True)
    so = args.out / SO_NAME
    shutil.copyfile(built, so)
    run(["strip", "--strip-unneeded", str(so)])
    imported = import_in_fresh_interpreter(args.out)
    symbols = check_symbols(so, cuda)
    archs = cubin_archs(so)

    results = {
        "exllamav2_version": args.exllamav2_version,
        "exllamav2_wheel_sha256": args.wheel_sha256,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": nvcc_version,
        "python": platform.python_version(),
        "torch_cuda_arch_list": ARCH,
        "cubin_archs": archs,
        "sources": len(sources),
        "cflags": cflags,
        "cuda_cflags": cuda_cflags,
        "max_jobs": int(os.environ.get("MAX_JOBS", "0") or 0),
        "cpus": os.cpu_count(),
        "incremental": args.incremental,
        "build_seconds": round(build_seconds, 1),
        "build_minutes": round(build_seconds / 60, 1),
        "load_average_at_start": round(load_before, 1),  # other jobs on the machine slow the build
        "load_average_last_15_min": round(load_after, 1),
        "so_bytes": built.stat().st_size,
        "stripped_bytes": so.stat().st_size,
        "stripped_mib": round(so.stat().st_size / 2**20, 2),
        "stripped_sha256": hashlib.sha256(so.read_bytes()).hexdigest(),
        "file": f"{args.out.name}/{SO_NAME}",
        "functions_missing": missing,
        "make_group_map_on_cpu": group_map,
        "imported_stripped_copy": bool(imported),
        **symbols,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    ok = (not missing and group_map["equal"] and not symbols["unresolved_count"] and not symbols["needed_not_found"]
          and archs == ["sm_90"])
    print("== checks " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
