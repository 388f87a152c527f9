"""Golden fixtures from exllamav2's own kernels (run on a GPU by benchmarks/gpu.sh).

Runs exllamav2's ``pack_columns`` and ``pack_rows_4`` (through the flow of its converter's
``AdaptiveGPTQ.pack``), ``make_q_matrix`` + ``reconstruct`` and ``gemm_half_q_half`` — the
extension built by ``benchmarks/build_exllamav2.sh``, loaded by
:mod:`benchmarks.exllamav2_kernels` — on

- raw layers as exllamav2's converter holds them before packing (:mod:`tests.raw_layers`):
  every width alone, every width in one layer, the 2.5 / 4.0 / 6.0 bpw mixes, padded columns,
  groups straddling the kernel's 128-row blocks, short last groups, subnormal and extreme
  scales, a bias; each (but the two decode-only ones, whose maxima span float16's range)
  multiplied by x with M = 1, 3, 16 and 33 rows (33 is past exllamav2's ``MAX_Q_GEMM_ROWS`` =
  32: reconstruct + cuBLAS);
- the positive conformance vectors (:func:`exl2.conformance.vectors.positives`), their x;

and writes what they return into OUT (a few MB):

    manifest.json                    provenance (exllamav2 version, extension digest, device,
                                     torch), every case, and the data file's sha256
    exllamav2_golden.safetensors     per raw case NAME:
                                       NAME.raw.*      the converter's inputs (codes and scale
                                                       codes as uint8, maxima, (bits, 0) pairs,
                                                       inverse permutation, bias)
                                       NAME.layer.*    the tensors exllamav2's pack wrote
                                       NAME.reconstruct, NAME.x.M, NAME.y.M
                                     per vector NAME: NAME.reconstruct (unless larger than 1 MiB:
                                     then the manifest holds its sha256) and NAME.y (for the
                                     vector's own x)

``tests/test_exllamav2_golden.py`` checks exl2's reference and fast path against them: packing
and decoding bit for bit, matmul (ours and exllamav2's) within the bound of spec 8.2.1.

    python benchmarks/golden_fixtures.py --out DIR               # on a GPU, exllamav2's kernels
    python benchmarks/golden_fixtures.py --out DIR --cpu-smoke   # no GPU: the same code path with
        tests/exllamav2_emulation.py in place of the extension, on a few small cases (the matmul
        stand-in is the float32 product of the emulated reconstruct): checks the plumbing and the
        format, proves nothing about exllamav2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.raw_layers import REALISTIC, RawLayer, build_layer, extreme_layer  # noqa: E402

SCHEMA_VERSION = 1
DATA_FILE = "exllamav2_golden.safetensors"
#: Rows of x per raw case: one row, an odd count, four of exllamav2's 4-row kernel blocks, and one
#: past MAX_Q_GEMM_ROWS (exllamav2 then reconstructs and calls cuBLAS).
MS = (1, 3, 16, 33)
#: Outputs larger than this are recorded by their sha256 only (the 65536-row vectors).
FULL_TENSOR_LIMIT = 1 << 20
ALL_WIDTHS = [8, 6, 5, 4, 3, 2]


@dataclass(frozen=True)
class RawCase:
    name: str
    layer: RawLayer
    description: str
    matmul: bool = True  # False where the decoded weights overflow to inf (no bound applies)


def raw_cases(smoke: bool) -> list[RawCase]:
    """The raw layers, in fixture order (``smoke``: the small ones the emulation runs quickly).
    Layers that are multiplied have maxima in the range of real layers (float16 products stay far
    from overflow); two decode-only layers cover the whole float16 range of maxima."""
    g32 = {b: 16 if b == 2 else 32 for b in ALL_WIDTHS}

    def layer(widths, group_size, counts, cut, n, seed, bias):
        return build_layer(widths, group_size, counts, cut, n, seed, bias, REALISTIC)

    cases = [
        RawCase("every-width", layer(ALL_WIDTHS, g32, [1, 1, 1, 1, 1, 2], 0, 33, 11, True),
                "8, 6, 5, 4, 3-bit groups of 32 rows and two 2-bit groups of 16; 33 columns padded to 64; bias"),
        RawCase("straddle-block", layer([4, 3], {4: 96, 3: 96}, [2, 1], 32, 40, 5, False),
                "groups of 96 rows crossing the kernels' 128-row blocks; last group cut to 64 rows"),
        RawCase("scale-range", build_layer(ALL_WIDTHS, g32, [2, 1, 1, 2, 1, 2], 0, 50, 12, False),
                "every width, maxima over the whole float16 range, subnormals included (decode only)", matmul=False),
        RawCase("extreme", extreme_layer(), "lowest and highest codes, scale codes 1 and 16, float16 edge maxima "
                "(weights overflow to inf: decode only)", matmul=False),
    ]
    if smoke:
        return cases
    for b in ALL_WIDTHS:
        size = 32 if b == 2 else 64
        cut = {3: 32, 2: 16}.get(b, 0)
        cases.append(RawCase(f"width-{b}", layer([b], {b: size}, [256 // size], cut, 200, 100 + b, b in (8, 4)),
                             f"{b}-bit groups of {size} rows, {256 - cut} rows, 200 columns padded to 224"))
    cases += [
        RawCase("mix-2.5", layer([3, 2], {3: 64, 2: 32}, [3, 10], 0, 288, 25, True),
                "3/2-bit mix (groups of 64 and 32), 512 x 288, bias"),
        RawCase("mix-4.0", layer([5, 4, 3], {5: 64, 4: 64, 3: 64}, [2, 4, 2], 0, 256, 40, False),
                "5/4/3-bit mix in groups of 64, 512 x 256"),
        RawCase("mix-6.0", layer([8, 6, 5], {8: 32, 6: 64, 5: 128}, [2, 3, 2], 0, 160, 60, True),
                "8/6/5-bit mix in groups of 32, 64 and 128, 512 x 160, bias"),
        RawCase("many-columns", layer([4, 2], {4: 64, 2: 16}, [1, 4], 0, 1000, 7, False),
                "1000 columns padded to 1024 (eight of the matmul kernel's column blocks), 128 rows"),
    ]
    return cases


def vector_names(smoke: bool) -> list[str]:
    from exl2.conformance import vectors

    names = [v.name for v in vectors.positives()]
    return ["padded-columns", "mixed-widths"] if smoke else names


class EmulatedKernels:
    """tests/exllamav2_emulation.py in place of the extension (``--cpu-smoke``)."""

    name = "emulation"

    def __init__(self) -> None:
        from tests import exllamav2_emulation as ex

        self.ex = ex
        self.pack_columns = ex.pack_columns_kernel
        self.pack_rows_4 = ex.pack_rows_4_kernel

    def provenance(self) -> dict:
        return {"kernels": "tests/exllamav2_emulation.py (CPU smoke run: plumbing only, not exllamav2)"}

    def run(self, tensors: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = torch.from_numpy(self.ex.reconstruct({k: v.numpy() for k, v in tensors.items()}))
        bias = tensors.get("bias")
        ys = []
        for x in xs:
            y = x.float() @ b.float()
            if bias is not None:
                y[:, : bias.numel()] += bias.float()
            ys.append(y.half())
        return b, ys


class Exllamav2Kernels:
    """exllamav2's extension on the GPU (:mod:`benchmarks.exllamav2_kernels`)."""

    name = "exllamav2"

    def __init__(self) -> None:
        from benchmarks import exllamav2_kernels as k

        ok, why = k.available()
        if not ok:
            raise SystemExit(f"golden_fixtures.py: exllamav2's kernels cannot run here: {why} (or use --cpu-smoke)")
        self.k = k
        self.pack_columns = k.pack_columns
        self.pack_rows_4 = k.pack_rows_4

    def provenance(self) -> dict:
        so = next(self.k.extension_dir().glob("exllamav2_ext*.so"))
        build = ROOT / "docs" / "results" / "exllamav2_build.json"
        info = json.loads(build.read_text()) if build.is_file() else {}
        return {"kernels": "exllamav2_ext", "exllamav2_version": info.get("exllamav2_version"),
                "extension_sha256": hashlib.sha256(so.read_bytes()).hexdigest(),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}

    def run(self, tensors: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with self.k.Exllamav2Layer(tensors) as layer:
            b = layer.reconstruct().cpu()
            ys = [layer.gemm(x.cuda()).cpu() for x in xs]
        return b, ys


def _x(seed: int, m: int, k: int) -> torch.Tensor:
    """Activations with the spread of a layer's inputs: normal, some rows larger."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).half()


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _output(out: dict, entry: dict, name: str, key: str, t: torch.Tensor) -> None:
    """Store ``t`` under ``name.key``, or only its sha256 in the manifest entry when large."""
    if t.numel() * t.element_size() <= FULL_TENSOR_LIMIT:
        out[f"{name}.{key}"] = t
        entry[key] = "tensor"
    else:
        entry[key] = {"sha256": _sha256(t), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def raw_case(kernels, case: RawCase, out: dict) -> dict:
    layer = case.layer
    packed = layer.pack_by_exllamav2(f"{case.name}.layer", pack_columns=kernels.pack_columns,
                                     pack_rows_4=kernels.pack_rows_4)
    tensors = {k.removeprefix(f"{case.name}.layer."): torch.from_numpy(v) for k, v in packed.items()}
    k, n = layer.qweight.shape
    ms = MS if case.matmul else ()
    xs = [_x(1000 * i + m, m, k) for i, m in enumerate(ms)]
    b, ys = kernels.run(tensors, xs)
    raw = {"qweight": torch.from_numpy(layer.qweight.astype(np.uint8)),
           "qscale": torch.from_numpy(layer.qscale.astype(np.uint8)),
           "qscale_max": torch.from_numpy(layer.qscale_max), "qgroups": torch.from_numpy(layer.qgroups),
           "invperm": torch.from_numpy(layer.invperm)}
    if layer.bias is not None:
        raw["bias"] = torch.from_numpy(layer.bias)
    out.update({f"{case.name}.raw.{key}": v for key, v in raw.items()})
    out.update({key: torch.from_numpy(v) for key, v in packed.items()})
    entry = {"name": case.name, "kind": "raw", "description": case.description, "in_features": k,
             "out_features": n, "width": tensors["q_weight"].shape[1],
             "group_size": {str(bits): size for bits, size in layer.group_size.items()},
             "plan": [list(g) for g in layer.plan], "bias": layer.bias is not None, "m": list(ms)}
    _output(out, entry, case.name, "reconstruct", b)
    for m, x, y in zip(ms, xs, ys):
        out[f"{case.name}.x.{m}"] = x
        out[f"{case.name}.y.{m}"] = y
    return entry


def vector_file(directory: Path, name: str) -> Path:
    """Write the positive conformance vector ``name`` (as ``exl2 conformance export`` does)."""
    from exl2.conformance import vectors

    (v,) = [v for v in vectors.positives() if v.name == name]
    path = directory / f"{name}.safetensors"
    vectors.write_positive(path, v)
    return path


def vector_case(kernels, directory: Path, name: str, out: dict) -> dict:
    from safetensors.torch import load_file

    from exl2.conformance.vectors import PREFIX

    path = vector_file(directory, name)
    data = load_file(str(path))
    tensors = {k.removeprefix(PREFIX + "."): v for k, v in data.items() if k.startswith(PREFIX + ".")}
    tensors.pop("q_perm", None)  # exllamav2 recomputes it (module.py load_weight)
    b, (y,) = kernels.run(tensors, [data["x"]])
    entry = {"name": name, "kind": "vector", "vector_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "in_features": b.shape[0], "width": b.shape[1], "m": data["x"].shape[0]}
    _output(out, entry, name, "reconstruct", b)
    out[f"{name}.y"] = y
    return entry


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for manifest.json and the data file")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: the emulation in place of exllamav2's kernels")
    args = p.parse_args()
    from exl2.io import atomic_path, save_tensors

    kernels = EmulatedKernels() if args.cpu_smoke else Exllamav2Kernels()
    out: dict[str, torch.Tensor] = {}
    entries = []
    for case in raw_cases(args.cpu_smoke):
        entries.append(raw_case(kernels, case, out))
        print(f"{case.name}: {entries[-1]['in_features']} x {entries[-1]['out_features']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="exl2-golden-") as tmp:
        for name in vector_names(args.cpu_smoke):
            entries.append(vector_case(kernels, Path(tmp), name, out))
            print(f"vector {name}: {entries[-1]['in_features']} x {entries[-1]['width']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / DATA_FILE
    save_tensors(data, dict(sorted(out.items())))
    manifest = {"schema_version": SCHEMA_VERSION, "generator": "benchmarks/golden_fixtures.py",
                "source": kernels.name, "provenance": kernels.provenance() | {"python": platform.python_version()},
                "file": DATA_FILE, "file_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "cases": entries}
    with atomic_path(args.out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(entries)} cases, {data.stat().st_size / 2**20:.2f} MiB, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
