"""The conformance harness: the reference passes, broken backends fail exactly the features they
break, backends are found by name, and the CLI and the pytest plugin report it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from exl2.cli import app
from exl2.conformance.harness import Backend, checked_load, load_backend, run
from exl2.errors import ContainerError
from exl2.reference import dequantize, dequantize_stored, matmul
from exl2.reference.packing import unpack_codes, unpack_scales


@pytest.fixture(scope="module")
def vectors(exl2_vectors) -> Path:
    """The vectors, exported once per session by the fixture of exl2's own pytest plugin."""
    return exl2_vectors


@pytest.fixture(scope="module")
def positive_features(vectors) -> dict[str, set[str]]:
    """Feature -> names of the positive vectors covering it."""
    out: dict[str, set[str]] = {}
    for v in json.loads((vectors / "manifest.json").read_text())["vectors"]:
        if v["kind"] == "positive":
            for f in v["features"]:
                out.setdefault(f, set()).add(v["name"])
    return out


def failing(results) -> set[str]:
    return {name for name, r in results.items() if r.failed}


def test_reference_passes_everything(vectors, positive_features):
    results = run(load_backend("reference"), vectors, examples=8)
    assert not failing(results)
    assert set(positive_features) | {"matmul", "loader", "validator: folders", "random: dequantize",
                                     "random: matmul", "random: loader"} == set(results)
    assert results["random: dequantize"].passed == 8 and results["matmul"].passed == 16


def test_ignoring_the_permutation_fails_every_permuted_feature(vectors, positive_features):
    results = run(Backend("no-perm", dequantize_stored), vectors, examples=3)
    assert failing(results) == set(positive_features) - {"identity-permutation"} | {"random: dequantize"}
    assert results["identity-permutation"].passed == 1
    assert "validator" in results and "loader" not in results  # no load(): negatives go to exl2's validator


def test_flushing_subnormals_fails_only_the_subnormal_feature(vectors):
    """Decoded values are subnormal only when q_scale_max < 2^-6 (|q - z| >= 1, (c+1)^2 >= 1), which
    only the subnormal vector has."""
    def flush(qm):
        b = dequantize(qm)
        return torch.where(b.abs() < 2.0**-14, torch.zeros_like(b), b)

    assert failing(run(Backend("ftz", flush), vectors, examples=0)) == {"subnormal"}


def test_scales_computed_in_float32_fail(vectors):
    """A decoder that skips the float16 rounding of the scale (spec 6.2) is not bit-exact."""
    def float32_scales(qm):
        s = (unpack_scales(qm.q_scale) + 1).square().float() * (qm.q_scale_max.float() / 256)[:, None]
        out = torch.empty(qm.in_features, qm.out_features_padded, dtype=torch.float16)
        perm = qm.q_perm.long()
        for g in qm.groups:
            c = unpack_codes(qm.q_weight[g.qrow:g.qrow + g.qrows], g.bits)[:g.rows] - (1 << (g.bits - 1))
            out[perm[g.row:g.row + g.rows]] = (c.float() * s[g.index]).half()
        return out

    bad = failing(run(Backend("f32-scales", float32_scales), vectors, examples=0))
    assert {"width-4", "mixed-widths", "subnormal"} <= bad and "validator: folders" not in bad


def test_dropping_padded_columns_fails_the_padding_features(vectors):
    bad = failing(run(Backend("unpadded", lambda qm: dequantize(qm)[:, : qm.out_features]), vectors, examples=0))
    assert bad == {"padding", "bias"}


def test_matmul_without_bias_fails_matmul_only(vectors):
    def no_bias(x, qm):
        return (x.float() @ dequantize(qm)[:, : qm.out_features].float()).to(x.dtype)

    results = run(Backend("no-bias", dequantize, no_bias), vectors, examples=0)
    assert failing(results) == {"matmul"}
    assert results["matmul"].failed == 2  # the two vectors with a bias


def test_a_loader_that_accepts_everything_fails(vectors):
    results = run(Backend("lax", dequantize, matmul, lambda t, p: None), vectors, examples=4)
    assert failing(results) == {"loader", "random: loader"}
    assert results["loader"].passed == 16  # the positives load; every broken layer is accepted


def test_checked_load_refuses_what_the_validator_refuses(vectors):
    from safetensors.torch import load_file

    with pytest.raises(Exception, match="EXL2-S001"):
        checked_load(load_file(vectors / "negative/exl2-s001-q-scale-max-nan.safetensors"), "layer")
    qm = checked_load(load_file(vectors / "positive/width-4.safetensors"), "layer")
    assert qm.in_features == 128


def test_backends_by_name(tmp_path, monkeypatch):
    assert load_backend("exl2.reference:dequantize").dequantize is dequantize
    assert load_backend("exl2.reference:dequantize").matmul is None
    assert load_backend("exl2.reference").matmul is matmul
    (tmp_path / "my_kernels.py").write_text(textwrap.dedent("""
        from exl2.reference import dequantize as _d, matmul as _m

        class Impl:
            DEVICE = "cpu"
            def dequantize(self, qm):
                return _d(qm)
            def matmul(self, x, qm):
                return _m(x, qm)
            def load(self, tensors, prefix):
                raise ValueError("refuses everything")

        BACKEND = Impl()
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    b = load_backend("my_kernels:BACKEND")
    assert b.matmul is not None and b.load is not None and b.device == "cpu"
    for bad in ("no_such_module_xyz", "exl2.reference:nope", "json", "my_kernels:NOT_CALLABLE"):
        with pytest.raises(ContainerError):
            load_backend(bad)
    with pytest.raises(ContainerError, match="device"):
        load_backend("reference", device="no-such-device")


def test_cli_exit_codes(vectors):
    runner = CliRunner()
    ok = runner.invoke(app, ["conformance", "run", "--vectors", str(vectors), "--examples", "2"])
    assert ok.exit_code == 0 and "PASS" in ok.stdout, ok.stdout
    bad = runner.invoke(app, ["conformance", "run", "--backend", "exl2.reference:dequantize_stored",
                              "--vectors", str(vectors), "--examples", "0"])
    assert bad.exit_code == 1 and "FAIL" in bad.stdout and "width-4" in bad.stdout
    missing = runner.invoke(app, ["conformance", "run", "--vectors", str(vectors / "positive")])
    assert missing.exit_code == 2
    err = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "run", "--backend", "nope_mod"],
                         capture_output=True, text=True)
    assert err.returncode == 2 and len(err.stderr.strip().splitlines()) == 1 and "nope_mod" in err.stderr


def test_edited_vectors_cannot_run(vectors, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(vectors, copy)
    f = copy / "positive" / "width-3.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ContainerError, match="sha256"):
        run(load_backend("reference"), copy, examples=0)


@pytest.mark.parametrize("opt_in", ["-p", "conftest"])
def test_pytest_plugin_in_a_users_project(tmp_path, vectors, opt_in):
    """A project opts in with ``-p exl2.conformance.pytest_plugin`` or ``pytest_plugins`` in its
    conftest.py (docs/porting.md); plugin autoloading is off here, so nothing else loads it."""
    (tmp_path / "test_mine.py").write_text(
        "from exl2.conformance.pytest_plugin import conformance_test\n"
        "test_good = conformance_test('exl2.reference', examples=2)\n"
        "test_bad = conformance_test('exl2.reference:dequantize_stored', examples=0)\n"
        "test_unnamed = conformance_test()\n")
    args = ["-p", "exl2.conformance.pytest_plugin"] if opt_in == "-p" else []
    if opt_in == "conftest":
        (tmp_path / "conftest.py").write_text('pytest_plugins = ["exl2.conformance.pytest_plugin"]\n')
    env = {k: v for k, v in os.environ.items()} | {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "--exl2-vectors",
                        str(vectors), "test_mine.py"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "1 failed, 1 passed, 1 skipped" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert "exl2.reference:dequantize_stored fails EXL2 conformance" in r.stdout


def test_pytest_plugin_needs_an_opt_in(tmp_path):
    """Without ``-p`` or ``pytest_plugins`` (and no autoloading) its options do not exist."""
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    env = {k: v for k, v in os.environ.items()} | {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--exl2-examples", "3",
                        "test_x.py"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode != 0 and "unrecognized arguments: --exl2-examples" in r.stderr, r.stdout + r.stderr


def test_plugin_module_imports_nothing_heavy_of_its_own():
    """Importing the plugin (as pytest does in every run) must not pull in the harness, the
    vectors or hypothesis; only exl2's package __init__ files run."""
    code = ("import sys, exl2.conformance.pytest_plugin as p; "
            "print(sorted(m for m in ('hypothesis', 'exl2.conformance.harness', 'exl2.conformance.vectors', "
            "'exl2.conformance.strategies', 'safetensors.torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
