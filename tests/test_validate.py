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
from exl2.conformance.rules import check_layer, check_qmatrix
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


def mutate_layer(fn, config: dict | None = CONFIG):
    def run(folder: Path) -> None:
        t = llama_tensors()
        fn(t)
        write(folder, t, config)
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


def c010(folder: Path) -> None:
    # shards 1 and 3 of 3: every tensor the model needs is in shard 1, so only the gap is wrong
    t = llama_tensors()
    write(folder, t, name="output-00001-of-00003.safetensors")
    save_tensors(folder / "output-00003-of-00003.safetensors", {"extra.weight": torch.zeros(4, dtype=torch.float16)})


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
    monkeypatch.setattr(exl2.io, "open", broken, raising=False)  # the reader's opens; headers are read elsewhere


def padded_codes(t):
    qm_key = "model.layers.0.self_attn.k_proj"  # 32 columns, no padding; use lm_head (100 -> 128)
    w = t["lm_head.q_weight"]
    w[:, 120:] = 0
    t["lm_head.q_weight"] = w


def padded_nibbles(t):
    s = t["lm_head.q_scale"]
    s[:, 15] = 0x55555555  # columns 120..127: nibbles 5 (exllamav2 writes 0x0 or 0xF)
    t["lm_head.q_scale"] = s


def set_(name, fn):
    def m(t):
        t[f"{KEY}.{name}"] = fn(t[f"{KEY}.{name}"])
    return m


def partial_block(t):
    # one 3-bit group of 96 rows is 9 qrows (three 3-word blocks); keep 7 of them
    replace_layer(small_layer([(3, 0, 96)], 96, n=64))(t)
    t[KEY + ".q_weight"] = t[KEY + ".q_weight"][:7].clone()


def unaligned_groups(t):
    # two 4-bit groups of 32 and 64 rows (4 + 8 qrows); moving the boundary to qrow 2 makes them
    # 16 and 80 rows: whole blocks, the same total, but not multiples of 32
    replace_layer(small_layer([(4, 0, 32), (4, 32, 64)], 96, n=64))(t)
    t[KEY + ".q_groups"] = torch.tensor([4, 0, 4, 2], dtype=torch.int16)


def d001(folder: Path) -> None:
    t = llama_tensors()
    # 8-bit codes 255 at scale qs=16 with q_scale_max 65504: (255 - 128) * 256 * 255.9 overflows float16
    qm = pack(torch.full((96, 64), 255), [(8, 0, 96)], torch.full((1, 64), 16), torch.tensor([65504.0]),
              torch.arange(96), 64)
    replace_layer(qm)(t)
    write(folder, t)


def r001(folder: Path) -> None:
    """Every layer valid, config.json a runnable one-layer llama; an input norm weight of 70000
    overflows float16 in the first module that applies it."""
    t = llama_tensors()
    t["model.layers.0.post_attention_layernorm.weight"] = torch.ones(64, dtype=torch.float16)
    t["model.layers.0.input_layernorm.weight"][0] = 60000.0
    write(folder, t, dict(json.loads(json.dumps(CONFIG)), architectures=["LlamaForCausalLM"]))


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
    "EXL2-C010": (c010, None),
    "EXL2-K001": (k001, None),
    "EXL2-K002": (config_edit(lambda c: c.pop("quantization_config")), None),
    "EXL2-K003": (config_edit(lambda c: c["quantization_config"].update(quant_method="gptq")), None),
    "EXL2-K004": (config_edit(lambda c: c.update(intermediate_size=128)), KEY + ".q_weight"),
    "EXL2-K005": (config_edit(lambda c: c["quantization_config"].update(bits=8.0)), None),
    "EXL2-K006": (config_edit(lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 5e5})), None),
    "EXL2-T001": (mutate_layer(lambda t: t.pop(KEY + ".q_scale")), KEY + ".q_scale"),
    "EXL2-T002": (mutate_layer(set_("q_scale_max", lambda x: x.float())), KEY + ".q_scale_max"),
    "EXL2-T003": (mutate_layer(set_("q_scale", lambda x: x[:1])), KEY + ".q_scale"),
    "EXL2-T004": (mutate_layer(lambda t: (set_("q_weight", lambda x: x[:, :40].clone())(t),
                                          set_("q_scale", lambda x: x[:, :5].clone())(t)), config=None), KEY + ".q_weight"),
    "EXL2-T005": (mutate_layer(lambda t: t.__setitem__(KEY + ".bias", torch.zeros(10, dtype=torch.float16))),
                  KEY + ".bias"),
    "EXL2-T006": (mutate_layer(lambda t: t.__setitem__(KEY + ".bias", torch.zeros(40, dtype=torch.float16))),
                  KEY + ".bias"),
    "EXL2-T007": (mutate_layer(lambda t: t.__setitem__(KEY + ".bias", torch.full((64,), float("nan")).half())),
                  KEY + ".bias"),
    "EXL2-G001": (mutate_layer(set_("q_groups", lambda x: x.index_fill(0, torch.tensor([0]), 7))), KEY + ".q_groups"),
    "EXL2-G002": (mutate_layer(set_("q_groups", lambda x: torch.cat([x[2:], x[:2]]).index_fill(
        0, torch.tensor([1]), 0))), KEY + ".q_groups"),
    "EXL2-G003": (mutate_layer(set_("q_groups", lambda x: x.index_fill(0, torch.tensor([3]), 5000))), KEY + ".q_groups"),
    "EXL2-G004": (mutate_layer(partial_block), KEY + ".q_groups"),
    "EXL2-G005": (mutate_layer(unaligned_groups), KEY + ".q_groups"),
    "EXL2-G006": (mutate_layer(set_("q_invperm", lambda x: torch.arange(len(x) + 32, dtype=torch.int32)), config=None),
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
    "EXL2-R001": (r001, "model.layers.0.input_layernorm"),
}


#: Errors that necessarily come with a trigger's own code. A partial block (4.3) always leaves
#: a row count that is not a multiple of 32 (4.4): 32 rows are whole blocks of every width; and
#: the rows it drops no longer add up to in_features (4.6).
CONSEQUENCES = {"EXL2-G004": {"EXL2-G005", "EXL2-G006"}}


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
    r = validate_path(folder, deep=True, run=code.startswith("EXL2-R"))
    hits = [f for f in r.findings if f.code == code]
    assert hits, [(f.code, f.tensor, f.message) for f in r.findings]
    assert hits[0].severity == CATALOGUE[code].severity and hits[0].section == CATALOGUE[code].section
    assert hits[0].file is not None
    if tensor is not None:
        assert any(f.tensor == tensor for f in hits), [(f.tensor, f.message) for f in hits]
    errors = {f.code for f in r.findings if f.severity == "error"}
    expected = {code} | CONSEQUENCES.get(code, set()) if CATALOGUE[code].severity == "error" else set()
    assert errors == expected, [(f.code, f.tensor, f.message) for f in r.findings]
    assert r.ok == (not errors)


def test_catalogue_matches_spec_findings_md():
    text = (Path(__file__).parents[1] / "spec" / "findings.md").read_text()
    rows = re.findall(r"^\| `(EXL2-[A-Z]\d{3})` \| (error|warning|info) \| ([\d.]+) \| (.+) \|$", text, flags=re.M)
    assert len(rows) == len({c for c, *_ in rows})  # no code twice
    assert {c: (s, sec, t) for c, s, sec, t in rows} == {c: (i.severity, i.section, i.title) for c, i in CATALOGUE.items()}
    bullets = re.findall(r"^- `(EXL2-[A-Z]\d{3})` \((error|warning|info), ([\d.]+)\) — (.+)$", text, flags=re.M)
    assert {c: (s, sec, d) for c, s, sec, d in bullets} == {c: (i.severity, i.section, i.description)
                                                            for c, i in CATALOGUE.items()}


def test_catalogue_codes_are_well_formed_and_cite_spec_sections():
    spec = (Path(__file__).parents[1] / "spec" / "exl2.md").read_text()
    for code, info in CATALOGUE.items():
        assert re.fullmatch(r"EXL2-[CKTGPSDR]\d{3}", code) and info.code == code
        assert re.search(rf"^{re.escape(info.section)} \*\*", spec, flags=re.M), (code, info.section)


@pytest.mark.parametrize("corruption", ["truncate", "flip-header", "flip-length", "dtype", "shape", "groups",
                                        "invperm-dup"])
def test_corrupted_copies_are_rejected_naming_the_tensor(valid, tmp_path, corruption):
    folder = tmp_path / "c"
    shutil.copytree(valid, folder)
    f = folder / "output.safetensors"
    header, data = header_of(f)
    name = KEY + ".q_groups"
    last = max(header, key=lambda n: header[n]["data_offsets"][1] if n != "__metadata__" else -1)
    expected = {"truncate": ("EXL2-C004", last), "flip-header": ("EXL2-C003", name), "flip-length": ("EXL2-C001", None),
                "dtype": ("EXL2-T002", name), "shape": ("EXL2-C004", name), "groups": ("EXL2-G003", name),
                "invperm-dup": ("EXL2-P001", KEY + ".q_invperm")}[corruption]
    if corruption == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    elif corruption in ("flip-header", "flip-length"):
        b = bytearray(f.read_bytes())
        if corruption == "flip-header":  # one bit of the q_groups entry's dtype: "I16" becomes "I36"
            at = b.index(b'"I16"', b.index(name.encode())) + 2
            b[at] ^= 0x02
        else:
            b[5] ^= 0x01  # a header length far beyond the file
        f.write_bytes(bytes(b))
    elif corruption == "dtype":  # a valid container, a wrong layer dtype
        header[name]["dtype"] = "U16"
        raw_file(f, header, data)
    elif corruption == "shape":
        header[name]["shape"] = [header[name]["shape"][0] // 2, 3]
        raw_file(f, header, data)
    else:
        t = llama_tensors()
        if corruption == "groups":
            t[name][1] = 3  # first offset not 0
        else:
            t[KEY + ".q_invperm"][5] = t[KEY + ".q_invperm"][6]
        save_tensors(f, t)
    r = validate_path(folder)
    assert not r.ok
    errors = [x for x in r.findings if x.severity == "error"]
    assert all(x.file for x in errors)
    assert expected in {(x.code, x.tensor) for x in errors}, [(x.code, x.tensor, x.message) for x in errors]


def cli(*args: str):
    """The command in-process (typer's runner: exit code, stdout and stderr apart)."""
    from typer.testing import CliRunner

    from exl2.cli import app

    return CliRunner().invoke(app, ["validate", *args])


def test_cli_exit_codes_and_json(valid, tmp_path):
    r = cli(str(valid), "--json")
    assert r.exit_code == 0, r.output[-2000:]
    report = Report.model_validate_json(r.stdout)
    assert report.ok and report.summary.layers == 8
    schema = cli("--json-schema")
    assert schema.exit_code == 0
    props = json.loads(schema.stdout)
    assert set(props["properties"]) == set(Report.model_fields) == set(json.loads(r.stdout))
    r = cli(str(valid))
    assert r.exit_code == 0 and "VALID" in r.stdout and "8 layer(s)" in r.stdout
    broken = tmp_path / "broken"
    TRIGGERS["EXL2-P001"][0](broken)
    r = cli(str(broken), "--json")
    assert r.exit_code == 1
    assert any(f.code == "EXL2-P001" for f in Report.model_validate_json(r.stdout).findings)
    r = cli(str(broken))
    assert r.exit_code == 1 and "EXL2-P001" in r.stdout and "INVALID" in r.stdout
    for args in ([str(tmp_path / "missing")], [], [str(tmp_path)]):  # no path, none given, no .safetensors in it
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), args
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("exl2: error:"), (args, r.stderr)
    assert cli("--no-such-option").exit_code == 2


def test_cli_garbage_without_traceback(tmp_path):
    """End to end through the installed entry point: one process, garbage in, no traceback."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 50)
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "validate", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "EXL2-C001" in r.stdout and "Traceback" not in r.stdout + r.stderr


# -- check_layer directly ------------------------------------------------------------------


def test_check_layer_reports_every_broken_rule_at_once():
    t = quantize(torch.randn(40, 64, generator=torch.Generator().manual_seed(2)), QP).to_tensors("L")
    t["L.q_invperm"][0] = t["L.q_invperm"][1]                        # P001
    t["L.q_scale_max"][0] = float("nan")                             # S001
    g = t["L.q_groups"].view(-1, 2)
    assert len(g) >= 2 and g[0, 0] > g[-1, 0]
    t["L.q_groups"] = torch.stack([g[-1], g[0]] if len(g) == 2 else [g[-1], *g[1:-1], g[0]]).flatten()  # G002 (G003)
    t["L.bias"] = torch.zeros(3, dtype=torch.float32)                # T005
    found = {f.code for f in check_layer(t, "L")}
    assert {"EXL2-P001", "EXL2-S001", "EXL2-G002", "EXL2-T005"} <= found


def expected_bpw(qm) -> float:
    """Stored bits per weight by spec 7.5, from the group table (not from tensor sizes)."""
    q = sum(g.rows * g.bits // 32 for g in qm.groups)
    g, n_pad, k, n = len(qm.groups), qm.out_features_padded, qm.in_features, qm.out_features
    bits = 32 * q * n_pad + 4 * g * n_pad + 16 * g + 32 * g + 32 * k + (16 * n_pad if qm.bias is not None else 0)
    return bits / (k * n)


def test_check_layer_bits_target():
    qm = quantize(torch.randn(40, 128, generator=torch.Generator().manual_seed(3)), QP,
                  bias=torch.randn(40, generator=torch.Generator().manual_seed(4)))
    bpw = expected_bpw(qm)
    # 4.5 bits over 64 stored columns for 40 real ones (7.2), plus scales, permutation (0.8) and bias
    assert 7.5 < bpw < 9.0
    assert not check_qmatrix(qm, bits_target=bpw + 0.29)
    assert not check_qmatrix(qm, bits_target=bpw - 0.29)
    hits = check_qmatrix(qm, "L", bits_target=bpw + 0.31)
    assert [(f.code, f.severity, f.tensor) for f in hits] == [("EXL2-K005", "warning", "L.q_weight")]
    assert f"{bpw:.3f}" in hits[0].message


def test_deep_statistics_by_hand(tmp_path):
    # every code one above the zero point, scale code 15 (qs = 16), q_scale_max 1: each real weight
    # is 1 * half(16^2 * half(1 / 256)) = 1.0 exactly, padded columns 0 (spec 6.1-6.3)
    for bits in (4, 8):
        qm = pack(torch.full((64, 40), (1 << (bits - 1)) + 1), [(bits, 0, 64)], torch.full((1, 40), 16),
                  torch.tensor([1.0]), torch.arange(64), 40)
        t = qm.to_tensors("L")
        # N known from config.json (lm_head: vocab_size): the statistics cover the 40 real columns
        folder = tmp_path / f"head-{bits}"
        write(folder, qm.to_tensors("lm_head"), {"hidden_size": 64, "num_attention_heads": 1, "vocab_size": 40})
        (s,) = validate_path(folder, deep=True).layers
        assert (s.min, s.max, s.mean, s.std, s.nonfinite, s.out_features) == (1.0, 1.0, 1.0, 0.0, 0, 40)
        save_tensors(tmp_path / "nobias.safetensors", t)  # N unknown: all 64 columns count
        r = validate_path(tmp_path / "nobias.safetensors", deep=True)
        assert r.ok, r.findings
        (s,) = r.layers
        n, p = 64 * 64, 40 / 64
        assert (s.min, s.max, s.nonfinite, s.in_features, s.out_features) == (0.0, 1.0, 0, 64, 64)
        assert s.mean == pytest.approx(p) and s.std == pytest.approx((p * (1 - p) * n / (n - 1)) ** 0.5)


def test_progress_is_called_once_per_layer(valid):
    seen = []

    def progress(items, total, description):
        for x in items:
            seen.append((x, total, description))
            yield x
    r = validate_path(valid, progress=progress)
    assert [x for x, *_ in seen] == [s.key for s in r.layers] and all(t == 8 for _, t, _ in seen)
    assert validate_path(valid, progress=True).ok  # the terminal bar; silent when stderr is not a terminal


def test_summary_counts_and_throughput(valid):
    r = validate_path(valid)
    assert r.summary.files == 1 and r.summary.bytes == (valid / "output.safetensors").stat().st_size
    assert r.summary.layers_per_second > 0 and r.schema_version == 1
    assert (r.summary.errors, r.summary.warnings, r.summary.infos) == tuple(
        sum(f.severity == s for f in r.findings) for s in ("error", "warning", "info"))


@pytest.mark.parametrize("names, expected", [
    (["output-00001-of-00002.safetensors", "output-00002-of-00002.safetensors"], []),
    (["output-00002-of-00003.safetensors", "output-00003-of-00003.safetensors"], ["output-00001-of-00003.safetensors"]),
    (["output-00001-of-00003.safetensors", "output-00003-of-00003.safetensors"], ["output-00002-of-00003.safetensors"]),
    (["output-00001-of-00002.safetensors", "output-00002-of-00003.safetensors"], ["disagree"]),
    (["model-00001-of-00001.safetensors", "output-00001-of-00002.safetensors"], ["output-00002-of-00002.safetensors"]),
    (["output-00001-of-00001.safetensors", "output-00002-of-00001.safetensors"], ["beyond"]),
])
def test_shard_set_must_be_complete(tmp_path, names, expected):
    """Each name's numbered shards make up 1 .. total; a gap names the missing file."""
    t = llama_tensors()
    folder = write(tmp_path / "m", t, name=names[0])
    for i, name in enumerate(names[1:]):
        save_tensors(folder / name, {f"extra{i}.weight": torch.zeros(4, dtype=torch.float16)})
    hits = [f for f in validate_path(folder).findings if f.code == "EXL2-C010"]
    assert len(hits) == len(expected), [(f.file, f.message) for f in hits]
    for f, what in zip(hits, expected):
        assert what in f.file + " " + f.message


# -- gaps closed: layers found by any of their tensors, the bias, K005's count ---------------------


@pytest.mark.parametrize("drop, extra, missing", [
    (["q_weight"], {}, ["q_weight"]),
    (["q_weight", "q_scale_max", "q_groups", "q_invperm"], {}, ["q_weight", "q_scale_max", "q_groups", "q_invperm"]),
    ([], {"model.layers.0.mlp.lone.q_scale": torch.zeros(1, 8, dtype=torch.int32)}, []),
])
def test_a_layer_without_q_weight_is_still_a_layer(tmp_path, drop, extra, missing):
    t = llama_tensors()
    for name in drop:
        del t[f"{KEY}.{name}"]
    t.update(extra)
    for deep in (False, True):
        r = validate_path(write(tmp_path / f"m{deep}", t), deep=deep)
        t001 = {f.tensor for f in r.findings if f.code == "EXL2-T001"}
        if extra:
            lone = "model.layers.0.mlp.lone"
            assert t001 == {f"{lone}.{n}" for n in ("q_weight", "q_scale_max", "q_groups", "q_invperm")}
        else:
            assert t001 == {f"{KEY}.{n}" for n in missing}
        assert not r.ok and all(f.file for f in r.findings if f.code == "EXL2-T001")


def test_a_nan_bias_is_an_error_without_deep(tmp_path):
    t = llama_tensors()
    t[KEY + ".bias"] = torch.zeros(64, dtype=torch.float16)
    assert validate_path(write(tmp_path / "ok", t)).ok  # a zero bias of N' entries is fine
    t[KEY + ".bias"][7] = float("nan")
    r = validate_path(write(tmp_path / "nan", t))
    assert [(f.code, f.tensor) for f in r.findings if f.severity == "error"] == [("EXL2-T007", KEY + ".bias")]


def test_k005_average_is_weighted_by_size_and_counts_layers_with_errors(tmp_path):
    t = llama_tensors()
    keys = [f"model.layers.0.{name}" for name in LINEARS]
    # stored bits over weights, all decoder layers (lm_head excluded), counted from the layers' tensors
    stored = sum(8 * t[f"{k}.{n}"].numel() * t[f"{k}.{n}"].element_size()
                 for k in keys for n in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"))
    weights = sum(k * n for k, n in LINEARS.values())
    t[KEY + ".q_invperm"][0] = t[KEY + ".q_invperm"][1]  # P001: the layer has an error, its size is known
    r = validate_path(write(tmp_path / "m", t))
    assert {f.code for f in r.findings if f.severity == "error"} == {"EXL2-P001"}
    assert r.summary.bpw == pytest.approx(stored / weights, rel=1e-12)
    # a layer whose size the headers do not give is left out, and the finding says so
    del t[KEY + ".q_invperm"]
    cfg = json.loads(json.dumps(CONFIG))
    cfg["quantization_config"]["bits"] = 2.0
    r = validate_path(write(tmp_path / "n", t, cfg))
    (k005,) = [f for f in r.findings if f.code == "EXL2-K005"]
    assert "weighted by layer size" in k005.message and "1 layer(s)" in k005.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("verb", ["inspect", "dequantize"])
def test_readers_refuse_a_bad_scale_max_with_exit_1(tmp_path, value, verb):
    from typer.testing import CliRunner

    from exl2.cli import app

    t = llama_tensors()
    t[KEY + ".q_scale_max"][1] = value
    folder = write(tmp_path / "m", t)
    out = tmp_path / "w.safetensors"
    args = [verb, str(folder)] + (["-o", str(out)] if verb == "dequantize" else [])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "EXL2-S001" in line and KEY + ".q_scale_max" in line and "output.safetensors" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [folder]
