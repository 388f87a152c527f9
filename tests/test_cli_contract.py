"""The exit-status contract of the ``exl2`` command, one test per row of the table in
docs/validating.md ("Exit status"), and the CLI cases of issue 12's hostile-input campaign: every
hostile header through validate, inspect and dequantize, file strings printed as text (never
markup), ``--json`` with names no encoding can print, bad output paths, absurd option values, a
missing optional extra. Bad input: one printable line on stderr naming the file (and tensor),
no traceback, nothing left at the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import exl2
from exl2.cli import app
from exl2.conformance.fuzz import LAYER, seed_folder
from exl2.conformance.hostile import raw_headers, renamed
from exl2.io import save_tensors

EXL2 = [sys.executable, "-m", "exl2.cli"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, status: int, *names: str) -> str:
    """Assert exit ``status`` with exactly one printable ``exl2: error:`` line naming ``names``."""
    assert result.exit_code == status, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exl2: error: ") and lines[0].isprintable(), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("contract") / "model"
    seed_folder(folder)
    return folder


@pytest.fixture
def model(base, tmp_path) -> Path:
    """A fresh copy of the valid model folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def out_of(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d / "dense.safetensors"


# -- status 0 -------------------------------------------------------------------------------------


def test_row_valid_input_exits_0(model, tmp_path):
    for args in (["validate", model], ["validate", model, "--deep"], ["inspect", model], ["inspect", model, "--json"],
                 ["dequantize", model, "-o", out_of(tmp_path)]):
        r = invoke(*args)
        assert r.exit_code == 0 and r.stderr == "", (args, r.output)


# -- status 1: the input breaks a rule of the format ----------------------------------------------


def weights(folder: Path) -> Path:
    return folder / "output.safetensors"


@pytest.mark.parametrize("label", ["duplicate name", "extra entry key", "nesting 200k deep", "integer of 5000 digits",
                                   "NaN offset", "encoded surrogate", "huge shape product", "header is a list",
                                   "invalid UTF-8", "byte-order mark", "trailing garbage"])
def test_row_header_breaks_a_rule_exits_1_everywhere(model, tmp_path, label):
    """Every hostile header of issue 12: exit 1 in every verb, one line with the finding code."""
    w = weights(model)
    w.write_bytes(raw_headers(w.read_bytes(), LAYER + ".q_scale")[label])
    out = out_of(tmp_path)
    for args in (["inspect", model], ["inspect", model, "--json"], ["dequantize", model, "-o", out]):
        line = one_line(invoke(*args), 1, "output.safetensors")
        assert "[EXL2-C00" in line
    assert os.listdir(out.parent) == []
    r = invoke("validate", model, "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert {f["code"] for f in report["findings"]} & {"EXL2-C002", "EXL2-C003", "EXL2-C004"}


def test_header_of_empty_objects_exits_1_everywhere(model, tmp_path):
    from exl2.conformance.hostile import empty_objects_header

    weights(model).write_bytes(empty_objects_header(2_000_000))
    for args in (["inspect", model], ["dequantize", model, "-o", out_of(tmp_path)]):
        one_line(invoke(*args), 1, "EXL2-C003")
    r = invoke("validate", model, "--json")
    assert r.exit_code == 1 and len(json.loads(r.stdout)["findings"]) < 110


@pytest.mark.parametrize("name,code", [("model.norm.weight\x00", "EXL2-C003"), ("model.norm\x1b[31m", "EXL2-C003"),
                                       ("model.norm\ud800", "EXL2-C002"), ("x\ny", "EXL2-C003")])
def test_row_bad_tensor_name_exits_1_and_is_printed_escaped(model, tmp_path, name, code):
    w = weights(model)
    w.write_bytes(renamed(w.read_bytes(), "model.norm.weight", name))
    for args in (["inspect", model], ["dequantize", model, "-o", out_of(tmp_path)]):
        line = one_line(invoke(*args), 1, code)
        assert "\x1b" not in line and "\x00" not in line
    for args in (["validate", model], ["validate", model, "--json"]):
        r = invoke(*args)
        assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
        assert "\x1b" not in r.stdout and "\x00" not in r.stdout


def test_very_long_name_gives_a_short_line(model, tmp_path):
    w = weights(model)
    w.write_bytes(renamed(w.read_bytes(), "model.norm.weight", "n" * 50_000 + "\x00"))
    line = one_line(invoke("inspect", model), 1, "EXL2-C003", "characters)")
    assert len(line) < 1500


def test_row_tensor_in_two_shards_exits_1(model, tmp_path):
    save_tensors(model / "output-extra.safetensors", {"model.norm.weight": torch.ones(128, dtype=torch.float16)})
    one_line(invoke("inspect", model), 1, "model.norm.weight", "EXL2-C006")
    one_line(invoke("dequantize", model, "-o", out_of(tmp_path)), 1, "EXL2-C006")
    assert invoke("validate", model).exit_code == 1


def test_row_config_not_an_object_exits_1(model):
    (model / "config.json").write_text("[1, 2, 3]")
    one_line(invoke("inspect", model), 1, "config.json", "EXL2-K001")
    assert invoke("validate", model).exit_code == 1


def layer_without(folder: Path, name: str | None = None, reshape: tuple[int, ...] | None = None) -> None:
    from safetensors.torch import load_file

    tensors = load_file(weights(folder))
    key = f"{LAYER}.{name}"
    if reshape is None:
        del tensors[key]
    else:
        tensors[key] = tensors[key].reshape(reshape)
    save_tensors(weights(folder), tensors)


@pytest.mark.parametrize("change,tensor,code", [
    (("q_invperm", None), "q_invperm", "EXL2-T001"),
    (("q_weight", None), "q_weight", "EXL2-T001"),  # the fuzzer's case: a layer known by its other tensors
    (("q_scale", None), "q_scale", "EXL2-T001"),
    (("q_weight", (-1,)), "q_weight", "EXL2-T003"),
    (("q_weight", (1, 14, 96)), "q_weight", "EXL2-T003"),
])
def test_row_layer_breaks_a_rule_exits_1(model, tmp_path, change, tensor, code):
    """Issue 12: a missing q_invperm or a 1-D/3-D q_weight exited 2 in dequantize; it breaks a
    rule of spec 3.1, so 1, in every verb."""
    layer_without(model, *change)
    for args in (["inspect", model], ["dequantize", model, "-o", out_of(tmp_path)]):
        one_line(invoke(*args), 1, f"{LAYER}.{tensor}", "output.safetensors")
    assert os.listdir(out_of(tmp_path).parent) == []
    r = invoke("validate", model, "--json")
    assert r.exit_code == 1 and code in {f["code"] for f in json.loads(r.stdout)["findings"]}


# -- status 2: cannot be read, or misuse ----------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "not safetensors", "empty folder"])
def test_row_nothing_to_read_exits_2(tmp_path, how):
    path = tmp_path / "m"
    if how == "not safetensors":
        path = tmp_path / "m.bin"
        path.write_bytes(b"x")
    elif how == "empty folder":
        path.mkdir()
    for args in (["validate", path], ["inspect", path], ["dequantize", path, "-o", out_of(tmp_path)]):
        one_line(invoke(*args), 2, path.name)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_row_special_file_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    for args in (["validate", fifo], ["inspect", fifo], ["dequantize", fifo, "-o", out_of(tmp_path)]):
        one_line(invoke(*args), 2, "pipe.safetensors", "not a regular file")


def test_row_unreadable_file_exits_2(model, tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    import exl2.header

    monkeypatch.setattr(exl2.header, "open", denied, raising=False)
    one_line(invoke("inspect", model), 2, "output.safetensors", "Permission denied")
    one_line(invoke("dequantize", model, "-o", out_of(tmp_path)), 2, "Permission denied")
    r = invoke("validate", model, "--json")  # the validator reports it as a finding and goes on
    assert r.exit_code == 1 and "EXL2-C009" in {f["code"] for f in json.loads(r.stdout)["findings"]}


def test_row_output_is_an_existing_folder_exits_2(model, tmp_path):
    out = tmp_path / "existing.safetensors"
    out.mkdir()
    (out / "keep").write_bytes(b"k")
    one_line(invoke("dequantize", model, "-o", out), 2, "existing.safetensors", "is a folder")
    assert os.listdir(out) == ["keep"]


def test_row_output_under_a_regular_file_exits_2(model, tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    one_line(invoke("dequantize", model, "-o", tmp_path / "plain" / "d.safetensors"), 2, "plain is not a folder")
    assert sorted(os.listdir(tmp_path)) == ["model", "plain"]


def test_row_output_unwritable_exits_2(model, tmp_path, monkeypatch):
    import exl2.io

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(exl2.io.tempfile, "mkstemp", denied)
    out = out_of(tmp_path)
    one_line(invoke("dequantize", model, "-o", out), 2, "dense.safetensors", "Permission denied")
    assert os.listdir(out.parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_row_output_in_a_read_only_folder_exits_2(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line(invoke("dequantize", model, "-o", ro / "d.safetensors"), 2, "Permission denied")
    finally:
        ro.chmod(0o700)


def test_row_output_not_safetensors_exits_2(model, tmp_path):
    one_line(invoke("dequantize", model, "-o", tmp_path / "dense.bin"), 2, "dense.bin")


def test_row_unknown_backend_exits_2(model, tmp_path):
    one_line(invoke("dequantize", model, "-o", out_of(tmp_path), "--backend", "bogus"), 2, "bogus")


def test_row_fast_backend_without_triton_says_how_to_install(model, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "exl2.fast"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError, as when not installed
    monkeypatch.delattr(exl2, "fast", raising=False)
    line = one_line(invoke("dequantize", model, "-o", out_of(tmp_path), "--backend", "fast"), 2)
    assert "pip install 'exl2[fast]'" in line and "--backend reference" in line


@pytest.mark.parametrize("args", [
    ["--vram", "1" + "0" * 400 + "GB"], ["--vram", "1e30"], ["--vram", "99999999999999999999TB"], ["--vram", "-1GB"],
    ["--vram", "nan"], ["--vram", "24GB", "--context", "1" + "0" * 30], ["--vram", "24GB", "--overhead", "1" * 25],
    ["--vram", "24GB", "--cache-bits", "3"], ["--vram", "24GB", "--head-bits", "7"],
])
def test_row_absurd_option_values_exit_2(args):
    """Issue 12: fit --vram 1e30 (and other absurd numbers) ended in an internal error."""
    r = subprocess.run([*EXL2, "fit", "--model", "llama-2-7b", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exl2: error: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("value", ["true", '"4096"', "1e400", "-5", "0", "[4096]", "1" + "0" * 40, "null"])
def test_row_fit_config_with_a_wrong_field_exits_2(tmp_path, value):
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "vocab_size": 32000}
    text = json.dumps(cfg).replace("4096", value, 1)
    (tmp_path / "config.json").write_text(text)
    one_line(invoke("fit", "--model", tmp_path, "--vram", "24GB"), 2, "config.json", "hidden_size")


@pytest.mark.parametrize("args", [["fit"], ["bogus-verb"], ["dequantize"], ["validate", "--bogus"],
                                  ["fit", "--model", "llama-2-7b", "--vram", "24GB", "--context", "x"]])
def test_row_argument_errors_exit_2_on_one_line(args):
    r = subprocess.run([*EXL2, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exl2: error: ") and "--help" in lines[0], r.stderr


def test_row_validate_without_path_exits_2():
    one_line(invoke("validate"), 2, "missing PATH")


def test_row_request_that_cannot_be_carried_out_exits_2(model, tmp_path):
    """A tensor KEY.weight stored beside the quantized layer KEY: its dequantized weight would
    have the same name. Not a rule of the format: dequantize cannot do what was asked."""
    from safetensors.torch import load_file

    tensors = load_file(weights(model))
    tensors[LAYER + ".weight"] = torch.zeros(2, dtype=torch.float16)
    save_tensors(weights(model), tensors)
    one_line(invoke("dequantize", model, "-o", out_of(tmp_path)), 2, LAYER + ".weight")


def test_row_quantize_target_out_of_range_exits_2(tmp_path):
    """Issue 12: a bpw outside the range is misuse, but exited 1 (a plain Exl2Error is now 2)."""
    one_line(invoke("quantize", tmp_path / "no-source", "-o", tmp_path / "q", "-b", "9"), 2, "outside 2.0..8.5")
    assert not (tmp_path / "q").exists()


def test_row_no_layer_to_dequantize_exits_2(tmp_path):
    save_tensors(tmp_path / "plain.safetensors", {"w": torch.zeros(2)})
    one_line(invoke("dequantize", tmp_path / "plain.safetensors", "-o", out_of(tmp_path)), 2, "no EXL2 layer")


# -- status 1 outside "a rule broken": fit and conformance run -------------------------------------


def test_row_fit_does_not_fit_exits_1():
    r = invoke("fit", "--model", "llama-2-70b", "--vram", "1GB")
    assert r.exit_code == 1 and "does not fit" in r.stdout


# -- status 3 and 130 -----------------------------------------------------------------------------


def test_row_bug_exits_3_on_one_line(model, monkeypatch):
    """An exception that is not an Exl2Error is a bug: one "internal error (please report)" line,
    exit 3, no traceback (the validator no longer turns it into a finding)."""
    import exl2.conformance.rules as rules

    def bug(*a, **k):
        raise KeyError("simulated bug")

    monkeypatch.setattr(rules._LayerCheck, "run", bug)
    code = ("import sys; sys.argv = ['exl2', 'validate', sys.argv[1]];"
            "import exl2.conformance.rules as r; r._LayerCheck.run = lambda self: {}['simulated bug'];"
            "from exl2.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert lines == ["exl2: internal error (please report): KeyError: 'simulated bug'"], r.stderr


def test_closed_stdout_is_not_an_internal_error(model):
    r = subprocess.run(f"{sys.executable} -m exl2.cli validate {model} --json | head -c 10", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr


# -- strings from files are text ------------------------------------------------------------------


def test_markup_in_config_is_printed_as_text(model):
    """Issue 12: quantization_config.version = "[/]" crashed inspect (rich markup error)."""
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"]["version"] = "[/]"
    cfg["quantization_config"]["dataset"] = "[bold red]x[/bold red] \x1b[2J"
    (model / "config.json").write_text(json.dumps(cfg))
    r = invoke("inspect", model)
    assert r.exit_code == 0, r.output
    assert '"version": "[/]"' in r.stdout and "[bold red]x[/bold red]" in r.stdout and "\x1b" not in r.stdout
    assert invoke("validate", model).exception is None


def test_markup_in_names_and_paths_is_printed_as_text(base, tmp_path):
    folder = tmp_path / "[red]folder"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    w = weights(folder)
    w.write_bytes(renamed(w.read_bytes(), "model.norm.weight", "[/]"))
    w.rename(folder / "[bold]x.safetensors")
    for args in (["inspect", folder], ["validate", folder]):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    unwrapped = lambda text: "".join(text.split())  # noqa: E731  tables wrap long paths
    assert "[red]folder" in unwrapped(invoke("inspect", folder).stdout)
    assert "[bold]x.safetensors" in unwrapped(invoke("validate", folder).stdout)  # its C008 finding names it


def test_json_output_escapes_names_no_encoding_can_print(base, tmp_path):
    """Issue 12: validate --json raised UnicodeEncodeError on a lone surrogate. A folder whose name
    is not UTF-8 (a lone surrogate once decoded) gives escaped, valid JSON that round-trips."""
    folder = tmp_path / os.fsdecode(b"bad\xff")
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    for verb in ("validate", "inspect"):
        r = invoke(verb, folder, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["path"] == str(folder)
        assert r.stdout.isascii()
    r = invoke("validate", folder)
    assert r.exit_code == 0 and "bad\\udcff" in r.stdout
    r = subprocess.run([*EXL2, "validate", os.fsencode(folder)], capture_output=True, timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr


def test_deep_config_is_shown_as_a_note_not_an_error(model):
    """Nesting that JSON parsing allows is legal (validate finds nothing): inspect must not fail,
    nor exhaust the stack printing it."""
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"]["notes"] = json.loads("[" * 900 + "]" * 900)  # a key readers ignore
    (model / "config.json").write_text(json.dumps(cfg))
    assert invoke("validate", model).exit_code == 0
    for args in (["inspect", model], ["inspect", model, "--json"]):
        r = invoke(*args)
        assert r.exit_code == 0 and "nested deeper than 64 levels" in r.stdout, r.output


def test_json_output_is_strict_json_when_the_config_holds_nan(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"]["calibration"]["rows"] = float("nan")
    (model / "config.json").write_text(json.dumps(cfg))
    r = invoke("inspect", model, "--json")
    assert r.exit_code == 0
    parsed = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert parsed["summary"]["quantization_config"]["calibration"]["rows"] is None
