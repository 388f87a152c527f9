"""The inspect and dequantize verbs on real files, and their handling of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exl2 import QParams
from exl2.io import save_tensors
from exl2.reference import dequantize, quantize

EXL2 = [sys.executable, "-m", "exl2.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXL2, *args], capture_output=True, text=True, timeout=120)


@dataclass
class Folder:
    """A model folder and the layers written into it."""

    path: Path
    layers: dict

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Folder:
    d = tmp_path_factory.mktemp("model")
    g = torch.Generator().manual_seed(0)
    shard1, shard2 = {}, {}
    layers = {}
    for i, (n, k, bias) in enumerate([(96, 128, True), (45, 64, False), (64, 96, False)]):
        key = f"model.layers.{i}.mlp.up_proj"
        qm = quantize(torch.randn(n, k, generator=g), QParams(32, [5, 3], [0.5, 0.5]),
                      bias=torch.randn(n, generator=g) if bias else None)
        layers[key] = qm
        (shard1 if i < 2 else shard2).update(qm.to_tensors(key))
    shard1["model.embed_tokens.weight"] = torch.randn(10, 128, generator=g).half()
    shard2["model.norm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    save_tensors(d / "output-00001-of-00002.safetensors", shard1)
    save_tensors(d / "output-00002-of-00002.safetensors", shard2)
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl2", "bits": 4.0}}))
    return Folder(d, layers)


def test_inspect_json(model_dir):
    r = run("inspect", str(model_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    keys = [layer["key"] for layer in info["layers"]]
    assert sorted(keys) == sorted(model_dir.layers)
    for layer in info["layers"]:
        qm = model_dir.layers[layer["key"]]
        # without a bias the file does not say how many columns are padding
        out = qm.out_features if qm.bias is not None else qm.out_features_padded
        assert (layer["in_features"], layer["out_features"]) == (qm.in_features, out)
        assert layer["bpw"] == pytest.approx(qm.storage_bits() / (qm.in_features * out))
    assert info["summary"]["other_tensors"] == 2
    assert info["summary"]["quantization_config"]["quant_method"] == "exl2"


def test_inspect_table(model_dir):
    r = run("inspect", str(model_dir))
    assert r.returncode == 0 and "model.layers.1.mlp.up_proj" in r.stdout and "bpw" in r.stdout


def test_dequantize_writes_linear_weights(model_dir, tmp_path):
    out = tmp_path / "deq.safetensors"
    r = run("dequantize", str(model_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = load_file(out)
    for key, qm in model_dir.layers.items():
        w = got[key + ".weight"]
        assert w.dtype == torch.float16 and w.shape == (qm.out_features_padded, qm.in_features)
        assert torch.equal(w, dequantize(qm).T)
        assert (key + ".q_weight") not in got
    assert torch.equal(got["model.layers.0.mlp.up_proj.bias"], model_dir.layers["model.layers.0.mlp.up_proj"].bias)
    assert got["model.norm.weight"].dtype == torch.bfloat16
    assert os.listdir(tmp_path) == ["deq.safetensors"]


def corrupt(model_dir: Path, tmp_path: Path, how: str) -> Path:
    src = model_dir / "output-00001-of-00002.safetensors"
    if how == "missing":
        return tmp_path / "nope"
    if how == "not-safetensors":
        p = tmp_path / "model.bin"
        p.write_bytes(b"x" * 100)
        return p
    if how == "garbage":
        p = tmp_path / "g.safetensors"
        p.write_bytes(os.urandom(64))
        return p
    if how == "truncated":
        p = tmp_path / "t.safetensors"
        p.write_bytes(src.read_bytes()[:-100])
        return p
    t = load_file(src)
    if how == "missing-scale":
        del t["model.layers.0.mlp.up_proj.q_scale"]
    elif how == "bad-groups":
        t["model.layers.0.mlp.up_proj.q_groups"][0] = 3  # a 3-bit group before 5-bit ones
    p = tmp_path / "bad.safetensors"
    save_tensors(p, t)
    return p


@pytest.mark.parametrize("how, names", [
    ("missing", ["nope"]),
    ("not-safetensors", ["model.bin"]),
    ("garbage", ["g.safetensors"]),
    ("truncated", ["t.safetensors"]),
    ("missing-scale", ["bad.safetensors", "model.layers.0.mlp.up_proj.q_scale"]),
    ("bad-groups", ["bad.safetensors", "model.layers.0.mlp.up_proj.q_groups"]),
])
def test_bad_input_is_one_line_and_leaves_nothing(model_dir, tmp_path, how, names):
    src = corrupt(model_dir, tmp_path, how)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = sorted(os.listdir(tmp_path))
    for verb in (["dequantize", str(src), "-o", str(outdir / "x.safetensors")], ["inspect", str(src)]):
        r = run(*verb)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout
        assert all(n in lines[0] for n in names), lines[0]
    assert os.listdir(outdir) == [] and sorted(os.listdir(tmp_path)) == before
