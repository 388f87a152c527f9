"""exl2 eval, exl2 generate and exl2 validate --run from the command line, bad input through the CLI
(one line on stderr, exit 1 or 2 as README defines), and the running benchmarks' smoke modes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime_models import exl2_model, float_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "exl2.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_the_continuation():
    r = cli("generate", exl2_model("llama"), "Hello", "-n", "5", "--dtype", "float32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Hello") and "5 tokens in" in r.stderr


def test_eval_against_the_source_json():
    r = cli("eval", exl2_model("qwen2"), "--source", float_model("qwen2"), "--json", "--length", "64",
            "--max-windows", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["kind"] == "causal-lm" and report["windows"] == 2 and report["tokens"] == 2 * 63
    assert report["kl_mean"] >= 0 and report["kl_max"] >= report["kl_mean"] and 0 <= report["top1_agreement"] <= 1
    assert report["perplexity"] > 1 and report["source_perplexity"] > 1
    assert r.stderr.count("eval: step") == 2  # one log line per step without a terminal
    schema = json.loads(cli("eval", "--json-schema").stdout)
    assert set(report) == set(schema["properties"])


def test_eval_without_a_source_and_with_a_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g h i j k l m n o p\n" * 4)
    r = cli("eval", exl2_model("llama"), "--text", text, "--length", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "perplexity" in r.stdout and "KL" not in r.stdout


def _gptq_folder(d: Path) -> Path:
    import torch

    from exl2.io import save_tensors

    d.mkdir()
    save_tensors(d / "model.safetensors", {"model.layers.0.mlp.down_proj.qweight": torch.zeros(8, 64, dtype=torch.int32)})
    cfg = json.loads((float_model("llama") / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case, code", [("missing", 2), ("gptq", 1), ("unknown-architecture", 2), ("no-config", 2)])
def test_bad_input_one_line_and_exit_code(tmp_path, case, code):
    if case == "missing":
        d = tmp_path / "nope"
    elif case == "gptq":
        d = _gptq_folder(tmp_path / "gptq")
    else:
        d = Path(shutil.copytree(exl2_model("llama"), tmp_path / "m"))
        if case == "no-config":
            (d / "config.json").unlink()
        else:
            cfg = json.loads((d / "config.json").read_text())
            cfg["architectures"] = ["<b>NotAModel</b>ForCausalLM"]
            (d / "config.json").write_text(json.dumps(cfg))
    for verb in (["generate", d, "hi"], ["eval", d]):
        r = cli(*verb)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (verb, r.stderr[-2000:])
        assert str(d) in lines[0]


def test_validate_run_reports_a_model_that_overflows(tmp_path):
    from exl2.conformance.vectors import write_folder_negative

    write_folder_negative(tmp_path / "r001", "EXL2-R001")
    r = cli("validate", tmp_path / "r001", "--run", "--json")
    assert r.returncode == 1, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["run"] and [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["EXL2-R001"]
    # without --run the same folder is valid
    assert cli("validate", tmp_path / "r001").returncode == 0
    # and a sound model passes the forward pass
    assert cli("validate", exl2_model("llama"), "--run").returncode == 0


def test_gpu_generate_cpu_smoke(tmp_path):
    out = tmp_path / "gen.md"
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_generate.py"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "| exl2.load (Exl2Linear) |" in text and "| float16 (nn.Linear) |" in text and "ratio exl2 / float16" in text


def test_running_benchmark_smoke(tmp_path):
    out = tmp_path / "running.json"
    r = subprocess.run([sys.executable, str(BENCHMARKS / "running.py"), "--smoke", "--out", str(out),
                        "--new-tokens", "2"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["generate"]["reference_tokens_per_second"] > 0 and result["generate"]["decoded_cache_tokens_per_second"] > 0
    assert result["load"]["peak_rss_increase_bytes"] > 0
