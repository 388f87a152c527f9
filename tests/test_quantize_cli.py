"""``exl2 quantize`` on hostile input: one line on stderr, exit 1 (the source breaks a rule) or 2
(something cannot be read or written, or the settings cannot work), no traceback, no "internal
error", and nothing written: neither OUT nor OUT.partial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from exl2.cli import app

from .tiny_models import write_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("llama") / "src")


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def quantize(*args: str):
    return CliRunner().invoke(app, ["quantize", *args])


def assert_clean_failure(r, out: Path, code: int, *names: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.output, r.stderr)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("exl2: error:")]
    assert len(errors) == 1 and "Traceback" not in r.output and "internal error" not in r.output, r.stderr
    assert all(n in errors[0] for n in names), errors[0]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def hostile_config(tmp_path: Path, llama: Path, how: str) -> Path:
    src = copy_model(llama, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    text = {
        "a JSON list": lambda: json.dumps([cfg]),
        "a JSON string": lambda: json.dumps("LlamaForCausalLM"),
        "architectures a string": lambda: json.dumps(cfg | {"architectures": "LlamaForCausalLM"}),
        "architectures of numbers": lambda: json.dumps(cfg | {"architectures": [1, 2]}),
        "num_hidden_layers a string": lambda: json.dumps(cfg | {"num_hidden_layers": "2"}),
        "num_hidden_layers huge": lambda: json.dumps(cfg | {"num_hidden_layers": 10 ** 30}),
        "nested 100k deep": lambda: "[" * 100_000 + "]" * 100_000,
        "a 5000-digit integer": lambda: json.dumps(cfg)[:-1] + ', "x": ' + "9" * 5000 + "}",
        "not UTF-8": lambda: None,
        "hidden_size a list": lambda: json.dumps(cfg | {"hidden_size": [64]}),
    }[how]()
    if text is None:
        (src / "config.json").write_bytes(b"\xff\xfe{" + json.dumps(cfg).encode()[1:])
    else:
        (src / "config.json").write_text(text)
    return src


@pytest.mark.parametrize("how", ["a JSON list", "a JSON string", "architectures a string", "architectures of numbers",
                                 "num_hidden_layers a string", "num_hidden_layers huge", "nested 100k deep",
                                 "a 5000-digit integer", "not UTF-8", "hidden_size a list"])
def test_hostile_config_json(tmp_path, llama, how):
    src = hostile_config(tmp_path, llama, how)
    out = tmp_path / "out"
    assert_clean_failure(quantize(str(src), "-o", str(out), "-b", "4.0"), out, 2, str(src))


@pytest.mark.parametrize("args, names", [
    (["--device", "bogus"], ["bogus"]),
    (["--device", "tpu"], ["tpu"]),
    (["--device", "cuda:99"], ["cuda:99"]),
    (["-b", "9.5"], ["9.5"]),
    (["-b", "nan"], ["nan"]),
    (["--head-bits", "7"], ["--head-bits"]),
    (["--loader", "bogus"], ["--loader"]),
    (["--rows", "100000", "--length", "100000"], ["calibration tokens"]),
])
def test_settings_that_cannot_work_exit_2(tmp_path, llama, args, names):
    out = tmp_path / "out"
    assert_clean_failure(quantize(str(llama), "-o", str(out), "-b", "4.0", *args), out, 2, *names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(tmp_path, llama):
    out = tmp_path / "out"
    assert_clean_failure(quantize(str(llama), "-o", str(out), "-b", "4.0", "--device", "cuda"), out, 2, "CUDA")


@pytest.mark.parametrize("content, names", [
    (b"\xff\xfe\x00bad bytes \x80\x81", ["not UTF-8"]),
    (b"ab", ["too short"]),
])
def test_calibration_file_that_cannot_be_used(tmp_path, llama, content, names):
    cal = tmp_path / "cal.txt"
    cal.write_bytes(content)
    out = tmp_path / "out"
    r = quantize(str(llama), "-o", str(out), "-b", "4.0", "--calibration", str(cal))
    assert_clean_failure(r, out, 2, str(cal), *names)


def measurement_file(tmp_path: Path, how: str) -> Path:
    m = tmp_path / "measurement.json"
    m.write_text({
        "a JSON list": "[]",
        "not JSON": "{",
        "layers a list": json.dumps({"options": [], "layers": []}),
        "other options": json.dumps({"options": ["x"], "layers": {}}),
    }.get(how, "{}"))
    return m


@pytest.mark.parametrize("how", ["a JSON list", "not JSON", "layers a list", "other options"])
def test_measurement_of_the_wrong_shape(tmp_path, llama, how):
    m = measurement_file(tmp_path, how)
    out = tmp_path / "out"
    assert_clean_failure(quantize(str(llama), "-o", str(out), "-b", "4.0", "--measurement", str(m)), out, 2, str(m))


@pytest.mark.parametrize("how", ["errors strings", "errors NaN", "errors short", "shape other", "layer missing",
                                 "layer a number"])
def test_measurement_of_another_model_or_with_wrong_types(tmp_path, llama, how):
    from exl2.model.options import OPTIONS

    m = {"options": [o.desc() for o in OPTIONS], "layers": {}}
    keys = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    shapes = {"q_proj": [64, 64], "k_proj": [64, 32], "v_proj": [64, 32], "o_proj": [64, 64], "gate_proj": [64, 128],
              "up_proj": [64, 128], "down_proj": [128, 64]}
    for k in keys:
        m["layers"][k] = {"shape": shapes[k.rsplit(".", 1)[1]], "costs": [1] * len(OPTIONS),
                          "errors": [0.5] * len(OPTIONS)}
    first = m["layers"][keys[0]]
    if how == "errors strings":
        first["errors"] = ["0.5"] * len(OPTIONS)
    elif how == "errors NaN":
        first["errors"][3] = float("nan")
    elif how == "errors short":
        first["errors"] = first["errors"][:3]
    elif how == "shape other":
        first["shape"] = [64, 96]
    elif how == "layer missing":
        del m["layers"][keys[-1]]
    else:
        m["layers"][keys[0]] = 7
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    out = tmp_path / "out"
    assert_clean_failure(quantize(str(llama), "-o", str(out), "-b", "4.0", "--measurement", str(path)), out, 2,
                         str(path))


def test_output_under_a_regular_file(tmp_path, llama):
    f = tmp_path / "file"
    f.write_text("x")
    out = f / "sub" / "out"
    r = quantize(str(llama), "-o", str(out), "-b", "4.0")
    assert r.exit_code == 2 and "internal error" not in r.output, r.stderr
    assert f.read_text() == "x"


def test_rows_that_no_option_fits_are_refused_before_any_work(tmp_path):
    """intermediate_size 344: down_proj's 344 rows end in a 24-row group under every option."""
    src = write_model(tmp_path / "src", intermediate_size=344)
    out = tmp_path / "out"
    assert_clean_failure(quantize(str(src), "-o", str(out), "-b", "4.0"), out, 1, "mlp.down_proj", "344", "spec 4.4")


def test_source_weights_with_nan_are_named(tmp_path):
    src = write_model(tmp_path / "src")
    from exl2.io import open_model, save_tensors

    f = next(src.glob("*.safetensors"))
    m = open_model(f)
    tensors = {n: m[n].clone() for n in m}
    del m
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_tensors(f, tensors)
    out = tmp_path / "out"
    cal = tmp_path / "cal.txt"
    cal.write_text("the quick brown fox jumps over the lazy dog " * 20)
    r = quantize(str(src), "-o", str(out), "-b", "4.0", "--calibration", str(cal), "--rows", "1", "--length", "16")
    assert r.exit_code == 2, r.stderr
    assert "internal error" not in r.output and "model.layers.0" in r.stderr
    assert not out.exists()


def test_aim_sweeps_and_weigh_are_checked(tmp_path):
    out = tmp_path / "out"
    r = quantize("example:minilm", "-o", str(out), "-b", "4.0", "--aim", "sideways")
    assert r.exit_code == 2 and "--aim must be float or plain" in r.stderr and "Traceback" not in r.output
    r = quantize("example:minilm", "-o", str(out), "-b", "4.0", "--sweeps", "-1")
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = quantize("example:minilm", "-o", str(out), "-b", "4.0", "--weigh", "<b>all</b>")
    assert r.exit_code == 2 and "--weigh must be output or block, not '<b>all</b>'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()
    r = quantize("example:minilm", "-o", str(out), "-b", "4.0", "--activations", "[red]swap[/red]")
    assert r.exit_code == 2 and "--activations must be auto, device, cpu or disk, not '[red]swap[/red]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()
