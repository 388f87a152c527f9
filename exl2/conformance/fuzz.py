"""A fuzzing campaign against the validator: mutations of a valid EXL2 model folder, checked
never to crash ``validate_path`` (it must return findings whatever the bytes).

    python -m exl2.conformance.fuzz --cases 5000 --seed 0

Each case copies a small valid folder (config.json with quantization_config, output.safetensors
holding two quantized layers with mixed widths, padding and a bias, and an index file) and applies
one mutation: random bytes in the header or in the tensor data, a changed shape, dtype or byte
range, a replaced header entry, truncation, extension, a random group table, or a broken
config.json / index. Every case is validated with ``deep=True``. Prints cases tried, crashes
(with the mutation and traceback of the first few) and the slowest case; exits 1 on any crash.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

#: Mutation kinds, applied in turn.
MUTATIONS = ("header-bytes", "tensor-bytes", "shape", "dtype", "offsets", "truncate", "extend", "json-value",
             "groups", "config", "index")
#: The layer whose tensors the content mutations target.
LAYER = "model.layers.0.mlp.up_proj"
WEIGHTS = "output.safetensors"


def seed_file(path: Path) -> None:
    """A small valid file of a llama-shaped model (hidden 128, intermediate 96, vocab 40): up_proj
    with 6-, 4- and 2-bit groups, down_proj with 8- and 3-bit groups, and an lm_head whose 40
    outputs are padded to 64 columns, with a bias."""
    from ..io import save_tensors
    from ..qparams import QParams
    from ..reference import quantize

    g = torch.Generator().manual_seed(0)
    up = quantize(torch.randn(96, 128, generator=g), QParams({6: 32, 4: 32, 2: 16}, [6, 4, 2], [0.2, 0.2, 0.6]))
    down = quantize(torch.randn(128, 96, generator=g), QParams(32, [8, 3], [0.25, 0.75]))
    head = quantize(torch.randn(40, 128, generator=g), QParams(32, [6], [1.0]), bias=torch.randn(40, generator=g))
    save_tensors(path, up.to_tensors(LAYER) | down.to_tensors("model.layers.0.mlp.down_proj")
                 | head.to_tensors("lm_head") | {"model.norm.weight": torch.ones(128, dtype=torch.float16)})


def seed_folder(folder: Path) -> None:
    """A valid model folder around :func:`seed_file`, as exllamav2's converter writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    seed_file(folder / WEIGHTS)
    config = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 96, "num_attention_heads": 4,
              "vocab_size": 40,
              "quantization_config": {"quant_method": "exl2", "version": "0.2.7", "bits": 4.5, "head_bits": 6,
                                      "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))


def mutate(data: bytes, rng: random.Random, kind: str) -> bytes:
    """``data`` (a safetensors file) with one mutation of ``kind`` (not "config" / "index")."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    if kind == "header-bytes":
        b = bytearray(data[: 8 + n])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b) + body
    if kind == "tensor-bytes":
        b = bytearray(body)
        for _ in range(rng.randint(1, 64)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return data[:8 + n] + bytes(b)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "extend":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    h = json.loads(header)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    e = h[name]
    if kind == "shape":
        e["shape"] = [rng.choice([0, 1, 2, 3, 7, 32, 2**31, 2**62, -1]) for _ in range(rng.randint(0, 3))]
    elif kind == "dtype":
        e["dtype"] = rng.choice(["F16", "F32", "I32", "I16", "U8", "BF16", "I64", "BOOL", "U16", "F8_E4M3", "Q4", ""])
    elif kind == "offsets":
        e["data_offsets"] = [rng.randint(-5, len(body) + 5), rng.randint(-5, 2**40)]
    elif kind == "json-value":
        h[name] = rng.choice([None, 1, "x", [], {"dtype": "F16"}, {"a": 1}, 1e308, [[[]]]])
    elif kind == "groups":
        # a valid container with broken content: random int16 pairs in q_groups
        g = h.get(f"{LAYER}.q_groups")
        if g:
            b = bytearray(body)
            lo, hi = g["data_offsets"]
            # one entry nudged (reaches the later rules of spec 4), or every entry random
            where = [lo + 2 * rng.randrange((hi - lo) // 2)] if rng.random() < 0.5 else range(lo, hi, 2)
            for i in where:
                old = int.from_bytes(b[i:i + 2], "little", signed=True)
                v = rng.choice([rng.choice([2, 3, 4, 5, 6, 8]), old + rng.randint(-6, 6), rng.randrange(65536)])
                b[i:i + 2] = (v & 0xFFFF).to_bytes(2, "little")
            body = bytes(b)
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_json(text: str, rng: random.Random) -> str:
    """config.json or the index with one random change: a value replaced, or random bytes."""
    if rng.random() < 0.3:
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("utf-8", errors="replace")
    data = json.loads(text)
    obj = data
    path = []
    while isinstance(obj, dict) and obj and rng.random() < 0.7:
        k = rng.choice(list(obj))
        path.append((obj, k))
        obj = obj[k]
    value = rng.choice([None, -1, 0, 2**70, 1.5, float("nan"), "exl2", "", [], {}, [1, 2], {"x": None}, True,
                        rng.choice([1, 2, 8, 32, 40, 64, 96, 128, 256])])
    if path:
        parent, k = path[-1]
        parent[k] = value
        return json.dumps(data)
    return json.dumps(value)


def apply(folder: Path, base: Path, rng: random.Random, kind: str) -> None:
    """Make ``folder`` a copy of ``base`` with one mutation of ``kind``."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(base, folder)
    if kind == "config":
        cfg = folder / "config.json"
        cfg.write_text(mutate_json(cfg.read_text(), rng))
    elif kind == "index":
        idx = folder / "model.safetensors.index.json"
        idx.write_text(mutate_json(idx.read_text(), rng))
    else:
        f = folder / WEIGHTS
        f.write_bytes(mutate(f.read_bytes(), rng, kind))


def campaign(cases: int, seed: int, deep: bool = True) -> dict:
    """Run ``cases`` mutated folders through ``validate_path``; count crashes and time cases."""
    from .findings import CATALOGUE
    from .validate import validate_path

    rng = random.Random(seed)
    crashes: list[dict] = []
    slowest, slowest_kind = 0.0, ""
    codes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        seed_folder(base)
        report = validate_path(base, deep=True)
        assert report.ok, report.findings  # the seed itself must be valid
        case = Path(d) / "case"
        for i in range(cases):
            kind = MUTATIONS[i % len(MUTATIONS)]
            apply(case, base, rng, kind)
            t = time.perf_counter()
            try:
                r = validate_path(case, deep=deep)
                unknown = {f.code for f in r.findings} - set(CATALOGUE)
                if unknown:
                    raise AssertionError(f"codes outside the catalogue: {unknown}")
                for f in r.findings:
                    codes[f.code] = codes.get(f.code, 0) + 1
            except Exception:
                crashes.append({"case": i, "kind": kind, "error": traceback.format_exc(limit=4)})
            dt = time.perf_counter() - t
            if dt > slowest:
                slowest, slowest_kind = dt, kind
    return {"cases": cases, "seed": seed, "crashes": len(crashes), "slowest_seconds": round(slowest, 4),
            "slowest_kind": slowest_kind, "codes_seen": dict(sorted(codes.items())), "crash_details": crashes[:5]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exl2.conformance.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deep", action="store_true", help="skip decoding (faster cases)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = campaign(args.cases, args.seed, deep=not args.no_deep)
    result["total_seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result, indent=2))
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
