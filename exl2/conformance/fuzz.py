"""A fuzzing campaign against the validator, the reader and the ``exl2`` command: mutations of a
valid EXL2 model folder, each run through ``validate_path`` and through the verbs ``validate``,
``inspect`` and ``dequantize`` (in process), which must keep the README's contract whatever the
bytes.

    python -m exl2.conformance.fuzz --cases 5000 --seed 0 [--json docs/results/fuzz.json]

Each case copies a small valid folder (config.json with quantization_config, output.safetensors
holding three quantized layers with mixed widths, padding and a bias, and a stale index file) and
applies one mutation: random bytes in the header or in the tensor data, a changed shape, dtype or
byte range, a replaced header entry, truncation, extension, a random group table, a broken
config.json or index, and the hostile classes of :mod:`exl2.conformance.hostile`: whole-header
attacks (deep nesting, huge numbers, NaN, non-UTF-8, duplicates, wrong top-level types), a value
of every JSON type at any header field, hostile tensor names (surrogates, controls, markup), a
hostile value at any config.json field, and odd folder and shard names.

A **crash** is any exception out of ``validate_path``, a finding ``EXL2-C009`` (the seed's data
is always readable, so that code could only hide a bug), a code outside the catalogue, or a verb
that ends in an exception, an internal error (exit 3) or a traceback. A **contract violation** is
a verb whose failure is not exactly one printable line on stderr, an exit status outside 0/1/2,
``--json`` output that is not strict JSON, ``validate``'s exit disagreeing with its report,
``inspect`` or ``dequantize`` exiting 1 (a rule broken) where ``validate`` finds no error, or
``dequantize`` leaving anything in its output folder when it fails. Prints the counts, the codes
seen and the first cases of each kind of failure; exits 1 on any crash or violation.
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
             "groups", "config", "index", "hostile-header", "wrong-type", "hostile-name", "hostile-config", "odd-path")
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


def apply(folder: Path, base: Path, rng: random.Random, kind: str) -> Path:
    """Make ``folder`` a copy of ``base`` with one mutation of ``kind``; returns the path to check
    (``folder``, or for "odd-path" a folder or file with an odd name inside it)."""
    from . import hostile

    if folder.exists():
        shutil.rmtree(folder)
    target = folder
    if kind == "odd-path":
        folder.mkdir(parents=True)
        target = folder / rng.choice(hostile.PATH_NAMES)
    shutil.copytree(base, target)
    weights = target / WEIGHTS
    if kind == "odd-path":
        weights = weights.rename(target / (rng.choice(hostile.PATH_NAMES) + ".safetensors"))
        if rng.random() < 0.3:
            return weights  # the single file, by its odd name
    elif kind == "config":
        cfg = target / "config.json"
        cfg.write_text(mutate_json(cfg.read_text(), rng))
    elif kind == "hostile-config":
        cfg = target / "config.json"
        hostile.write_text(cfg, hostile.random_config(cfg.read_text(), rng))
    elif kind == "index":
        idx = target / "model.safetensors.index.json"
        idx.write_text(mutate_json(idx.read_text(), rng))
    elif kind == "hostile-header":
        weights.write_bytes(hostile.random_raw_header(weights.read_bytes(), rng))
    elif kind == "wrong-type":
        weights.write_bytes(hostile.random_wrong_type(weights.read_bytes(), rng))
    elif kind == "hostile-name":
        weights.write_bytes(hostile.random_renamed(weights.read_bytes(), rng))
    else:
        weights.write_bytes(mutate(weights.read_bytes(), rng, kind))
    return target


def check_library(path: Path, deep: bool) -> tuple[list[str], list[str], object]:
    """``validate_path`` on ``path``: (crashes, codes found, the report or None)."""
    from .findings import CATALOGUE
    from .validate import validate_path

    try:
        report = validate_path(path, deep=deep)
    except Exception:
        return [f"validate_path raised:\n{traceback.format_exc(limit=6)}"], [], None
    crashes = []
    codes = [f.code for f in report.findings]
    unknown = set(codes) - set(CATALOGUE)
    if unknown:
        crashes.append(f"codes outside the catalogue: {sorted(unknown)}")
    if "EXL2-C009" in codes:
        crashes.append("EXL2-C009 on readable data: " + "; ".join(f.message for f in report.findings
                                                                  if f.code == "EXL2-C009")[:300])
    for f in report.findings:
        if f.code in CATALOGUE and f.severity != CATALOGUE[f.code].severity:
            crashes.append(f"{f.code} reported as {f.severity}")
    return crashes, codes, report


#: The verbs each case goes through, and their arguments after the path.
VERBS = {"validate": [], "validate --json": ["--json"], "inspect": [], "inspect --json": ["--json"],
         "dequantize": ["-o", "{out}"]}


def check_cli(path: Path, out_dir: Path, valid: bool | None) -> tuple[list[str], list[str]]:
    """The verbs on ``path``: (crashes, contract violations). ``valid``: validate_path's verdict
    (None when it crashed)."""
    from typer.testing import CliRunner

    from ..cli import app

    crashes: list[str] = []
    violations: list[str] = []
    status = {}
    for label, extra in VERBS.items():
        args = [label.split()[0], str(path), *(a.format(out=out_dir / "dense.safetensors") for a in extra)]
        r = CliRunner().invoke(app, args)
        status[label] = r.exit_code
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            crashes.append(f"{label}: {type(r.exception).__name__}: {str(r.exception)[:200]}\n"
                           + "".join(traceback.format_exception(r.exception, limit=-4)))
            continue
        if "Traceback" in r.output or "internal error" in r.stderr or r.exit_code == 3:
            crashes.append(f"{label}: exit {r.exit_code}: {r.stderr.strip()[:300]}")
            continue
        if r.exit_code not in (0, 1, 2):
            violations.append(f"{label}: exit {r.exit_code}")
        one_line_expected = r.exit_code == 2 or (r.exit_code == 1 and not label.startswith("validate"))
        lines = r.stderr.strip().splitlines()
        if one_line_expected and (len(lines) != 1 or not lines[0].startswith("exl2: error: ")
                                  or not lines[0].isprintable()):
            violations.append(f"{label}: exit {r.exit_code}, stderr is not one printable line: {r.stderr[:300]!r}")
        if label.endswith("--json") and (r.exit_code == 0 or label == "validate --json" and r.exit_code == 1):
            try:
                json.loads(r.stdout, parse_constant=_no_constant)
            except ValueError as e:
                violations.append(f"{label}: stdout is not strict JSON ({e})")
    if valid is not None:
        if status["validate"] != (0 if valid else 1):
            violations.append(f"validate exits {status['validate']} for a report with ok={valid}")
        for label in ("inspect", "dequantize"):
            if valid and status[label] == 1:
                violations.append(f"{label} exits 1 (a rule broken) where validate finds none")
    leftovers = sorted(p.name for p in out_dir.iterdir())
    if status["dequantize"] != 0 and leftovers:
        violations.append(f"dequantize failed (exit {status['dequantize']}) and left {leftovers}")
    for p in out_dir.iterdir():
        p.unlink()
    return crashes, violations


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def campaign(cases: int, seed: int, deep: bool = True, cli: bool = True) -> dict:
    """Run ``cases`` mutated folders through ``validate_path`` and (with ``cli``) the verbs;
    count crashes and contract violations, and time cases."""
    from .findings import CATALOGUE

    rng = random.Random(seed)
    crashes: list[dict] = []
    violations: list[dict] = []
    per_kind = {k: 0 for k in MUTATIONS}
    slowest, slowest_kind = 0.0, ""
    codes: dict[str, int] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        seed_folder(base)
        crash, _, report = check_library(base, True)
        assert not crash and report.ok, report  # the seed itself must be valid
        case, out_dir = Path(d) / "case", Path(d) / "out"
        out_dir.mkdir()
        for i in range(cases):
            kind = MUTATIONS[i % len(MUTATIONS)]
            per_kind[kind] += 1
            path = apply(case, base, rng, kind)
            t = time.perf_counter()
            found, seen, report = check_library(path, deep)
            for c in seen:
                codes[c] = codes.get(c, 0) + 1
            bad: list[str] = []
            if cli:
                found_cli, bad = check_cli(path, out_dir, report.ok if report is not None else None)
                found += found_cli
            dt = time.perf_counter() - t
            if dt > slowest:
                slowest, slowest_kind = dt, kind
            where = {"case": i, "kind": kind, "path": ascii(str(path.relative_to(d)))}
            crashes += [where | {"error": e} for e in found]
            violations += [where | {"violation": v} for v in bad]
    seconds = time.perf_counter() - start
    return {"cases": cases, "seed": seed, "deep": deep, "cli": cli, "verbs": list(VERBS) if cli else [],
            "crashes": len(crashes), "violations": len(violations), "seconds": round(seconds, 1),
            "seconds_per_case": round(seconds / max(cases, 1), 4), "slowest_seconds": round(slowest, 4),
            "slowest_kind": slowest_kind, "cases_per_kind": per_kind, "codes_reached": len(codes),
            "catalogue_codes": len(CATALOGUE), "codes_not_reached": ", ".join(sorted(set(CATALOGUE) - set(codes))),
            "codes_seen": dict(sorted(codes.items())), "crash_details": crashes[:5],
            "violation_details": violations[:5]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exl2.conformance.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deep", action="store_true", help="skip decoding (faster cases)")
    p.add_argument("--no-cli", action="store_true", help="validate_path only, not the verbs")
    p.add_argument("--json", type=Path, help="also write the result to this file (e.g. docs/results/fuzz.json)")
    args = p.parse_args(argv)
    result = campaign(args.cases, args.seed, deep=not args.no_deep, cli=not args.no_cli)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from ..io import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(text + "\n")
    return 1 if result["crashes"] or result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
