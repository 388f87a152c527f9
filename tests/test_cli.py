"""``exl2 inspect`` and ``exl2 dequantize`` on real files: a two-shard model folder written here,
its output checked against the reference decoder (and one layer against the exllamav2
emulation), and bad input: one line on stderr naming the file and tensor, a non-zero exit, no
traceback, nothing left at OUT and no temporary file beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from exl2 import QMatrix
from exl2.cli import app
from exl2.io import save_tensors
from exl2.reference import dequantize, pack

from . import exllamav2_emulation as ex

EXL2 = str(Path(sys.executable).parent / "exl2")

#: key -> (in_features, out_features, groups as (bits, rows), bias?)
LAYERS = {
    "model.layers.0.self_attn.q_proj": (96, 45, [(6, 32), (4, 64)], True),
    "model.layers.0.mlp.up_proj": (64, 64, [(3, 64)], False),
    "model.layers.1.mlp.down_proj": (80, 33, [(8, 32), (5, 32), (2, 16)], False),
}
SHARD_OF = {"model.layers.0.self_attn.q_proj": 1, "model.layers.0.mlp.up_proj": 1, "model.layers.1.mlp.down_proj": 2}
LAST_LAYER = "model.layers.1.mlp.down_proj"  # in shard 2: written after the others


def random_layer(k: int, n: int, groups: list[tuple[int, int]], bias: bool, seed: int) -> QMatrix:
    g = torch.Generator().manual_seed(seed)
    plan, row = [], 0
    for bits, rows in groups:
        plan.append((bits, row, rows))
        row += rows
    assert row == k
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=g) for b, r in groups])
    return pack(codes, plan, torch.randint(1, 17, (len(groups), n), generator=g),
                torch.rand(len(groups), generator=g) * 0.05 + 1e-3, torch.randperm(k, generator=g), n,
                torch.randn(n, generator=g) if bias else None)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, dict[str, QMatrix], dict[str, torch.Tensor]]:
    """A model folder with two shards; returns the folder, its layers and its other tensors."""
    folder = tmp_path_factory.mktemp("model")
    layers = {key: random_layer(k, n, groups, bias, seed)
              for seed, (key, (k, n, groups, bias)) in enumerate(LAYERS.items())}
    g = torch.Generator().manual_seed(9)
    other = {
        "model.embed_tokens.weight": torch.randn(12, 96, generator=g).half(),
        "model.norm.weight": torch.randn(96, generator=g).to(torch.bfloat16),
        "model.rotary.inv_freq": torch.rand(8, generator=g),
        "model.position_ids": torch.arange(7),
    }
    shards = {1: {}, 2: {}}
    for key, qm in layers.items():
        shards[SHARD_OF[key]].update(qm.to_tensors(key))
    shards[1]["model.embed_tokens.weight"] = other["model.embed_tokens.weight"]
    for name in ("model.norm.weight", "model.rotary.inv_freq", "model.position_ids"):
        shards[2][name] = other[name]
    save_tensors(folder / "output-00001-of-00002.safetensors", shards[1])
    save_tensors(folder / "output-00002-of-00002.safetensors", shards[2])
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl2", "bits": 4.0}}))
    return folder, layers, other


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_json(model):
    folder, layers, other = model
    r = invoke("inspect", str(folder), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["files"] == ["output-00001-of-00002.safetensors", "output-00002-of-00002.safetensors"]
    assert sorted(layer["key"] for layer in info["layers"]) == sorted(LAYERS)
    total_bits = total_weights = 0
    for layer in info["layers"]:
        k, n, groups, bias = LAYERS[layer["key"]]
        # the layer's tensors do not say how many columns are padding (the bias holds all N' of
        # them, spec 3.3), and this config.json gives no dimensions: out = padded width
        out = -(-n // 32) * 32
        assert (layer["in_features"], layer["out_features"], layer["out_features_padded"]) == (k, out, -(-n // 32) * 32)
        assert layer["groups"] == {str(b): 1 for b, _ in groups}
        assert layer["rows"] == {str(b): r for b, r in groups}
        assert layer["bias"] is bias
        # bits per weight from the stored bytes of the layer's tensors, counted here
        nbytes = sum(t.numel() * t.element_size() for t in layers[layer["key"]].to_tensors().values())
        assert layer["bpw"] == pytest.approx(8 * nbytes / (k * out), rel=1e-12)
        total_bits += 8 * nbytes
        total_weights += k * out
    s = info["summary"]
    assert s["quantized_layers"] == 3 and s["other_tensors"] == len(other)
    assert s["quantized_weights"] == total_weights and s["bpw"] == pytest.approx(total_bits / total_weights)
    assert s["bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert s["quantization_config"] == {"quant_method": "exl2", "bits": 4.0}


def test_inspect_table(model):
    folder, _, _ = model
    r = invoke("inspect", str(folder))
    assert r.exit_code == 0, r.output
    for key, (k, n, groups, bias) in LAYERS.items():
        assert key in r.stdout
        assert f"{k} x {-(-n // 32) * 32}" in r.stdout
    assert "3 quantized layers" in r.stdout and "4 other tensors" in r.stdout


# -- dequantize -----------------------------------------------------------------------------------


def check_output(out: Path, layers: dict[str, QMatrix], other: dict[str, torch.Tensor]) -> None:
    got = load_file(out)
    expected_names = {f"{k}.weight" for k in layers} | set(other) | {f"{k}.bias" for k, qm in layers.items()
                                                                    if qm.bias is not None}
    assert set(got) == expected_names
    for key, qm in layers.items():
        w = got[key + ".weight"]
        assert w.dtype == torch.float16 and w.shape == (qm.out_features_padded, qm.in_features)
        assert torch.equal(w.view(torch.int16), dequantize(qm).T.contiguous().view(torch.int16))
        if qm.bias is not None:
            assert torch.equal(got[key + ".bias"].view(torch.int16), qm.bias.view(torch.int16))
    for name, t in other.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_dequantize_folder(model, tmp_path):
    folder, layers, other = model
    out = tmp_path / "dense.safetensors"
    r = invoke("dequantize", str(folder), "-o", str(out))
    assert r.exit_code == 0, r.output
    check_output(out, layers, other)
    assert os.listdir(tmp_path) == ["dense.safetensors"]
    # one layer against the exllamav2 emulation, from the file's own tensors
    key = "model.layers.1.mlp.down_proj"
    tensors = {n: t.numpy() for n, t in layers[key].to_tensors(key).items()}
    want = ex.reconstruct(ex.make_q_matrix(ex.load_weight(tensors, key))).T
    with safe_open(str(out), framework="np") as f:
        assert np.array_equal(f.get_tensor(key + ".weight").view(np.int16), want.view(np.int16))


def test_dequantize_single_file(model, tmp_path):
    folder, layers, other = model
    out = tmp_path / "sub" / "one.safetensors"
    r = invoke("dequantize", str(folder / "output-00002-of-00002.safetensors"), "-o", str(out))
    assert r.exit_code == 0, r.output
    shard2 = {k: v for k, v in layers.items() if SHARD_OF[k] == 2}
    check_output(out, shard2, {k: v for k, v in other.items() if k != "model.embed_tokens.weight"})


def test_subprocess_end_to_end(model, tmp_path):
    folder, layers, other = model
    out = tmp_path / "dense.safetensors"
    r = subprocess.run([EXL2, "dequantize", str(folder), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    check_output(out, layers, other)


# -- bad input ------------------------------------------------------------------------------------


def rewrite(folder: Path, tmp_path: Path, shard: int, change) -> Path:
    """A copy of the model folder with one shard's tensors changed by ``change(tensors)``."""
    dst = tmp_path / "bad-model"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    name = f"output-0000{shard}-of-00002.safetensors"
    tensors = load_file(dst / name)
    change(tensors)
    save_tensors(dst / name, tensors)
    return dst


def bad_input(how: str, folder: Path, tmp_path: Path) -> tuple[Path, list[str], int]:
    """The path to feed the CLI, the strings its error line must hold, and the exit code."""
    shard1 = folder / "output-00001-of-00002.safetensors"
    if how == "missing path":
        return tmp_path / "nowhere", ["nowhere"], 2
    if how == "not safetensors":
        p = tmp_path / "model.bin"
        p.write_bytes(shard1.read_bytes())
        return p, ["model.bin"], 2
    if how == "garbage bytes":
        p = tmp_path / "garbage.safetensors"
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
        return p, ["garbage.safetensors", "EXL2-C001"], 1
    if how == "empty file":
        p = tmp_path / "empty.safetensors"
        p.write_bytes(b"")
        return p, ["empty.safetensors", "EXL2-C001"], 1
    if how == "truncated":
        p = tmp_path / "truncated.safetensors"
        p.write_bytes(shard1.read_bytes()[:-64])
        return p, ["truncated.safetensors", "EXL2-C004"], 1
    if how == "missing q_scale":
        d = rewrite(folder, tmp_path, 1, lambda t: t.pop("model.layers.0.mlp.up_proj.q_scale"))
        return d, ["output-00001-of-00002.safetensors", "model.layers.0.mlp.up_proj.q_scale"], 1
    if how == "inconsistent q_groups":
        # the last layer (in shard 2, dequantized after the others): its 2-bit group offset points
        # past q_weight
        def change(t):
            t[LAST_LAYER + ".q_groups"][-1] = 99
        d = rewrite(folder, tmp_path, 2, change)
        return d, ["output-00002-of-00002.safetensors", LAST_LAYER + ".q_groups"], 1
    if how == "widths increase":
        def change(t):
            t[LAST_LAYER + ".q_groups"][0] = 2  # a 2-bit group before 5- and 2-bit groups
        d = rewrite(folder, tmp_path, 2, change)
        return d, ["output-00002-of-00002.safetensors", LAST_LAYER + ".q_groups"], 1
    if how == "q_invperm not a permutation":
        def change(t):
            t[LAST_LAYER + ".q_invperm"][:] = 0
        d = rewrite(folder, tmp_path, 2, change)
        return d, ["output-00002-of-00002.safetensors", LAST_LAYER + ".q_invperm"], 1
    raise ValueError(how)


BAD = ["missing path", "not safetensors", "garbage bytes", "empty file", "truncated", "missing q_scale",
       "inconsistent q_groups", "widths increase", "q_invperm not a permutation"]


def assert_one_line_error(result, names: list[str], code: int) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert all(name in lines[0] for name in names), lines[0]


@pytest.mark.parametrize("how", BAD)
def test_bad_input(model, tmp_path, how):
    folder, _, _ = model
    src, names, code = bad_input(how, folder, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "dense.safetensors"
    assert_one_line_error(invoke("dequantize", str(src), "-o", str(out)), names, code)
    assert os.listdir(out_dir) == []  # nothing at OUT, no temporary file beside it
    assert_one_line_error(invoke("inspect", str(src)), names, code)
    assert_one_line_error(invoke("inspect", str(src), "--json"), names, code)


def test_bad_input_subprocess(model, tmp_path):
    # the installed command, on a layer that fails after other layers were already streamed out
    folder, _, _ = model
    src, names, code = bad_input("inconsistent q_groups", folder, tmp_path)
    out = tmp_path / "out" / "dense.safetensors"
    r = subprocess.run([EXL2, "dequantize", str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in names), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not out.exists() and (not out.parent.exists() or os.listdir(out.parent) == [])


def test_output_must_be_safetensors(model, tmp_path):
    folder, _, _ = model
    r = invoke("dequantize", str(folder), "-o", str(tmp_path / "dense.bin"))
    assert r.exit_code != 0 and "dense.bin" in r.stderr and "Traceback" not in r.output
    assert os.listdir(tmp_path) == []
