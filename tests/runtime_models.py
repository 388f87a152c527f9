"""Tiny models for the runtime tests, built once per test session (module-level cache):
float checkpoints written by transformers with random weights, their EXL2 folders written by
``exl2 quantize``, and a folder in exllamav2's own layout written by :func:`exllamav2_folder`."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from exl2 import QParams
from exl2.io import save_tensors
from exl2.reference import dequantize, quantize
from exl2.runtime.load import dtype_kwarg as dtype_kw

ROOT = Path(tempfile.mkdtemp(prefix="run-tests-"))
atexit.register(shutil.rmtree, ROOT, True)

#: A small option set keeps quantizing fast (as tests/test_quantize_model.py does).
OPTS = (QParams(32, [3, 2], [0.25, 0.75]), QParams(32, [4], [1.0]), QParams(32, [6], [1.0]), QParams(32, [8], [1.0]))
#: Llama family: GQA (4 heads, 2 key-value heads); hidden 64, 2 layers.
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i + 32): i for i in range(95)} | {"<unk>": 95, "</s>": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


@functools.cache
def float_model(kind: str) -> Path:
    """``llama`` (untied, linear rope scaling), ``llama-tied`` (tied embeddings) or ``qwen2``
    (attention bias on q, k, v)."""
    import transformers

    folder = ROOT / f"{kind}-float"
    torch.manual_seed({"llama": 0, "llama-tied": 1, "qwen2": 2}[kind])
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**DIMS, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**DIMS, tie_word_embeddings=kind == "llama-tied",
                                       rope_scaling={"rope_type": "linear", "factor": 2.0} if kind == "llama" else None)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random init gives norms of 1; vary them so that loading them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer(folder)
    return folder


@functools.cache
def exl2_model(kind: str, bpw: float = 4.0) -> Path:
    """The float model ``kind`` through ``exl2 quantize``. With transformers 4 (the oldest version
    the runtime supports, docs/running.md), which ``exl2 quantize`` does not support, the folder is
    written by :func:`exllamav2_folder` with a quantization_config instead."""
    from exl2.model.pipeline import Settings, quantize_model

    out = ROOT / f"{kind}-{bpw}"
    if "dtype" not in dtype_kw(torch.float32):
        exllamav2_folder(out, float_model(kind), shards=1, quantize_head=True)
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "exl2", "bits": 4.5, "head_bits": 6}
        (out / "config.json").write_text(json.dumps(config))
        return out
    quantize_model(Settings(src=str(float_model(kind)), out=out, bpw=bpw, rows=4, length=32, options=OPTS))
    return out


def exllamav2_folder(out: Path, src: Path, shards: int = 2, quantize_head: bool = True, q_perm: bool = True) -> Path:
    """``src`` (a float llama) written as exllamav2's converter writes it
    (exllamav2/conversion/compile.py, compile_model): every linear of the blocks quantized under
    its own name (here by round-to-nearest with the reference encoder, which is enough to test
    loading), float tensors in float16 (module.py loads them with ``.half()``), the head quantized
    as ``lm_head`` (unless ``quantize_head`` is False: then no head tensor, as for tied embeddings),
    tensors spread over ``output-0000N-of-0000M.safetensors`` shards, config.json copied without
    ``quantization_config`` (the converter adds it only with ``-cf``), and, as some older files do,
    ``q_perm`` beside ``q_invperm``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, **dtype_kw(torch.float32))
    tensors: dict[str, torch.Tensor] = {}
    option = QParams(32, [5, 4], [0.5, 0.5])
    for name, module in model.named_modules():
        is_head = name == "lm_head"
        if isinstance(module, torch.nn.Linear) and (".layers." in name or (is_head and quantize_head)):
            qm = quantize(module.weight.detach(), option, bias=module.bias)
            tensors |= qm.to_tensors(name)
            if q_perm:
                tensors[f"{name}.q_perm"] = qm.q_perm
    quantized = {n.rsplit(".", 1)[0] for n in tensors}
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in quantized or name == "lm_head.weight":
            continue
        tensors[name] = t.to(torch.float16)
    names = list(tensors)
    out.mkdir(parents=True)
    per_shard = -(-len(names) // shards)
    for i in range(shards):
        part = names[i * per_shard:(i + 1) * per_shard]
        save_tensors(out / f"output-{i + 1:05}-of-{shards:05}.safetensors", {n: tensors[n] for n in part})
    config = json.loads((src / "config.json").read_text())
    if not quantize_head:
        config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def dequantized_float_model(src: Path, exl2_dir: Path, dtype: torch.dtype = torch.float32):
    """The float model of ``src`` with ``exl2 dequantize``'s weights put in place: every quantized
    linear gets its decoded float16 weights (and bias), every float tensor the folder's float16
    values; a head the folder quantizes is untied from the embedding first."""
    import transformers

    from exl2.io import open_model

    model = transformers.AutoModelForCausalLM.from_pretrained(src, **dtype_kw(dtype))
    folder = open_model(exl2_dir)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in folder.layer_keys():
            linear = modules[key]
            qm = folder.qmatrix(key)
            linear.weight = torch.nn.Parameter(dequantize(qm)[:, :linear.out_features].T.to(dtype))
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(folder[key + ".bias"][:linear.out_features].to(dtype))
        params = dict(model.named_parameters())
        for name in folder:
            if name in params:
                params[name].copy_(folder[name].to(dtype))
    return model.eval()


@functools.cache
def minilm_exl2(bpw: float = 4.0) -> Path:
    """all-MiniLM-L6-v2 (``example:minilm``) through ``exl2 quantize``, with a small option set
    (as tests/test_quantize_model.py's MiniLM test) to keep CI fast."""
    from exl2.model.pipeline import Settings, quantize_model

    out = ROOT / f"minilm-{bpw}"
    options = (QParams(32, [3, 2], [0.25, 0.75]), QParams(32, [4], [1.0]), QParams(32, [6], [1.0]))
    quantize_model(Settings(src="example:minilm", out=out, bpw=bpw, rows=4, length=64, options=options))
    return out
