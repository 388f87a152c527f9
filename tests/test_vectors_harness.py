"""Test vectors (deterministic, independently checked) and the harness."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from exl2.conformance.findings import CATALOGUE
from exl2.conformance.harness import Backend, load_backend, run
from exl2.errors import ContainerError
from exl2.reference import dequantize

from . import exllamav2_emulation as ex


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("v") / "vectors"
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "export", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_is_byte_identical(vectors, tmp_path):
    from exl2.conformance.vectors import export

    export(tmp_path / "again")
    assert digest(vectors) == digest(tmp_path / "again")


def test_manifest_covers_every_code_and_feature(vectors):
    m = json.loads((vectors / "manifest.json").read_text())
    codes = {v["code"] for v in m["vectors"] if v["kind"].startswith("negative")}
    assert codes == set(CATALOGUE) - {"EXL2-C009"}  # an I/O failure cannot be stored in a file
    features = {f for v in m["vectors"] for f in v["features"]}
    assert {"width-8", "width-6", "width-5", "width-4", "width-3", "width-2", "mixed-widths", "groups-of-16",
            "padding", "short-last-group", "subnormal", "16-bit-limits", "bias", "q-perm"} <= features
    for v in m["vectors"]:
        if v["kind"] == "positive":
            assert hashlib.sha256((vectors / v["file"]).read_bytes()).hexdigest() == v["sha256"]


def test_positive_expectations_match_the_exllamav2_transliteration(vectors):
    m = json.loads((vectors / "manifest.json").read_text())
    for v in m["vectors"]:
        if v["kind"] != "positive" or v["layer"]["in_features"] > 1024:
            continue  # the scalar transliteration is slow; the big vector is covered by the reference
        t = load_file(vectors / v["file"])
        theirs = ex.reconstruct({k.removeprefix("layer."): t[k].numpy() for k in t if k.startswith("layer.")})
        assert np.array_equal(theirs.view(np.int16), t["expected"].numpy().view(np.int16)), v["name"]
        y = t["x"].double() @ t["expected"][:, : v["layer"]["out_features"]].double()
        if "layer.bias" in t:
            y = y + t["layer.bias"].double()
        assert torch.equal(y.float(), t["y"])


def test_reference_passes_everything(vectors):
    results = run(load_backend("reference"), vectors, examples=5)
    assert all(r.failed == 0 for r in results.values())
    assert results["random-layers"].passed == 5


def test_broken_backends_fail_the_right_features(vectors):
    def no_perm(qm):
        from exl2.reference import dequantize_stored
        return dequantize_stored(qm)

    def flush_subnormals(qm):
        b = dequantize(qm)
        return torch.where(b.abs() < 2.0**-14, torch.zeros_like(b), b)

    r = run(Backend("no-perm", no_perm), vectors, examples=3)
    assert r["width-4"].failed and r["random-layers"].failed
    r = run(Backend("ftz", flush_subnormals), vectors, examples=0)
    assert r["subnormal"].failed and not r["negative:EXL2-G001"].failed


def test_module_function_backends_and_errors():
    assert load_backend("exl2.reference:dequantize").dequantize is dequantize
    assert load_backend("exl2.reference").matmul is not None
    for bad in ("no_such_module_xyz", "exl2.reference:nope", "json"):
        with pytest.raises(ContainerError):
            load_backend(bad)


def test_cli_run_exit_codes(vectors):
    ok = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "run", "--vectors", str(vectors),
                         "--examples", "3"], capture_output=True, text=True)
    assert ok.returncode == 0 and "PASS" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "run", "--backend", "exl2.reference:dequantize_stored",
                          "--vectors", str(vectors), "--examples", "0"], capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    err = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "run", "--backend", "nope_mod"],
                         capture_output=True, text=True)
    assert err.returncode == 2 and len(err.stderr.strip().splitlines()) == 1


def test_pytest_plugin_in_a_users_project(tmp_path):
    (tmp_path / "test_mine.py").write_text(
        "from exl2.conformance.pytest_plugin import conformance_test\n"
        "test_good = conformance_test('exl2.reference', examples=2)\n"
        "test_bad = conformance_test('exl2.reference:dequantize_stored', examples=0)\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_mine.py")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert "1 failed, 1 passed" in r.stdout, r.stdout[-2000:]
