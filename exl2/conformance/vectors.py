"""Language-neutral test vectors (``exl2 conformance export DIR``).

Layout of DIR (same bytes on every run):

    manifest.json                    what each vector covers and how it is compared
    README.md                        this layout, for porters
    positive/NAME.safetensors        layer.q_weight ... (a valid layer under the prefix "layer"),
                                     expected  float16 [K, N']  the dequantized matrix (bit-exact)
                                     x         float16 [M, K]   activations
                                     y         float32 [M, N]   x @ expected[:, :N] + bias, exact then rounded
    negative/NAME.safetensors        a layer breaking one rule; manifest names the finding code
    negative/folder-CODE/            a model folder breaking one container/config/layer rule
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_path, save_tensors
from ..qmatrix import QMatrix
from ..reference import dequantize
from ..reference.bounds import MATMUL_ABS, MATMUL_REL
from .strategies import MUTATIONS, LayerSpec

MANIFEST_VERSION = 1
PREFIX = "layer"


@dataclass(frozen=True)
class Positive:
    name: str
    spec: LayerSpec
    features: tuple[str, ...]
    rows: int = 4  # M of the (x, y) pair
    q_perm: bool = False


def _spec(groups: list[tuple[int, int]], n: int, seed: int, subnormal: bool = False, bias: bool = False) -> LayerSpec:
    out, row = [], 0
    for bits, rows in groups:
        out.append((bits, row, rows))
        row += rows
    return LayerSpec(tuple(out), n, seed, subnormal, bias)


def positives() -> list[Positive]:
    vs = [Positive(f"width-{b}", _spec([(b, 64), (b, 64)], 64, 10 + b), (f"width-{b}",)) for b in (8, 6, 5, 4, 3, 2)]
    vs += [
        Positive("mixed", _spec([(8, 32), (6, 32), (5, 64), (4, 128), (3, 32), (2, 16), (2, 16)], 96, 1),
                 ("mixed-widths", "width-8", "width-6", "width-5", "width-4", "width-3", "width-2")),
        Positive("two-bit-groups-of-16", _spec([(2, 16)] * 6, 64, 2), ("width-2", "groups-of-16")),
        Positive("padded-columns", _spec([(4, 64), (3, 32)], 45, 3, bias=True), ("padding", "bias")),
        Positive("short-last-group", _spec([(5, 128), (5, 128), (4, 128), (4, 32)], 32, 4), ("short-last-group",)),
        Positive("subnormal-scale-max", _spec([(6, 32), (4, 64), (2, 32)], 64, 5, subnormal=True), ("subnormal",)),
        Positive("bias", _spec([(4, 128)], 100, 6, bias=True), ("bias", "padding")),
        Positive("q-perm-present", _spec([(5, 64), (3, 64)], 32, 7), ("q-perm",), q_perm=True),
        Positive("near-16-bit-limits", _spec([(8, 32)] * 2047, 32, 8), ("16-bit-limits", "many-groups"), rows=1),
    ]
    return vs


def negatives() -> list[tuple[str, str, LayerSpec]]:
    """(name, code, spec): one per mutation of :data:`strategies.MUTATIONS`."""
    base = _spec([(6, 32), (4, 64), (2, 32)], 45, 20, bias=True)
    return [(f"broken-{code.lower()}", code, base) for code in sorted(MUTATIONS)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_positive(path: Path, v: Positive) -> dict:
    qm = v.spec.build()
    expected = dequantize(qm)
    g = torch.Generator().manual_seed(1000 + v.spec.seed)
    x = torch.randn(v.rows, qm.in_features, generator=g).to(torch.float16)
    y = x.to(torch.float64) @ expected[:, : qm.out_features].to(torch.float64)
    if qm.bias is not None:
        y = y + qm.bias.to(torch.float64)
    tensors = qm.to_tensors(PREFIX)
    if v.q_perm:
        tensors[f"{PREFIX}.q_perm"] = qm.q_perm
    tensors |= {"expected": expected, "x": x, "y": y.to(torch.float32)}
    save_tensors(path, dict(sorted(tensors.items())))
    return {"in_features": qm.in_features, "out_features": qm.out_features,
            "out_features_padded": qm.out_features_padded,
            "groups": [[g.bits, g.rows] for g in qm.groups][:16] + ([["...", len(qm.groups)]] if len(qm.groups) > 16 else [])}


def write_negative(path: Path, code: str, spec: LayerSpec) -> None:
    from .rules import check_layer

    tensors = spec.build().to_tensors(PREFIX)
    MUTATIONS[code][0](tensors, PREFIX)
    errors = {f.code for f in check_layer(tensors, PREFIX) if f.severity == "error"}
    if errors != {code}:  # pragma: no cover - guarded by tests
        raise AssertionError(f"negative vector for {code} triggers {sorted(errors)}")
    save_tensors(path, dict(sorted(tensors.items())))


# -- negatives checked on whole files / folders (validate_path) -------------------------------

#: A small llama-family model: (key suffix, in_features, out_features) of its layer 0.
_LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 100, "model_type": "llama", "num_hidden_layers": 1}
_LINEARS = [("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 64, 32), ("self_attn.v_proj", 64, 32),
            ("self_attn.o_proj", 64, 64), ("mlp.gate_proj", 64, 96), ("mlp.up_proj", 64, 96), ("mlp.down_proj", 96, 64)]


def _llama_folder(bits: float = 5.3) -> tuple[dict[str, torch.Tensor], dict]:
    t: dict[str, torch.Tensor] = {}
    for i, (name, k, n) in enumerate(_LINEARS):
        spec = _spec([(5, 32), (4, k - 32)], n, 40 + i)
        t |= spec.build().to_tensors(f"model.layers.0.{name}")
    t |= _spec([(6, 64)], 100, 50).build().to_tensors("lm_head")
    t["model.embed_tokens.weight"] = torch.randn(100, 64, generator=torch.Generator().manual_seed(51)).half()
    t["model.norm.weight"] = torch.ones(64, dtype=torch.float16)
    cfg = dict(_LLAMA, quantization_config={"quant_method": "exl2", "version": "0.2.7", "bits": bits, "head_bits": 6,
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


_KEY = "model.layers.0.mlp.down_proj"


def _edit_layer(t: dict, qm_tensors: dict) -> None:
    for n in [n for n in t if n.startswith(_KEY + ".")]:
        del t[n]
    t.update(qm_tensors)


def _file_negative(code: str, folder: Path) -> None:
    """Write the folder vector for ``code`` (one broken rule; the validator must report ``code``)."""
    t, cfg = _llama_folder()
    if code == "EXL2-C001":
        _folder(folder, t, cfg).write_bytes(b"\x10\x00\x00")
    elif code in ("EXL2-C002", "EXL2-C003", "EXL2-C004", "EXL2-C005"):
        f = _folder(folder, t, cfg)
        h, data = _header(f)
        if code == "EXL2-C002":
            _raw(f, {}, b"")
            f.write_bytes(f.read_bytes()[:8] + b"[" + f.read_bytes()[9:])
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
    elif code == "EXL2-C007":
        _folder(folder, t, cfg)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    elif code == "EXL2-C008":
        _folder(folder, t, cfg, "model.safetensors")
    elif code == "EXL2-K001":
        _folder(folder, t, None)
        (folder / "config.json").write_text("{\"hidden_size\": 64,")
    elif code == "EXL2-K002":
        cfg.pop("quantization_config")
        _folder(folder, t, cfg)
    elif code == "EXL2-K003":
        cfg["quantization_config"]["quant_method"] = "gptq"
        _folder(folder, t, cfg)
    elif code == "EXL2-K004":
        cfg["intermediate_size"] = 128
        _folder(folder, t, cfg)
    elif code == "EXL2-K005":
        cfg["quantization_config"]["bits"] = 2.5
        _folder(folder, t, cfg)
    else:
        _layer_file_negative(code, t)
        _folder(folder, t, cfg)


def _layer_file_negative(code: str, t: dict) -> None:
    k = _KEY
    if code == "EXL2-T004":
        t[k + ".q_weight"] = t[k + ".q_weight"][:, :48].clone()
        t[k + ".q_scale"] = t[k + ".q_scale"][:, :6].clone()
    elif code == "EXL2-G004":
        qm = _spec([(3, 96)], 64, 60).build().to_tensors(k)
        qm[k + ".q_weight"] = qm[k + ".q_weight"][:8].clone()
        qm[k + ".q_invperm"] = torch.arange(8 * 32 // 3 + 1, dtype=torch.int32)  # rows the qrows imply
        _edit_layer(t, qm)
    elif code == "EXL2-G005":
        qm = _spec([(4, 64), (4, 32)], 64, 61).build().to_tensors(k)
        qm[k + ".q_groups"][3] = 1  # group 0 becomes one 8-row block
        qm[k + ".q_invperm"] = torch.arange(8 + 88, dtype=torch.int32)
        _edit_layer(t, qm)
    elif code == "EXL2-G007":
        g = t[k + ".q_groups"].clone()
        g[3] = -32768
        t[k + ".q_groups"] = g
    elif code == "EXL2-S002":
        t[k + ".q_scale_max"] = torch.full_like(t[k + ".q_scale_max"], 2.0**-10)
    elif code == "EXL2-S004":
        s = t["lm_head.q_scale"].clone()
        s[:, -1] = 0  # columns 120..127 are padding (vocab 100 -> 128)
        t["lm_head.q_scale"] = s
    elif code == "EXL2-D001":
        spec = _spec([(8, 96)], 64, 62)
        qm = spec.build()
        qm.q_weight.fill_(-1)  # every 8-bit code 255
        qm.q_scale.fill_(-1)  # every scale code 15 (qs = 16)
        qm.q_scale_max.fill_(65504.0)
        _edit_layer(t, qm.to_tensors(k))
    else:  # pragma: no cover
        raise KeyError(code)


FILE_NEGATIVES = ("EXL2-C001", "EXL2-C002", "EXL2-C003", "EXL2-C004", "EXL2-C005", "EXL2-C006", "EXL2-C007",
                  "EXL2-C008", "EXL2-K001", "EXL2-K002", "EXL2-K003", "EXL2-K004", "EXL2-K005", "EXL2-T004",
                  "EXL2-G004", "EXL2-G005", "EXL2-G007", "EXL2-S002", "EXL2-S004", "EXL2-D001")


README = """# EXL2 conformance vectors

Generated by `exl2 conformance export` (the exl2 project). The same bytes on every run.

- `manifest.json`: one entry per vector: `file`, `kind` (positive / negative), `features`,
  `compare`, `sha256`; negatives name the finding `code` a validator must report.
- `positive/*.safetensors`: a valid EXL2 layer under the prefix `layer` (`layer.q_weight`,
  `layer.q_scale`, `layer.q_scale_max`, `layer.q_groups`, `layer.q_invperm`, optional `layer.bias`,
  `layer.q_perm`), plus `expected` (float16 [in_features, out_features_padded], the dequantized
  matrix: compare bit for bit), `x` (float16 [M, in_features]) and `y` (float32 [M, out_features]):
  `x @ expected[:, :out_features] + bias` computed exactly and rounded to float32; compare within
  the bound in the manifest.
- `negative/*.safetensors`: a layer that breaks exactly one rule of the spec; a decoder must refuse
  it, a validator must report `code` (and no other error).
- `negative/folder-*/`: a whole model folder (safetensors shards, config.json) with one broken rule
  of the container, the config or a layer; a validator must report `code` (kind `negative-folder`).

See docs/porting.md of the exl2 project and spec/exl2.md for the format itself.
"""


def export(directory: str | Path) -> dict:
    """Write the suite into ``directory`` (created or replaced atomically); returns the manifest."""
    directory = Path(directory)
    bound = {"y": f"|y - y_ref| <= {MATMUL_REL[torch.float16]!r} * (|x| @ |expected| + |bias|) + {MATMUL_ABS!r}",
             "expected": "bit-exact (compare float16 bit patterns)"}
    with atomic_path(directory) as tmp:
        tmp.unlink()
        (tmp / "positive").mkdir(parents=True)
        (tmp / "negative").mkdir()
        entries = []
        for v in positives():
            f = tmp / "positive" / f"{v.name}.safetensors"
            shape = write_positive(f, v)
            entries.append({"name": v.name, "kind": "positive", "file": f"positive/{f.name}",
                            "features": sorted(v.features), "compare": bound, "layer": shape, "sha256": _sha256(f)})
        for name, code, spec in negatives():
            f = tmp / "negative" / f"{name}.safetensors"
            write_negative(f, code, spec)
            entries.append({"name": name, "kind": "negative", "file": f"negative/{f.name}", "code": code,
                            "features": [f"negative:{code}"], "sha256": _sha256(f)})
        for code in FILE_NEGATIVES:
            name = f"folder-{code.lower()}"
            folder = tmp / "negative" / name
            _file_negative(code, folder)
            found = {f.code for f in _validate(folder)}
            if code not in found:  # pragma: no cover - guarded by tests
                raise AssertionError(f"folder vector for {code} reports {sorted(found)}")
            entries.append({"name": name, "kind": "negative-folder", "file": f"negative/{name}", "code": code,
                            "features": [f"negative:{code}"],
                            "sha256": {p.name: _sha256(p) for p in sorted(folder.iterdir())}})
        manifest = {"version": MANIFEST_VERSION, "prefix": PREFIX, "spec": "spec/exl2.md", "vectors": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(README)
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
    return manifest


def _validate(folder: Path):
    from .validate import validate_path

    return validate_path(folder, deep=True).findings


def load_layer(tensors: dict[str, torch.Tensor], out_features: int | None = None) -> QMatrix:
    return QMatrix.from_tensors(tensors, PREFIX, out_features=out_features)
