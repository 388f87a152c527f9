"""exl2.load and transformers' from_pretrained on tiny llama / qwen2 models quantized with
``exl2 quantize``, and on a folder in exllamav2's own layout."""

from __future__ import annotations

import json

import pytest
import torch

import exl2
from exl2.conformance import validate_path
from exl2.io import save_tensors
from exl2.nn import Exl2Linear
from exl2.reference.bounds import MATMUL_REL
from tests.runtime_models import (DIMS, dequantized_float_model, dtype_kw, exl2_model, exllamav2_folder, float_model,
                                  minilm_exl2)

KINDS = ["llama", "llama-tied", "qwen2"]
IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 60, 21]])


def compounded_bound(reference: torch.Tensor) -> float:
    """Spec 8.2.1 allows each linear a relative error of MATMUL_REL (float32) of its output's
    magnitude; along a block's path there are four linears in sequence (q/k/v, o, gate/up, down)
    and the head at the end, and each layer's error can grow by at most that factor again."""
    depth = 4 * DIMS["num_hidden_layers"] + 1
    return depth * MATMUL_REL[torch.float32] * float(reference.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_the_float_model_with_dequantized_weights(kind, dtype):
    import transformers

    src, folder = float_model(kind), exl2_model(kind)
    model = exl2.load(folder, dtype=dtype)
    assert sum(isinstance(m, Exl2Linear) for m in model.modules()) == 7 * DIMS["num_hidden_layers"] + 1
    assert model.model.embed_tokens.weight.dtype == dtype
    reference = dequantized_float_model(src, folder)
    with torch.no_grad():
        y, y_ref = model(IDS).logits.float(), reference(IDS).logits
        y_float = transformers.AutoModelForCausalLM.from_pretrained(src, **dtype_kw(torch.float32))(IDS).logits
    assert (y - y_ref).abs().max() <= compounded_bound(y_ref)
    # not vacuous: the float model's logits (before quantization) lie outside that agreement
    assert (y_float - y_ref).abs().max() > 4 * (y - y_ref).abs().max() + 1e-3


def test_rope_scaling_and_gqa_reach_the_model():
    model = exl2.load(exl2_model("llama"))
    cfg = model.config
    scaling = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
    assert scaling.get("factor") == 2.0 and scaling.get("rope_type", scaling.get("type")) == "linear"
    attn = model.model.layers[0].self_attn
    assert (attn.k_proj.out_features, attn.q_proj.out_features) == (32, 64)


def test_tied_embeddings_with_and_without_a_stored_head(tmp_path):
    tied = exl2.load(exl2_model("llama-tied"))
    assert isinstance(tied.lm_head, Exl2Linear)  # exl2 quantize stores the head of a tied model on its own
    folder = exllamav2_folder(tmp_path / "no-head", float_model("llama-tied"), quantize_head=False)
    model = exl2.load(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_returns_the_model_of_exl2_load(kind):
    import transformers

    import exl2.hf  # noqa: F401

    folder = exl2_model(kind)
    a = exl2.load(folder)
    b = transformers.AutoModelForCausalLM.from_pretrained(folder, **dtype_kw(torch.float16))
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(IDS), pad_token_id=0)
    out_a, out_b = a.generate(IDS, **kw), b.generate(IDS, **kw)
    assert out_a.shape == (1, IDS.shape[1] + 4) and torch.equal(out_a, out_b)


def test_state_dict_round_trip(tmp_path):
    folder = exl2_model("qwen2")
    model = exl2.load(folder)
    out = tmp_path / "again"
    out.mkdir()
    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:  # a tied tensor once
            seen.add(t.data_ptr())
            tensors[name] = t
    save_tensors(out / "output.safetensors", tensors)
    (out / "config.json").write_text((folder / "config.json").read_text())
    assert validate_path(out).ok
    again = exl2.load(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)


def test_decoded_cache_gives_the_reference_values_and_decodes_once(monkeypatch):
    import exl2.reference as reference

    folder = exl2_model("llama")
    plain, cached = exl2.load(folder), exl2.load(folder, decoded_cache=True)
    calls = []
    real = reference.dequantize
    monkeypatch.setattr(reference, "dequantize", lambda qm: calls.append(1) or real(qm))
    with torch.no_grad():
        y = cached(IDS).logits
        y2 = cached(IDS[:, :5]).logits
    assert len(calls) == 7 * DIMS["num_hidden_layers"] + 1  # once per layer, not per call
    monkeypatch.setattr(reference, "dequantize", real)
    with torch.no_grad():
        assert torch.equal(y, plain(IDS).logits) and torch.equal(y2, plain(IDS[:, :5]).logits)


def test_exllamav2_layout_loads_and_runs(tmp_path):
    import transformers

    import exl2.hf

    src = float_model("llama")
    folder = exllamav2_folder(tmp_path / "exllamav2", src)
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("output-*.safetensors"))) == 2
    model = exl2.load(folder, dtype=torch.float32)
    reference = dequantized_float_model(src, folder)
    with torch.no_grad():
        y, y_ref = model(IDS).logits, reference(IDS).logits
    assert (y - y_ref).abs().max() <= compounded_bound(y_ref)
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(IDS), pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 3)
    # no quantization_config: from_pretrained says how, and reads it given the method
    with pytest.raises(exl2.FormatError, match="quantization_config"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    b = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=exl2.hf.Exl2Config(),
                                                          **dtype_kw(torch.float32))
    with torch.no_grad():
        assert torch.equal(b(IDS).logits, y)


def test_import_exl2_stays_light():
    import subprocess
    import sys

    code = "import sys, exl2; print('transformers' in sys.modules, callable(exl2.load))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "True"], r.stderr[-2000:]


# -- bad input: one error naming the file (and tensor), never a half-built model ------------------

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_tensor(d, name, edit):
    """Rewrite the file of ``d`` that holds ``name``, with ``edit(tensors)`` applied."""
    from exl2.io import open_model

    for f in sorted(d.glob("*.safetensors")):
        m = open_model(f)
        if name in m:
            t = {n: m[n].clone() for n in m}
            del m
            edit(t)
            save_tensors(f, t)


def _broken_layer(d):
    key = "model.layers.1.mlp.down_proj.q_groups"
    _edit_tensor(d, key, lambda t: t[key].index_fill_(0, torch.tensor([0]), 7))


def _config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


BAD = {
    "broken-layer": (_broken_layer, exl2.FormatError, "EXL2-G001"),
    "missing-shard": (lambda d: (d / "output-00002-of-00002.safetensors").unlink(), exl2.FormatError, "EXL2-C010"),
    "unknown-architecture": (lambda d: _config(d, lambda c: c.update(architectures=["NoSuchForCausalLM"])),
                             exl2.ContainerError, "NoSuchForCausalLM"),
    "other-method": (lambda d: _config(d, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4})),
                     exl2.FormatError, "EXL2-K003"),
    "missing-tensor": (lambda d: _strip(d, "model.norm.weight"), exl2.FormatError, "model.norm.weight"),
    "integer-norm": (lambda d: _edit_tensor(d, "model.norm.weight", lambda t: t.update({
        "model.norm.weight": t["model.norm.weight"].to(torch.int16)})), exl2.FormatError, "model.norm.weight"),
}


def _strip(d, name):
    _edit_tensor(d, name, lambda t: t.pop(name))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_are_refused_with_one_line(case, tmp_path):
    make, error, text = BAD[case]
    if case == "missing-shard":
        d = exllamav2_folder(tmp_path / "m", float_model("llama"))
        _config(d, lambda c: c.update(quantization_config={"quant_method": "exl2", "bits": 4.5}))
    else:
        d = _copy(exl2_model("llama"), tmp_path / "m")
    make(d)
    with pytest.raises(error) as e:
        exl2.load(d)
    line = str(e.value)
    assert text in line and "\n" not in line and str(d) in line


@pytest.mark.slow
def test_minilm_from_pretrained_gives_the_embeddings_quantizing_md_measures():
    """AutoModel.from_pretrained on MiniLM at 4.0 bpw: its sentence embeddings are those whose cosine
    docs/quantizing.md reports (exl2.model.evaluate.compare, which puts the decoded weights into the
    float model), to float16 rounding of the stored embeddings and norms."""
    import transformers

    import exl2.hf  # noqa: F401
    from exl2.model import arch
    from exl2.model.evaluate import compare, default_sentences, sentence_embeddings

    folder = minilm_exl2(4.0)
    reported = compare("example:minilm", folder)["cosine_mean"]
    src = arch.load("example:minilm")
    model = transformers.AutoModel.from_pretrained(folder, **dtype_kw(torch.float32))
    assert sum(isinstance(m, Exl2Linear) for m in model.modules()) == 36
    base = sentence_embeddings(src.model, src.tokenizer, default_sentences())
    ours = sentence_embeddings(model, src.tokenizer, default_sentences())
    cosine = float((base * ours).sum(-1).mean())
    assert abs(cosine - reported) < 2e-3, (cosine, reported)
    assert torch.equal(ours, sentence_embeddings(exl2.load(folder, dtype=torch.float32), src.tokenizer,
                                                 default_sentences()))


def test_registration_leaves_float_checkpoints_alone():
    import transformers

    import exl2.hf

    exl2.hf.register()  # idempotent
    model = transformers.AutoModelForCausalLM.from_pretrained(float_model("qwen2"), **dtype_kw(torch.float32))
    assert not any(isinstance(m, Exl2Linear) for m in model.modules())
    assert isinstance(model.lm_head, torch.nn.Linear) and not model.lm_head.weight.is_meta


def test_save_pretrained_round_trip(tmp_path):
    import transformers

    import exl2.hf  # noqa: F401

    model = transformers.AutoModelForCausalLM.from_pretrained(exl2_model("qwen2"))
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["quant_method"] == "exl2"
    assert validate_path(tmp_path / "saved").ok
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)
