"""The exported test vectors: deterministic, complete, and right by independent decoders."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from exl2.conformance.findings import CATALOGUE
from exl2.conformance.rules import check_layer
from exl2.conformance.validate import validate_path
from exl2.conformance.vectors import export
from exl2.errors import ContainerError

from . import exllamav2_emulation as ex


@pytest.fixture(scope="module")
def vectors(exl2_vectors) -> Path:
    """The vectors, exported once per session by the fixture of exl2's own pytest plugin."""
    return exl2_vectors


@pytest.fixture(scope="module")
def manifest(vectors) -> dict:
    return json.loads((vectors / "manifest.json").read_text())


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def spec_decode(t: dict[str, np.ndarray]) -> np.ndarray:
    """The dequantized matrix, written from spec 5 and 6 alone in numpy: each group's q_weight
    rows read as one little-endian bit string per column, ``scale = half((c + 1)^2 * half(max / 256))``,
    ``value = half((q - 2^(b-1)) * scale)``, row ``j`` of B = stored row ``q_invperm[j]``."""
    qw = t["layer.q_weight"].view(np.uint32).astype(np.uint64)
    pairs = t["layer.q_groups"].astype(np.int64).reshape(-1, 2)
    n_qrows, n = qw.shape
    group_max = (t["layer.q_scale_max"].astype(np.float32) / 256).astype(np.float16)
    nibbles = (t["layer.q_scale"].view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    scales = (((nibbles.reshape(len(pairs), n) + 1) ** 2).astype(np.float32)
              * group_max[:, None].astype(np.float32)).astype(np.float16)
    stored = []
    for i, (bits, q0) in enumerate(pairs):
        q1 = pairs[i + 1][1] if i + 1 < len(pairs) else n_qrows
        words = np.vstack([qw[q0:q1], np.zeros((1, n), np.uint64)])  # a zero word past the end
        offset = np.arange((q1 - q0) * 32 // bits) * bits
        w, s = offset // 32, (offset % 32).astype(np.uint64)[:, None]
        string = words[w] | (words[w + 1] << np.uint64(32))  # 64 bits from the code's first word on
        q = ((string >> s) & np.uint64((1 << bits) - 1)).astype(np.float32)
        stored.append(((q - (1 << (bits - 1))) * scales[i].astype(np.float32)).astype(np.float16))
    return np.concatenate(stored)[t["layer.q_invperm"].astype(np.int64)]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int16), b.view(np.int16))


def test_export_is_byte_identical(vectors, tmp_path):
    """A second export, through the command line in another process, over an earlier (edited)
    export: replaced, and the same bytes."""
    again = tmp_path / "again"
    shutil.copytree(vectors, again)
    (again / "positive" / "width-4.safetensors").write_bytes(b"edited")
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "export", str(again)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digests(vectors) == digests(again)


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ContainerError, match="not an earlier vector export"):
        export(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_manifest_lists_every_file_with_its_digest(vectors, manifest):
    assert manifest["schema_version"] == 1 and (vectors / "README.md").is_file()
    listed = set()
    for v in manifest["vectors"]:
        sha = v["sha256"] if isinstance(v["sha256"], dict) else {"": v["sha256"]}
        for name, digest in sha.items():
            f = vectors / v["file"] / name if name else vectors / v["file"]
            assert hashlib.sha256(f.read_bytes()).hexdigest() == digest
            listed.add(str(f.relative_to(vectors)))
    assert listed == set(digests(vectors)) - {"manifest.json", "README.md"}
    assert sum(p.stat().st_size for p in vectors.rglob("*") if p.is_file()) < 20e6


def test_vectors_cover_every_code_and_feature(manifest):
    codes = {v["code"] for v in manifest["vectors"] if v["kind"] != "positive"}
    assert codes == set(CATALOGUE) - {"EXL2-C009"}  # an I/O failure cannot be stored in a file
    features = {f for v in manifest["vectors"] for f in v["features"]}
    assert {"width-8", "width-6", "width-5", "width-4", "width-3", "width-2", "mixed-widths", "groups-of-16",
            "padding", "short-last-group", "subnormal", "16-bit-limits", "bias", "q-perm"} <= features
    ms = {v["layer"]["m"] for v in manifest["vectors"] if v["kind"] == "positive"}
    assert min(ms) == 1 and max(ms) == 64


def test_positive_layers_have_the_features_they_claim(vectors, manifest):
    for v in manifest["vectors"]:
        if v["kind"] != "positive":
            continue
        t = load_file(vectors / v["file"])
        bits = t["layer.q_groups"][0::2].tolist()
        k, n = t["layer.q_invperm"].size, t["layer.q_weight"].shape[1]
        rows = []
        for i, (b, q0) in enumerate(t["layer.q_groups"].reshape(-1, 2).tolist()):
            q1 = int(t["layer.q_groups"][2 * i + 3]) if 2 * i + 3 < t["layer.q_groups"].size else t["layer.q_weight"].shape[0]
            rows.append((q1 - q0) * 32 // b)
        errors = {f.code for f in check_layer({k_: torch.from_numpy(a) for k_, a in t.items()}, "layer")
                  if f.severity == "error"}
        assert not errors, (v["name"], errors)
        out = v["layer"]["out_features"]
        assert t["expected"].shape == (k, n) and t["x"].shape == (v["layer"]["m"], k) and t["y"].shape[1] == out
        f = set(v["features"])
        for b in (8, 6, 5, 4, 3, 2):
            assert (f"width-{b}" in f) <= (b in bits)
        assert ("mixed-widths" in f) <= (len(set(bits)) == 6)
        assert ("groups-of-16" in f) <= (16 in rows)
        assert ("short-last-group" in f) <= (rows[-1] < rows[0])
        assert ("padding" in f) <= (out % 32 != 0 and "layer.bias" in t)
        assert ("subnormal" in f) <= bool((t["layer.q_scale_max"].astype(np.float32) < 2**-6).all())
        assert ("q-perm" in f) <= ("layer.q_perm" in t)
        assert ("16-bit-limits" in f) <= (k == 65536 and (max(rows) > 30000 or len(rows) == 4096))


def test_expected_weights_match_independent_decoders(vectors, manifest):
    """Every positive vector against a decoder written from the spec; the small ones also against
    the transliteration of exllamav2's loading and reconstruct kernel."""
    for v in manifest["vectors"]:
        if v["kind"] != "positive":
            continue
        t = load_file(vectors / v["file"])
        assert same_bits(spec_decode(t), t["expected"]), v["name"]
        if v["layer"]["in_features"] * v["layer"]["out_features_padded"] <= 40000:
            w = ex.load_weight({k: a for k, a in t.items() if k.startswith("layer.")}, "layer")
            assert same_bits(ex.reconstruct(ex.make_q_matrix(w)), t["expected"]), v["name"]


def test_y_is_the_exact_product_rounded(vectors, manifest):
    """``y`` is the exact ``x @ B + bias`` rounded to float64 then float32: checked with rational
    arithmetic on a sample of elements of every vector."""
    for v in manifest["vectors"]:
        if v["kind"] != "positive":
            continue
        t = load_file(vectors / v["file"])
        x, b, y = t["x"], t["expected"], t["y"]
        bias = t.get("layer.bias")
        rng = np.random.default_rng(0)
        for _ in range(3 if x.shape[1] <= 4096 else 1):
            i, j = int(rng.integers(y.shape[0])), int(rng.integers(y.shape[1]))
            exact = sum((Fraction(float(a)) * Fraction(float(c)) for a, c in zip(x[i], b[:, j])), Fraction(0))
            if bias is not None:
                exact += Fraction(float(bias[j]))
            assert y[i, j] == np.float32(float(exact)), (v["name"], i, j)
        assert not math.isnan(float(y.sum()))


def test_each_negative_triggers_its_code(vectors, manifest):
    for v in manifest["vectors"]:
        if v["kind"] == "negative":
            t = {k: torch.from_numpy(a) for k, a in load_file(vectors / v["file"]).items()}
            found = {f.code for f in check_layer(t, "layer") if f.severity == "error" or f.code == v["code"]}
            assert v["code"] in found, (v["name"], found)
            assert found == {v["code"]} or v["code"] == "EXL2-G004", (v["name"], found)
        elif v["kind"] == "negative-folder":
            found = {f.code for f in validate_path(vectors / v["file"], deep=True, run=v["validate"] == "run").findings}
            assert v["code"] in found, (v["name"], found)
