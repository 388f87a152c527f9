"""exl2 fit: known points, monotonicity, exact accounting against a real model, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exl2 import QParams
from exl2.model.options import head_option
from exl2.model.fit import GIB, budget, largest_bpw, load, parse_size, quantized_numel
from exl2.reference import quantize


def test_70b_on_24gb_at_short_context():
    # exllamav2's README: Llama-2 70B runs on one 24 GB GPU with a 2048-token context at 2.55 bpw
    m = load("llama-2-70b")
    assert budget(m, 2.55, context=2048, cache_bits=16).total <= 24 * GIB
    assert budget(m, 2.55, context=2048, cache_bits=4).total <= 24 * GIB
    assert 2.55 <= largest_bpw(m, 24 * GIB, context=2048, cache_bits=16) <= 3.0


def test_13b_on_8gb_at_short_context():
    # README: 13B models run at 2.65 bpw within 8 GB (2048 tokens, float16 cache). That quant leaves
    # room: its weights are 3.9 GiB of the 8, so the largest that fits is higher, but not wildly.
    m = load("llama-2-13b")
    assert budget(m, 2.65, context=2048, cache_bits=16).total <= 8 * GIB
    assert 2.65 <= largest_bpw(m, 8 * GIB, context=2048, cache_bits=16) <= 3.6
    assert 2.0 <= largest_bpw(m, 8 * GIB, context=4096, cache_bits=16) <= 2.65


def test_answer_falls_with_context_and_rises_with_cache_quantization():
    m = load("llama-3-8b")
    answers = [largest_bpw(m, 7 * GIB, context=c) for c in (1024, 8192, 16384)]
    assert answers[0] > answers[1] > answers[2]
    assert largest_bpw(m, 7 * GIB, context=16384, cache_bits=4) > answers[2]
    assert largest_bpw(m, 1 * GIB, context=2048) is None


def test_accounting_matches_a_real_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    m = load(str(_write(tmp_path, cfg)))
    sd = model.state_dict()
    linears = {k: v for k, v in sd.items() if k.endswith("_proj.weight")}
    assert quantized_numel(m) == sum(v.shape[1] * (-(-v.shape[0] // 32) * 32) for v in linears.values())
    floats = sum(v.numel() for k, v in sd.items() if k not in linears and k != "lm_head.weight" and "rotary" not in k)
    b = budget(m, 4.0, head_bits=6)
    assert b.unquantized == 2 * floats
    head = quantize(sd["lm_head.weight"], head_option(6))
    assert b.head == head.storage_bits() // 8
    # weights at the bpw a real quantization achieves: stored bits of the layers / their weights
    qp = QParams(32, [4], [1.0])
    stored = sum(quantize(v, qp).storage_bits() for v in linears.values())
    achieved = stored / quantized_numel(m)
    assert budget(m, achieved).weights == stored // 8


def _write(tmp_path, cfg):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p


def test_cache_by_hand():
    m = load("llama-2-70b")  # 80 layers, 8 kv heads of 128
    per_token = 2 * 80 * 8 * 128  # K and V values
    assert budget(m, 4.0, context=4096, cache_bits=16).cache == per_token * 4096 * 2
    # 4-bit codes, a float16 scale per 32 values, one layer of float16 K and V to dequantize into
    assert budget(m, 4.0, context=4096, cache_bits=4).cache == per_token * 4096 * (4 / 8 + 2 / 32) + 2 * 8 * 128 * 4096 * 2


def test_overhead_option_moves_the_answer():
    base = ["--model", "llama-2-13b", "--vram", "8GB", "--context", "2048", "--json"]
    answers = []
    for extra in ([], ["--overhead", "1.5GB"]):
        r = subprocess.run([sys.executable, "-m", "exl2.cli", "fit", *base, *extra], capture_output=True, text=True)
        answers.append(json.loads(r.stdout)["bpw"])
    # 1 GiB more overhead (default 0.5) costs 1 GiB of weights: bpw falls by 2^33 bits / quantized weights
    drop = 1.0 * GIB * 8 / quantized_numel(load("llama-2-13b"))
    assert answers[1] == pytest.approx(answers[0] - drop, abs=0.011)


def test_sizes():
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24g") == 24 * GIB
    assert parse_size("24000MB") == 24000 * 2**20
    with pytest.raises(Exception):
        parse_size("lots")


@pytest.mark.parametrize("args", [["--model", "missing.json", "--vram", "8GB"], ["--model", "llama-2-7b", "--vram", "x"],
                                  ["--model", "llama-2-7b", "--vram", "8GB", "--cache-bits", "3"]])
def test_bad_input_one_line(args):
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "fit", *args], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_non_llama_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "fit", "--model", str(p), "--vram", "8GB"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "llama" in r.stderr  # not an EXL2 rule broken: input fit cannot use


def test_json_output():
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "fit", "--model", "llama-2-70b", "--vram", "24GB", "--context",
                        "2048", "--json"], capture_output=True, text=True)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["bpw"] >= 2.55 and any(row["fits"] for row in out["table"])
