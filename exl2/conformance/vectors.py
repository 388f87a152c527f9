"""Language-neutral test vectors: ``exl2 conformance export DIR`` (docs/porting.md).

Layout of DIR, the same bytes on every run and every machine (values come from
:class:`exl2.conformance.layers.Stream`, files are written with sorted keys and no
timestamps, ``y`` is an exactly rounded sum):

    manifest.json                    every vector: file, kind, features, comparison, sha256
    README.md                        this layout, for porters
    positive/NAME.safetensors        a valid layer under the prefix "layer" (layer.q_weight ...),
                                     expected  float16 [K, N']  the dequantized matrix (bit-exact)
                                     x         float16 [M, K]   activations
                                     y         float32 [M, N]   x @ expected[:, :N] + bias (within the bound)
    negative/NAME.safetensors        a layer breaking one rule; the manifest names its finding code
    negative/folder-CODE[-VARIANT]/  a model folder breaking one rule of the container, the config,
                                     the layers' padded columns (out_features from config.json), or
                                     the decode

Every negative is checked at export time: exl2's validator must report its code.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ContainerError
from ..io import atomic_path, save_tensors
from ..qmatrix import QMatrix
from ..reference import dequantize
from ..reference.bounds import MATMUL_ABS, MATMUL_REL
from .layers import MUTATIONS, LayerSpec, Mutation, Stream, broken

SCHEMA_VERSION = 1
PREFIX = "layer"

#: How each tensor of a positive vector is compared (the manifest's ``comparisons``).
COMPARISONS = {
    "bit-exact": {
        "applies_to": "expected",
        "rule": "the float16 bit patterns of the implementation's dequantized matrix equal those of `expected` "
                "(all in_features x out_features_padded values, padded columns included)",
        "spec": "8.1",
    },
    "bound": {
        "applies_to": "y",
        "rule": "for every element: |y_impl - y| <= rel * (sum_k |x[m,k]| * |expected[k,n]| + |bias[n]|) + abs, "
                "the difference taken in float64",
        "rel": {"float16": MATMUL_REL[torch.float16], "bfloat16": MATMUL_REL[torch.bfloat16],
                "float32": MATMUL_REL[torch.float32]},
        "abs": MATMUL_ABS,
        "source": "exl2/reference/bounds.py (matmul_tolerance)",
        "spec": "8.2.1",
    },
}


@dataclass(frozen=True)
class Positive:
    """One positive vector: a layer, what it covers, and the rows ``m`` of its ``x``."""

    name: str
    spec: LayerSpec
    features: tuple[str, ...]
    m: int
    description: str


def _layer(groups: list[tuple[int, int]], n: int, seed: int, **flags: bool) -> LayerSpec:
    return LayerSpec(groups=tuple(groups), out_features=n, seed=seed, **flags)


def positives() -> list[Positive]:
    """The positive vectors, in export order."""
    rows_for_m = {8: 1, 6: 2, 5: 4, 4: 5, 3: 16, 2: 33}
    vs = [Positive(f"width-{b}", _layer([(b, 64), (b, 64)], 64, 10 + b), (f"width-{b}",), rows_for_m[b],
                   f"two {b}-bit groups of 64 rows") for b in (8, 6, 5, 4, 3, 2)]
    vs += [
        Positive("mixed-widths", _layer([(8, 32), (6, 32), (5, 64), (4, 128), (3, 32), (2, 16), (2, 16)], 96, 1),
                 ("mixed-widths", "width-8", "width-6", "width-5", "width-4", "width-3", "width-2"), 64,
                 "every width, non-increasing, as exllamav2's group plans mix them"),
        Positive("two-bit-groups-of-16", _layer([(2, 16)] * 6, 64, 2), ("width-2", "groups-of-16"), 8,
                 "2-bit groups of 16 rows (the only width allowed below 32 rows, spec 4.4)"),
        Positive("padded-columns", _layer([(4, 64), (3, 32)], 45, 3, bias=True), ("padding", "bias"), 3,
                 "out_features 45 padded to 64 columns (spec 3.2)"),
        Positive("short-last-group", _layer([(5, 128), (5, 128), (4, 128), (4, 32)], 32, 4), ("short-last-group",), 7,
                 "groups of 128 rows and a last group of 32"),
        Positive("subnormal-scale-max", _layer([(6, 32), (4, 64), (2, 32)], 64, 5, subnormal=True), ("subnormal",), 4,
                 "every q_scale_max below 2^-6: q_scale_max / 256 is a float16 subnormal (spec 6.1)"),
        Positive("bias", _layer([(4, 128)], 100, 6, bias=True), ("bias", "padding"), 2, "a bias of 100 entries"),
        Positive("q-perm-present", _layer([(5, 64), (3, 64)], 32, 7, q_perm=True), ("q-perm",), 1,
                 "the optional layer.q_perm stored (argsort of q_invperm)"),
        Positive("identity-permutation", _layer([(4, 64), (2, 32)], 32, 8, act_order=False), ("identity-permutation",),
                 1, "rows in input order (q_invperm = 0..K-1)"),
        Positive("near-16-bit-limits", _layer([(8, 32736), (6, 32736), (4, 64)], 32, 9), ("16-bit-limits",), 1,
                 "in_features 65536 (q_invperm entries up to 65535, read as uint16), groups of 32736 rows "
                 "(the largest multiple of 32 below 32767), qrow offsets up to 14322 (Q <= K/4 = 16384, so "
                 "offsets cannot come nearer 32767), spec 4.5"),
        Positive("many-groups", _layer([(2, 16)] * 4096, 32, 10), ("16-bit-limits", "groups-of-16", "width-2"), 1,
                 "4096 2-bit groups of 16 rows: the most groups in_features <= 65536 allows (spec 4.5)"),
    ]
    return vs


#: The base layer of the negative layer vectors (each mutation may prepare it, see
#: :class:`exl2.conformance.layers.Mutation`).
NEGATIVE_BASE = _layer([(6, 32), (6, 32), (4, 64), (2, 32)], 45, 20, bias=True)


def negative_name(m: Mutation) -> str:
    return f"{m.code.lower()}-{m.name}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def exact_product(x: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[M, N]``: ``x @ b + bias`` with every sum exact (``math.fsum``, correctly rounded to
    float64, then rounded to float32), so ``y`` does not depend on a BLAS's summation order."""
    xs, bs = x.to(torch.float64).numpy(), b.to(torch.float64).numpy()  # products of float16s are exact in float64
    bias64 = None if bias is None else bias.to(torch.float64).numpy()
    y = np.empty((xs.shape[0], bs.shape[1]), dtype=np.float64)
    for i in range(xs.shape[0]):
        terms = xs[i][:, None] * bs
        for n in range(bs.shape[1]):
            column = terms[:, n].tolist() + ([float(bias64[n])] if bias64 is not None else [])
            y[i, n] = math.fsum(column)
    return torch.from_numpy(y).to(torch.float32)


def group_runs(qm: QMatrix) -> list[list[int]]:
    """The group plan as runs ``[bits, rows, count]`` (4096 equal groups make one entry)."""
    runs: list[list[int]] = []
    for g in qm.groups:
        if runs and runs[-1][:2] == [g.bits, g.rows]:
            runs[-1][2] += 1
        else:
            runs.append([g.bits, g.rows, 1])
    return runs


def write_positive(path: Path, v: Positive) -> dict:
    """Write one positive vector; returns its manifest entry (without the digest)."""
    qm = v.spec.build()
    expected = dequantize(qm)
    x = torch.from_numpy(Stream(1000 + v.spec.seed).float16((v.m, qm.in_features), 10))
    y = exact_product(x, expected[:, : qm.out_features], qm.output_bias)
    tensors = v.spec.tensors(PREFIX) | {"expected": expected, "x": x, "y": y}
    save_tensors(path, dict(sorted(tensors.items())))
    return {"name": v.name, "kind": "positive", "description": v.description, "features": sorted(v.features),
            "comparison": {"expected": "bit-exact", "y": "bound"},
            "layer": {"in_features": qm.in_features, "out_features": qm.out_features,
                      "out_features_padded": qm.out_features_padded, "groups": len(qm.groups),
                      "group_runs": group_runs(qm), "bias": qm.bias is not None, "q_perm": v.spec.q_perm, "m": v.m}}


def reported_codes(tensors: dict[str, torch.Tensor], code: str) -> list[str]:
    """The codes exl2's validator reports for a negative layer: its errors, plus ``code`` itself
    should it be a warning."""
    from .rules import check_layer

    return sorted({f.code for f in check_layer(tensors, PREFIX) if f.severity == "error" or f.code == code})


def write_negative(path: Path, m: Mutation) -> dict:
    """Write one negative layer vector, after checking the validator reports its code."""
    tensors = broken(NEGATIVE_BASE, m, PREFIX)
    reported = reported_codes(tensors, m.code)
    if m.code not in reported or (m.exclusive and reported != [m.code]):
        raise AssertionError(f"negative vector {negative_name(m)} makes the validator report {reported}")
    save_tensors(path, dict(sorted(tensors.items())))
    return {"name": negative_name(m), "kind": "negative", "code": m.code, "reported": reported,
            "description": m.name.replace("-", " "), "features": [f"negative:{m.code}"]}


# -- negatives checked on whole folders (validate_path) ----------------------------------------

#: A small llama-family model of one layer.
_LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 100, "model_type": "llama", "num_hidden_layers": 1}
_LINEARS = [("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 64, 32), ("self_attn.v_proj", 64, 32),
            ("self_attn.o_proj", 64, 64), ("mlp.gate_proj", 64, 96), ("mlp.up_proj", 64, 96), ("mlp.down_proj", 96, 64)]
_KEY = "model.layers.0.mlp.down_proj"


def _llama_folder() -> tuple[dict[str, torch.Tensor], dict]:
    t: dict[str, torch.Tensor] = {}
    for i, (name, k, n) in enumerate(_LINEARS):
        t |= _layer([(5, 32), (4, k - 32)], n, 40 + i).tensors(f"model.layers.0.{name}")
    t |= _layer([(6, 64)], 100, 50).tensors("lm_head")
    t["model.embed_tokens.weight"] = torch.from_numpy(Stream(51).float16((100, 64), 10))
    t["model.norm.weight"] = torch.ones(64, dtype=torch.float16)
    cfg = dict(_LLAMA, quantization_config={"quant_method": "exl2", "version": "0.2.7", "bits": 5.3, "head_bits": 6,
                                            "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}})
    return t, cfg


def _raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _header(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8:8 + n]), b[8 + n:]


def _folder(folder: Path, tensors: dict, cfg: dict | None, name: str = "output.safetensors") -> Path:
    folder.mkdir()
    save_tensors(folder / name, dict(sorted(tensors.items())))
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg, sort_keys=True, indent=1))
    return folder / name


def _folder_negative(code: str, variant: str | None, folder: Path) -> None:
    """Write the folder vector for ``code`` (and ``variant``, when a code has several): a valid
    one-layer llama with one rule broken."""
    t, cfg = _llama_folder()
    qc = cfg["quantization_config"]
    if (code, variant) in _CONFIG_EDITS:
        _CONFIG_EDITS[code, variant](cfg, qc)
        _folder(folder, t, cfg)
    elif code == "EXL2-T001":  # a layer found by its other tensors (spec 3.1)
        if variant == "no-q-weight":
            del t[_KEY + ".q_weight"]
        else:
            t["model.layers.0.mlp.extra.q_scale"] = t[_KEY + ".q_scale"].clone()
        _folder(folder, t, cfg)
    elif code in ("EXL2-S003", "EXL2-S004"):  # lm_head: 100 columns of 128, known from vocab_size
        if code == "EXL2-S003":
            t["lm_head.q_weight"] = t["lm_head.q_weight"].clone().index_fill_(1, torch.arange(100, 128), 0)
        else:
            t["lm_head.q_scale"] = t["lm_head.q_scale"].clone().index_fill_(1, torch.tensor([15]), 0x55555555)
        _folder(folder, t, cfg)
    elif code == "EXL2-C001":
        _folder(folder, t, cfg).write_bytes(b"\x10\x00\x00")
    elif code in ("EXL2-C002", "EXL2-C003", "EXL2-C004", "EXL2-C005"):
        f = _folder(folder, t, cfg)
        h, data = _header(f)
        if code == "EXL2-C002":
            f.write_bytes((1).to_bytes(8, "little") + b"[" + data)
        elif code == "EXL2-C003":
            h[_KEY + ".q_scale"]["dtype"] = "Q4"
            _raw(f, h, data)
        elif code == "EXL2-C004":
            _raw(f, h, data[:-64])
        else:
            a, b = sorted(n for n in h if n != "__metadata__")[:2]
            h[b] = dict(h[a])
            _raw(f, h, data)
    elif code == "EXL2-C006":
        _folder(folder, t, cfg, "output-00001-of-00002.safetensors")
        save_tensors(folder / "output-00002-of-00002.safetensors", {"model.norm.weight": t["model.norm.weight"]})
    elif code == "EXL2-C010":  # shards 1 and 3 of 3; every tensor the model needs is in shard 1
        _folder(folder, t, cfg, "output-00001-of-00003.safetensors")
        save_tensors(folder / "output-00003-of-00003.safetensors", {"extra.weight": torch.zeros(4, dtype=torch.float16)})
    elif code == "EXL2-C007":
        _folder(folder, t, cfg)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, sort_keys=True))
    elif code == "EXL2-C008":
        _folder(folder, t, cfg, "model.safetensors")
    elif code == "EXL2-K001":
        _folder(folder, t, None)
        (folder / "config.json").write_text("{\"hidden_size\": 64,")
    elif code == "EXL2-S002":
        t[_KEY + ".q_scale_max"] = torch.full_like(t[_KEY + ".q_scale_max"], 2.0**-10)
        _folder(folder, t, cfg)
    elif code == "EXL2-D001":
        qm = _layer([(8, 96)], 64, 62).build()
        qm.q_weight.fill_(-1)  # every 8-bit code 255
        qm.q_scale.fill_(-1)  # every scale code 15: scale = 256 * q_scale_max / 256
        qm.q_scale_max.fill_(65504.0)  # 127 * 65504 overflows float16
        for n in [n for n in t if n.startswith(_KEY + ".")]:
            del t[n]
        t |= qm.to_tensors(_KEY)
        _folder(folder, t, cfg)
    elif code == "EXL2-R001":  # every layer valid; one norm weight overflows float16 in the forward pass
        t |= {f"model.layers.0.{n}.weight": torch.ones(64, dtype=torch.float16)
              for n in ("input_layernorm", "post_attention_layernorm")}
        t["model.layers.0.post_attention_layernorm.weight"][0] = float("inf")
        _folder(folder, t, dict(cfg, architectures=["LlamaForCausalLM"]))
    else:  # pragma: no cover - FOLDER_NEGATIVES and this function go together
        raise KeyError(code)


#: Edits of config.json, by (code, variant): quantization_config ``qc`` inside ``cfg``.
_CONFIG_EDITS = {
    ("EXL2-K002", None): lambda cfg, qc: cfg.pop("quantization_config"),
    ("EXL2-K003", None): lambda cfg, qc: qc.update(quant_method="gptq"),
    ("EXL2-K003", "bits-string"): lambda cfg, qc: qc.update(bits="5.3"),
    ("EXL2-K003", "bits-boolean"): lambda cfg, qc: qc.update(bits=True),
    ("EXL2-K003", "head-bits-float"): lambda cfg, qc: qc.update(head_bits=6.0),
    ("EXL2-K003", "rows-string"): lambda cfg, qc: qc["calibration"].update(rows="100"),
    ("EXL2-K003", "not-an-object"): lambda cfg, qc: cfg.update(quantization_config=[qc]),
    ("EXL2-K004", None): lambda cfg, qc: cfg.update(intermediate_size=128),
    ("EXL2-K005", None): lambda cfg, qc: qc.update(bits=2.5),
    ("EXL2-K006", None): lambda cfg, qc: cfg.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}

#: Folder vectors, as (code, variant): the codes of the container and the config, a layer found
#: without its q_weight, the padded columns (out_features comes from config.json), the
#: information about subnormal maxima (a legal file) the deep decode (``validate --deep``) and the forward pass (``validate --run``, which needs
#: transformers).
FOLDER_NEGATIVES: tuple[tuple[str, str | None], ...] = (
    *((c, None) for c in ("EXL2-C001", "EXL2-C002", "EXL2-C003", "EXL2-C004", "EXL2-C005", "EXL2-C006", "EXL2-C007",
                          "EXL2-C008", "EXL2-C010", "EXL2-K001")),
    *_CONFIG_EDITS,
    ("EXL2-T001", "no-q-weight"), ("EXL2-T001", "lone-q-scale"), ("EXL2-S002", None), ("EXL2-S003", None),
    ("EXL2-S004", None), ("EXL2-D001", None), ("EXL2-R001", None),
)


def folder_negative_name(code: str, variant: str | None) -> str:
    return f"folder-{code.lower()}" + (f"-{variant}" if variant else "")


def write_folder_negative(folder: Path, code: str, variant: str | None = None) -> dict:
    from .validate import validate_path

    _folder_negative(code, variant, folder)
    run = code.startswith("EXL2-R")
    reported = sorted({f.code for f in validate_path(folder, deep=True, run=run).findings})
    if code not in reported:
        raise AssertionError(f"folder vector for {code} makes the validator report {reported}")
    return {"name": folder.name, "kind": "negative-folder", "code": code, "reported": reported,
            "features": [f"negative:{code}"], "validate": "run" if run else "deep",
            "sha256": {p.name: _sha256(p) for p in sorted(folder.iterdir())}}


README = """# EXL2 conformance vectors

Written by `exl2 conformance export` (the exl2 project). Regenerating gives the same bytes.
Format: spec/exl2.md of the exl2 project; how to use these files: its docs/porting.md.

## Files

- `manifest.json`: `schema_version`, `prefix` (`layer`), `comparisons` (what `bit-exact` and
  `bound` mean, with the bound's constants), and `vectors`: one entry per vector with `name`,
  `kind` (`positive`, `negative`, `negative-folder`), `file`, `features`, `sha256` (a dict file -> digest
  for folders), for positives `comparison` and `layer` (`in_features`, `out_features`,
  `out_features_padded`, `groups`, `group_runs` as `[bits, rows, count]`, `bias`, `q_perm`, `m`), for
  negatives `code` (the finding a validator must report) and `reported` (every code exl2 reports).
- `positive/*.safetensors`: a valid EXL2 layer under the prefix `layer` (`layer.q_weight` int32,
  `layer.q_scale` int32, `layer.q_scale_max` float16, `layer.q_groups` int16, `layer.q_invperm` int32,
  optional `layer.bias` float16 (all out_features_padded entries, the padded ones 0) and
  `layer.q_perm` int32), plus
  - `expected` float16 `[in_features, out_features_padded]`: the dequantized matrix. Compare bit for bit.
  - `x` float16 `[m, in_features]` and `y` float32 `[m, out_features]`:
    `y = x @ expected[:, :out_features] + bias[:out_features]`,
    each element the exact sum rounded to float64 then to float32. Compare within the bound.
- `negative/*.safetensors`: a layer (prefix `layer`) that breaks one rule. A decoder must refuse
  it; a validator must report `code`.
- `negative/folder-*/`: a model folder (safetensors shards, config.json) breaking one rule of the
  container, the config, a layer's padded columns (which only config.json makes known), or the
  decode (`EXL2-D001`: decoded weights overflow; `EXL2-S002` is an information about a legal
  file). A validator must report `code`.

All tensors are little-endian; safetensors is an 8-byte little-endian header length, a JSON
header (name -> dtype, shape, data_offsets) and the raw bytes.
"""


def _check_target(directory: Path) -> None:
    """Refuse to replace anything but an earlier export or an empty folder."""
    if directory.is_file() or (directory.is_dir() and any(directory.iterdir())
                               and not (directory / "manifest.json").is_file()):
        raise ContainerError("exists and is not an earlier vector export (no manifest.json); "
                             "choose a new or empty folder", file=str(directory))


def export(directory: str | Path) -> dict:
    """Write the suite into ``directory`` (new, empty, or an earlier export, which is replaced:
    the new suite is built beside it and moved in at the end). Returns the manifest."""
    directory = Path(directory)
    _check_target(directory)
    with atomic_path(directory, folder=True) as tmp:
        (tmp / "positive").mkdir()
        (tmp / "negative").mkdir()
        entries = []
        for v in positives():
            f = tmp / "positive" / f"{v.name}.safetensors"
            entries.append(write_positive(f, v) | {"file": f"positive/{f.name}", "sha256": _sha256(f)})
        for m in MUTATIONS:
            f = tmp / "negative" / f"{negative_name(m)}.safetensors"
            entries.append(write_negative(f, m) | {"file": f"negative/{f.name}", "sha256": _sha256(f)})
        for code, variant in FOLDER_NEGATIVES:
            folder = tmp / "negative" / folder_negative_name(code, variant)
            entries.append(write_folder_negative(folder, code, variant) | {"file": f"negative/{folder.name}"})
        manifest = {"schema_version": SCHEMA_VERSION, "prefix": PREFIX, "spec": "spec/exl2.md",
                    "comparisons": COMPARISONS, "vectors": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(README)
        if directory.exists():
            shutil.rmtree(directory)
    return manifest


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The manifest of an exported folder; with ``verify``, every file's sha256 is checked.
    Raises :class:`ContainerError` when the folder is not a (complete, unedited) export."""
    directory = Path(directory)
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContainerError("holds no manifest.json; write one with `exl2 conformance export`",
                             file=str(directory)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContainerError(f"cannot be read as JSON ({type(e).__name__})", file=str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ContainerError(f"is not a schema_version {SCHEMA_VERSION} manifest", file=str(path))
    if verify:
        for v in manifest.get("vectors", []):
            digests = v["sha256"] if isinstance(v["sha256"], dict) else {"": v["sha256"]}
            for name, digest in digests.items():
                f = directory / v["file"] / name if name else directory / v["file"]
                if not f.is_file() or _sha256(f) != digest:
                    raise ContainerError("is missing or differs from its sha256 in manifest.json", file=str(f))
    return manifest


def load_layer(tensors: dict[str, torch.Tensor], out_features: int | None = None) -> QMatrix:
    """The QMatrix of a vector file's ``layer.*`` tensors."""
    return QMatrix.from_tensors(tensors, PREFIX, out_features=out_features)


__all__ = ["COMPARISONS", "FOLDER_NEGATIVES", "NEGATIVE_BASE", "PREFIX", "Positive", "SCHEMA_VERSION", "exact_product",
           "export", "load_layer", "negative_name", "positives", "read_manifest"]
