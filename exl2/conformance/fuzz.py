"""A fuzzing campaign against the validator: mutations of a valid EXL2 file, checked never to
crash ``validate_path`` (it must return findings whatever the bytes).

    python -m exl2.conformance.fuzz --cases 2000 --seed 0

Prints cases tried, crashes and the slowest case; exits 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

MUTATIONS = ("header-bytes", "tensor-bytes", "shape", "dtype", "offsets", "truncate", "extend", "json-value", "groups")


def seed_file(path: Path) -> None:
    """A small valid layer file with mixed widths, padding and a bias."""
    from ..io import save_tensors
    from ..qparams import QParams
    from ..reference import quantize

    g = torch.Generator().manual_seed(0)
    qm = quantize(torch.randn(40, 96, generator=g), QParams({6: 32, 4: 32, 2: 16}, [6, 4, 2], [0.3, 0.3, 0.4]),
                  bias=torch.randn(40, generator=g))
    save_tensors(path, qm.to_tensors("model.layers.0.mlp.up_proj"))


def mutate(data: bytes, rng: random.Random, kind: str) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    if kind == "header-bytes":
        b = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return data[:8] + bytes(b) + body
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
        e["dtype"] = rng.choice(["F16", "F32", "I32", "I16", "U8", "BF16", "I64", "BOOL", "Q4", ""])
    elif kind == "offsets":
        e["data_offsets"] = [rng.randint(-5, len(body) + 5), rng.randint(-5, 2**40)]
    elif kind == "json-value":
        h[name] = rng.choice([None, 1, "x", [], {"dtype": "F16"}, {"a": 1}])
    elif kind == "groups":
        # valid container, broken content: rewrite q_groups' bytes with random int16 pairs
        g = h.get("model.layers.0.mlp.up_proj.q_groups")
        if g:
            b = bytearray(body)
            lo, hi = g["data_offsets"]
            for i in range(lo, hi):
                b[i] = rng.randrange(256)
            body = bytes(b)
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def campaign(cases: int, seed: int, deep: bool = True) -> dict:
    from .validate import validate_path

    rng = random.Random(seed)
    crashes, slowest, slowest_kind = [], 0.0, ""
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "seed.safetensors"
        seed_file(base)
        data = base.read_bytes()
        target = Path(d) / "case.safetensors"
        for i in range(cases):
            kind = MUTATIONS[i % len(MUTATIONS)]
            target.write_bytes(mutate(data, rng, kind))
            t = time.perf_counter()
            try:
                validate_path(target, deep=deep)
            except Exception:
                crashes.append({"case": i, "kind": kind, "error": traceback.format_exc(limit=3)})
            dt = time.perf_counter() - t
            if dt > slowest:
                slowest, slowest_kind = dt, kind
    return {"cases": cases, "seed": seed, "crashes": len(crashes), "slowest_seconds": slowest,
            "slowest_kind": slowest_kind, "crash_details": crashes[:5]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exl2.conformance.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = campaign(args.cases, args.seed)
    result["total_seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2))
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
