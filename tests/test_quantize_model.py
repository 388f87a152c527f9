"""exl2 quantize on a small llama built from a config, and on the shipped MiniLM example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exl2.conformance import validate_path
from exl2.io import open_model
from exl2.model import pipeline
from exl2.model.pipeline import Settings, quantize_model
from exl2.qparams import QParams

from .tiny_models import small_options, write_model

LLAMA_NAMES = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}
OPTS = small_options()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("llama") / "src")


def run(src, out, bpw, **kw):
    return quantize_model(Settings(src=str(src), out=out, bpw=bpw, rows=4, length=32, options=OPTS, **kw))


def test_llama_names_budget_and_validation(llama, tmp_path):
    results = {}
    for bpw in (3.5, 6.0):
        out = tmp_path / f"q{bpw}"
        summary = run(llama, out, bpw)
        results[bpw] = summary
        assert summary["bpw"] <= bpw
        model = open_model(out)
        keys = set(model.layer_keys())
        expected = {f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_NAMES} | {"lm_head"}
        assert keys == expected
        assert "model.embed_tokens.weight" in model and "model.norm.weight" in model
        report = validate_path(out, deep=True)
        assert report.ok, [f for f in report.findings if f.severity == "error"]
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "exl2" and qc["bits"] == bpw and qc["head_bits"] == 6
        assert (out / "tokenizer.json").is_file() and not (out.parent / (out.name + ".partial")).exists()
    assert results[3.5]["bpw"] < results[6.0]["bpw"]


def test_resume_after_interruption_gives_the_same_bytes(llama, tmp_path, monkeypatch):
    run(llama, tmp_path / "full", 4.0)
    calls = {"n": 0}
    real = pipeline.Job.save_layer

    def crash_after_five(self, key, qm):
        real(self, key, qm)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.Job, "save_layer", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(llama, tmp_path / "resumed", 4.0)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial").is_dir()
    monkeypatch.setattr(pipeline.Job, "save_layer", real)
    run(llama, tmp_path / "resumed", 4.0)
    a, b = (tmp_path / "full" / "output.safetensors").read_bytes(), (tmp_path / "resumed" / "output.safetensors").read_bytes()
    assert a == b


def test_measurement_reuse_skips_measuring(llama, tmp_path, monkeypatch):
    run(llama, tmp_path / "a", 4.0)

    def no_measuring(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(pipeline, "_output_error", no_measuring)
    summary = run(llama, tmp_path / "b", 5.0, measurement=tmp_path / "a" / "measurement.json")
    assert summary["bpw"] <= 5.0


def test_sharding(llama, tmp_path):
    run(llama, tmp_path / "s", 4.0, shard_bytes=60_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"output-00001-of-{len(shards):05}.safetensors"
    assert validate_path(tmp_path / "s").ok


def cli(*args):
    return subprocess.run([sys.executable, "-m", "exl2.cli", "quantize", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["missing", "unsupported", "out-of-reach", "exists"])
def test_bad_input_fails_fast_with_one_line(llama, tmp_path, case):
    src, out, bpw = str(llama), str(tmp_path / "out"), "4.0"
    if case == "missing":
        src = str(tmp_path / "nope")
    elif case == "unsupported":
        d = tmp_path / "weird"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["Nothing"], "model_type": "nothing"}))
        (d / "model.safetensors").write_bytes(b"")
        src = str(d)
    elif case == "out-of-reach":
        bpw = "2.0"
    else:
        (tmp_path / "out").mkdir()
    r = cli(src, "-o", out, "-b", bpw)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    if case == "out-of-reach":
        assert "reach" in lines[0]


@pytest.mark.slow
def test_minilm_example_quality(tmp_path):
    from exl2.model.evaluate import compare

    options = (QParams(32, [4], [1.0]), QParams(32, [6], [1.0]), QParams(128, [8], [1.0]))  # kept small for CI
    summary = quantize_model(Settings(src="example:minilm", out=tmp_path / "m", bpw=5.0, rows=4, length=64,
                                      options=options))
    assert validate_path(tmp_path / "m").ok
    r = compare("example:minilm", tmp_path / "m")
    assert summary["bpw"] <= 5.0 and r["cosine_mean"] > 0.95


def test_measurement_errors_on_the_first_error_rows_hessians_on_all(llama, tmp_path, monkeypatch):
    seen = {"errors": set(), "hessians": set()}
    real_error, real_moments = pipeline._output_error, pipeline.calibration.group_moments

    def output_error(block, inputs, reference):
        seen["errors"].add((len(inputs.args), len(reference.args)))
        return real_error(block, inputs, reference)

    def group_moments(block, module, inputs):
        seen["hessians"].add(len(inputs.args))
        return real_moments(block, module, inputs)
    monkeypatch.setattr(pipeline, "_output_error", output_error)
    monkeypatch.setattr(pipeline.calibration, "group_moments", group_moments)
    run(llama, tmp_path / "q", 4.0, error_rows=3)
    assert seen == {"errors": {(3, 3)}, "hessians": {4}}


def test_error_rows_below_one_is_refused(llama, tmp_path):
    from exl2.errors import UsageError
    with pytest.raises(UsageError, match="--error-rows"):
        run(llama, tmp_path / "q", 4.0, error_rows=0)
    assert not (tmp_path / "q").exists()
