"""The validator: a folder written the way exllamav2 writes it validates clean, every code of the
catalogue has a trigger that names the tensor, corrupted copies are rejected, the CLI's exit codes."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exl2 import QParams
from exl2.conformance.findings import CATALOGUE
from exl2.conformance.validate import Report, validate_path
from exl2.io import save_tensors
from exl2.reference import pack, quantize

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 100,
          "quantization_config": {"quant_method": "exl2", "version": "0.2.7", "bits": 5.2, "head_bits": 6,
                                  "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}}}
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 96), "mlp.up_proj": (64, 96), "mlp.down_proj": (96, 64)}
QP = QParams(32, [5, 4], [0.5, 0.5])
KEY = "model.layers.0.mlp.down_proj"


def llama_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for name, (k, n) in LINEARS.items():
        t |= quantize(torch.randn(n, k, generator=g), QP).to_tensors(f"model.layers.0.{name}")
    t |= quantize(torch.randn(100, 64, generator=g), QParams(32, [6], [1.0])).to_tensors("lm_head")
    t["model.embed_tokens.weight"] = torch.randn(100, 64, generator=g).half()
    t["model.layers.0.input_layernorm.weight"] = torch.ones(64, dtype=torch.float16)
    t["model.norm.weight"] = torch.ones(64, dtype=torch.float16)
    return t


def write(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = CONFIG, name="output.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / name, tensors)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def raw_file(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def header_of(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("valid"), llama_tensors())


def test_exllamav2_style_folder_validates_clean(valid, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(valid, folder)
    # exllamav2 copies the source model's index file: stale, a warning only
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    r = validate_path(folder, deep=True)
    assert r.ok, [f for f in r.findings if f.severity == "error"]
    assert {f.code for f in r.findings} == {"EXL2-C007"}
    assert r.summary.layers == 8 and len(r.layers) == 8
    assert all(s.nonfinite == 0 for s in r.layers)


# -- one trigger per code -----------------------------------------------------------------


def mutate_layer(fn):
    def run(folder: Path) -> None:
        t = llama_tensors()
        fn(t)
        write(folder, t)
    return run


def small_layer(groups, codes_rows, n=40, **kw):
    """A standalone layer through pack(): groups = [(bits, first_row, rows)]."""
    g = torch.Generator().manual_seed(1)
    k = codes_rows
    return pack(torch.randint(0, 4, (k, n), generator=g) + 1, groups, torch.randint(1, 17, (len(groups), n), generator=g),
                torch.full((len(groups),), kw.get("smax", 0.1)), torch.randperm(k, generator=g), n)


def replace_layer(qm):
    def fn(t):
        for name in [n for n in t if n.startswith(KEY + ".")]:
            del t[name]
        t.update(qm.to_tensors(KEY))
    return fn


def edit_header(fn):
    def run(folder: Path) -> None:
        write(folder, llama_tensors())
        f = folder / "output.safetensors"
        header, data = header_of(f)
        header, data = fn(header, data)
        raw_file(f, header, data)
    return run


def c005(header, data):
    names = [n for n in header if n != "__metadata__"]
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    header[names[1]]["shape"] = header[names[0]]["shape"]
    header[names[1]]["dtype"] = header[names[0]]["dtype"]
    return header, data


def c006(folder: Path) -> None:
    t = llama_tensors()
    write(folder, t, name="output-00001-of-00002.safetensors")
    save_tensors(folder / "output-00002-of-00002.safetensors", {"model.norm.weight": t["model.norm.weight"]})


def config_edit(fn):
    def run(folder: Path) -> None:
        cfg = json.loads(json.dumps(CONFIG))
        fn(cfg)
        write(folder, llama_tensors(), cfg)
    return run


def k001(folder: Path) -> None:
    write(folder, llama_tensors())
    (folder / "config.json").write_text("{not json")


def c009(folder: Path, monkeypatch) -> None:
    write(folder, llama_tensors())
    import exl2.io

    def broken(*a, **k):
        raise OSError("simulated read failure")
    monkeypatch.setattr(exl2.io, "safe_open", broken)


def padded_codes(t):
    qm_key = "model.layers.0.self_attn.k_proj"  # 32 columns, no padding; use lm_head (100 -> 128)
    w = t["lm_head.q_weight"]
    w[:, 120:] = 0
    t["lm_head.q_weight"] = w


def padded_nibbles(t):
    s = t["lm_head.q_scale"]
    s[:, 15] = 0  # columns 120..127: nibbles 0
    t["lm_head.q_scale"] = s


def set_(name, fn):
    def m(t):
        t[f"{KEY}.{name}"] = fn(t[f"{KEY}.{name}"])
    return m


def partial_block(t):
    # one 3-bit group of 64 rows is 6 qrows (two 3-word blocks); keep 4 of them
    replace_layer(small_layer([(3, 0, 64)], 64))(t)
    t[KEY + ".q_weight"] = t[KEY + ".q_weight"][:4].clone()


def d001(folder: Path) -> None:
    t = llama_tensors()
    # 8-bit codes 255 at scale qs=16 with q_scale_max 65504: (255 - 128) * 256 * 255.9 overflows float16
    qm = pack(torch.full((96, 64), 255), [(8, 0, 96)], torch.full((1, 64), 16), torch.tensor([65504.0]),
              torch.arange(96), 64)
    replace_layer(qm)(t)
    write(folder, t)


TRIGGERS = {
    "EXL2-C001": (lambda f: (write(f, {}), (f / "output.safetensors").write_bytes(b"\x01\x02")), None),
    "EXL2-C002": (edit_header(lambda h, d: ([1, 2], d)), None),
    "EXL2-C003": (edit_header(lambda h, d: (h | {KEY + ".q_scale": h[KEY + ".q_scale"] | {"dtype": "X9"}}, d)),
                  KEY + ".q_scale"),
    "EXL2-C004": (edit_header(lambda h, d: (h, d[:-64])), None),
    "EXL2-C005": (edit_header(c005), None),
    "EXL2-C006": (c006, "model.norm.weight"),
    "EXL2-C007": (lambda f: (write(f, llama_tensors()), (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00009.safetensors"}}))), None),
    "EXL2-C008": (lambda f: write(f, llama_tensors(), name="model.safetensors"), None),
    "EXL2-C009": (c009, None),
    "EXL2-K001": (k001, None),
    "EXL2-K002": (config_edit(lambda c: c.pop("quantization_config")), None),
    "EXL2-K003": (config_edit(lambda c: c["quantization_config"].update(quant_method="gptq")), None),
    "EXL2-K004": (config_edit(lambda c: c.update(intermediate_size=128)), KEY + ".q_weight"),
    "EXL2-K005": (config_edit(lambda c: c["quantization_config"].update(bits=8.0)), None),
    "EXL2-T001": (mutate_layer(lambda t: t.pop(KEY + ".q_scale")), KEY + ".q_scale"),
    "EXL2-T002": (mutate_layer(set_("q_scale_max", lambda x: x.float())), KEY + ".q_scale_max"),
    "EXL2-T003": (mutate_layer(set_("q_scale", lambda x: x[:1])), KEY + ".q_scale"),
    "EXL2-T004": (mutate_layer(set_("q_weight", lambda x: x[:, :40])), KEY + ".q_weight"),
    "EXL2-T005": (mutate_layer(lambda t: t.__setitem__(KEY + ".bias", torch.zeros(10, dtype=torch.float16))),
                  KEY + ".bias"),
    "EXL2-G001": (mutate_layer(set_("q_groups", lambda x: x.index_fill(0, torch.tensor([0]), 7))), KEY + ".q_groups"),
    "EXL2-G002": (mutate_layer(set_("q_groups", lambda x: torch.cat([x[2:], x[:2]]).index_fill(
        0, torch.tensor([1]), 0))), KEY + ".q_groups"),
    "EXL2-G003": (mutate_layer(set_("q_groups", lambda x: x.index_fill(0, torch.tensor([3]), 5000))), KEY + ".q_groups"),
    "EXL2-G004": (mutate_layer(partial_block), KEY + ".q_groups"),
    "EXL2-G005": (mutate_layer(lambda t: (replace_layer(small_layer([(4, 0, 32), (4, 32, 32)], 64))(t),
                                          t.__setitem__(KEY + ".q_groups", torch.tensor([4, 0, 4, 1], dtype=torch.int16)))),
                  KEY + ".q_groups"),
    "EXL2-G006": (mutate_layer(set_("q_invperm", lambda x: torch.arange(len(x) + 32, dtype=torch.int32))),
                  KEY + ".q_groups"),
    "EXL2-G007": (mutate_layer(set_("q_groups", lambda x: x.index_fill(0, torch.tensor([3]), -3))), KEY + ".q_groups"),
    "EXL2-P001": (mutate_layer(set_("q_invperm", lambda x: x.index_fill(0, torch.tensor([0]), int(x[1])))),
                  KEY + ".q_invperm"),
    "EXL2-P002": (mutate_layer(lambda t: t.__setitem__(KEY + ".q_perm", t[KEY + ".q_invperm"].roll(1))), KEY + ".q_perm"),
    "EXL2-S001": (mutate_layer(set_("q_scale_max", lambda x: x.index_fill(0, torch.tensor([0]), float("inf")))),
                  KEY + ".q_scale_max"),
    "EXL2-S002": (mutate_layer(set_("q_scale_max", lambda x: x.index_fill(0, torch.tensor([0]), 2.0**-10))),
                  KEY + ".q_scale_max"),
    "EXL2-S003": (mutate_layer(padded_codes), "lm_head.q_weight"),
    "EXL2-S004": (mutate_layer(padded_nibbles), "lm_head.q_scale"),
    "EXL2-D001": (d001, KEY + ".q_weight"),
}


def test_every_code_has_a_trigger():
    assert set(TRIGGERS) == set(CATALOGUE)


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_trigger_reports_its_code(code, tmp_path, monkeypatch):
    make, tensor = TRIGGERS[code]
    folder = tmp_path / "m"
    if code == "EXL2-C009":
        make(folder, monkeypatch)
    else:
        make(folder)
    r = validate_path(folder, deep=True)
    hits = [f for f in r.findings if f.code == code]
    assert hits, [(f.code, f.tensor, f.message) for f in r.findings]
    assert hits[0].severity == CATALOGUE[code].severity and hits[0].section == CATALOGUE[code].section
    assert hits[0].file is not None
    if tensor is not None:
        assert any(f.tensor == tensor for f in hits), [(f.tensor, f.message) for f in hits]
    assert r.ok == (not any(f.severity == "error" for f in r.findings))
    if CATALOGUE[code].severity == "error":
        assert not r.ok


def test_catalogue_matches_spec_findings_md():
    text = (Path(__file__).parents[1] / "spec" / "findings.md").read_text()
    rows = re.findall(r"^\| `(EXL2-[A-Z]\d{3})` \| (error|warning|info) \| ([\d.]+) \|", text, flags=re.M)
    assert {c: (s, sec) for c, s, sec in rows} == {c: (i.severity, i.section) for c, i in CATALOGUE.items()}


@pytest.mark.parametrize("corruption", ["truncate", "flip-header", "dtype", "shape", "groups", "invperm-dup"])
def test_corrupted_copies_are_rejected_naming_the_tensor(valid, tmp_path, corruption):
    folder = tmp_path / "c"
    shutil.copytree(valid, folder)
    f = folder / "output.safetensors"
    header, data = header_of(f)
    name = KEY + ".q_groups"
    if corruption == "truncate":
        f.write_bytes(f.read_bytes()[:-1000])
    elif corruption == "flip-header":
        b = bytearray(f.read_bytes())
        b[8 + 2] ^= 0xFF
        f.write_bytes(bytes(b))
    elif corruption == "dtype":
        header[name]["dtype"] = "U16"
        raw_file(f, header, data)
    elif corruption == "shape":
        header[name]["shape"] = [header[name]["shape"][0] // 2, 2]
        raw_file(f, header, data)
    else:
        t = llama_tensors()
        if corruption == "groups":
            t[name][1] = 3
        else:
            t[KEY + ".q_invperm"][5] = t[KEY + ".q_invperm"][6]
        save_tensors(f, t)
    r = validate_path(folder)
    assert not r.ok
    errors = [x for x in r.findings if x.severity == "error"]
    assert errors and all(x.file for x in errors)
    if corruption in ("dtype", "shape", "groups"):
        assert any(x.tensor == name for x in errors)
    if corruption == "invperm-dup":
        assert any(x.tensor == KEY + ".q_invperm" and x.code == "EXL2-P001" for x in errors)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exl2.cli", "validate", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_exit_codes_and_json(valid, tmp_path):
    r = cli(str(valid), "--json")
    assert r.returncode == 0, r.stdout[-2000:]
    report = Report.model_validate_json(r.stdout)
    assert report.ok and report.summary.layers == 8
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 50)
    r = cli(str(bad))
    assert r.returncode == 1 and "EXL2-C001" in r.stdout and "Traceback" not in r.stdout + r.stderr
    r = cli(str(tmp_path / "missing"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr
    r = cli("--json-schema")
    assert r.returncode == 0 and "findings" in json.loads(r.stdout)["properties"]
