"""config.json (spec 2.1): strict types in quantization_config (EXL2-K003), rope parameters that
exllamav2 would misread (EXL2-K006), and hostile JSON at every field: findings, never an exception."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from exl2 import QParams
from exl2.conformance.config import check_quantization_config, check_rope
from exl2.conformance.validate import validate_path
from exl2.io import save_tensors
from exl2.reference import quantize

VALID = {"quant_method": "exl2", "version": "0.2.7", "bits": 4.125, "head_bits": 6,
         "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}}


def with_field(path: tuple[str, ...], value) -> dict:
    qc = json.loads(json.dumps(VALID))
    d = qc
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return qc


def test_valid_config_and_integer_bits_pass():
    findings, qc = check_quantization_config({"quantization_config": VALID}, "c")
    assert findings == [] and (qc.bits, qc.head_bits, qc.calibration.rows) == (4.125, 6, 100)
    findings, qc = check_quantization_config({"quantization_config": with_field(("bits",), 4)}, "c")
    assert findings == [] and qc.bits == 4.0  # a JSON integer is a JSON number


DEEP = [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]
HOSTILE = [None, True, False, "4.125", "", "[/]", "\ud800", 4.5, -1, 0, 10**300, float("inf"), float("nan"), [],
           [4], {}, {"a": 1}, DEEP]
def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


#: What each field legally holds (spec 2.1), written out independently of the pydantic model.
FIELDS = {
    ("quant_method",): lambda v: v == "exl2" and isinstance(v, str),
    ("version",): lambda v: v is None or isinstance(v, str),
    ("bits",): lambda v: number(v) and 0 < v <= 16,
    ("head_bits",): lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v in (2, 3, 4, 5, 6, 8)),
    ("calibration",): lambda v: v is None or isinstance(v, dict),
    ("calibration", "rows"): lambda v: v is None or positive_int(v),
    ("calibration", "length"): lambda v: v is None or positive_int(v),
    ("calibration", "dataset"): lambda v: v is None or isinstance(v, str),
}


@pytest.mark.parametrize("path", list(FIELDS), ids=".".join)
def test_every_field_takes_only_its_json_type(path):
    """Every hostile value at every field: K003 exactly when the value is not legal there; no
    exception, one short line per finding."""
    for value in HOSTILE:
        findings, parsed = check_quantization_config({"quantization_config": with_field(path, value)}, "cfg.json")
        legal = FIELDS[path](value)
        assert (findings == []) == legal, (path, value, [f.message for f in findings])
        assert all(f.code == "EXL2-K003" and "\n" not in f.message and len(f.message) <= 300 for f in findings)
        assert (parsed is None) == (not legal)


@pytest.mark.parametrize("qc, field", [
    ({"bits": "4.125"}, "bits"), ({"bits": True}, "bits"), ({"head_bits": 6.0}, "head_bits"),
    ({"head_bits": 7}, "head_bits"), ({"head_bits": True}, "head_bits"),
    ({"calibration": {"rows": "100"}}, "calibration.rows"), ({"calibration": {"rows": 100.0}}, "calibration.rows"),
    ({"calibration": {"length": 0}}, "calibration.length"), ({"version": 2}, "version"),
])
def test_issue_examples_are_k003_naming_the_field(qc, field):
    findings, _ = check_quantization_config({"quantization_config": {**VALID, **qc}}, "cfg.json")
    assert [f.code for f in findings] == ["EXL2-K003"]
    assert findings[0].message.startswith(f"quantization_config.{field}:")


@pytest.mark.parametrize("qc", [[], "exl2", 5, True, [VALID]])
def test_quantization_config_not_an_object(qc):
    findings, parsed = check_quantization_config({"quantization_config": qc}, "cfg.json")
    assert [f.code for f in findings] == ["EXL2-K003"] and parsed is None


# -- rope parameters (K006) -----------------------------------------------------------------------


@pytest.mark.parametrize("config, warnings", [
    ({}, 0),
    ({"rope_theta": 500000.0}, 0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, 1),  # transformers 5 alone
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000}}, 0),  # exllamav2's default: same
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_theta": 5e5}, 0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_theta": 1e6}, 1),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "text_config": {"rope_theta": 5e5}}, 0),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "rope_theta": 5e5}, 1),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "rope_theta": 5e5,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 0),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}}, 2),
    ({"text_config": {"rope_parameters": {"rope_theta": 1e6}}}, 1),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}, 1),
])
def test_rope_parameters_exllamav2_would_misread(config, warnings):
    found = check_rope(config, "cfg.json")
    assert len(found) == warnings, [f.message for f in found]
    assert all(f.code == "EXL2-K006" and f.severity == "warning" for f in found)


@pytest.mark.parametrize("value", HOSTILE)
def test_rope_checks_never_raise(value):
    for config in ({"rope_parameters": value}, {"rope_theta": value}, {"rope_scaling": value},
                   {"rope_parameters": {"rope_theta": value, "rope_type": value}}, {"text_config": value},
                   {"text_config": {"rope_parameters": value}}, {"rope_parameters": {"x": {"rope_theta": value}}}):
        for f in check_rope(config, "cfg.json"):
            assert f.code == "EXL2-K006" and "\n" not in f.message and len(f.message) < 300
            assert "\ud800" not in f.message  # values are quoted escaped


# -- whole folders: hostile config.json never crashes the validator ------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    qm = quantize(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), QParams(32, [4], [1.0]))
    save_tensors(folder / "output.safetensors", qm.to_tensors("model.layers.0.mlp.down_proj"))
    return (folder / "output.safetensors").read_bytes()


@pytest.mark.parametrize("text, code", [
    ("[" * 200_000 + "]" * 200_000, "EXL2-K001"),  # nested 200k deep
    ('{"hidden_size": ' + "9" * 5000 + "}", "EXL2-K001"),  # beyond Python's int conversion limit
    ('{"quantization_config": ' + "[" * 100_000 + "]" * 100_000 + "}", "EXL2-K001"),
    ('{"quantization_config": {"quant_method": "exl2", "bits": 1e999}}', "EXL2-K003"),
    ('{"quantization_config": {"quant_method": "exl2", "bits": NaN}}', "EXL2-K003"),
    ('{"quantization_config": {"quant_method": "exl2", "bits": 4, "version": "\\ud800"}, "hidden_size": "64"}', None),
    ('{"quantization_config": {"quant_method": "exl2", "bits": 4, "calibration": {"rows": ' + "9" * 4000 + "}}}", None),
    ('{"rope_parameters": {"rope_theta": ' + "9" * 4000 + "}}", "EXL2-K006"),
    ('{"hidden_size": true, "num_attention_heads": [], "intermediate_size": {}}', None),
])
def test_hostile_config_json_gives_findings(tmp_path, weights, text, code):
    (tmp_path / "output.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_text(text)
    limit = sys.getrecursionlimit()
    r = validate_path(tmp_path)
    assert sys.getrecursionlimit() == limit
    got = {f.code for f in r.findings} - {"EXL2-K002", "EXL2-K005"}
    assert got == ({code} if code else set()), [(f.code, f.message) for f in r.findings]
    assert "C009" not in " ".join(f.code for f in r.findings)
