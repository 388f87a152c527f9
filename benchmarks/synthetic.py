"""A synthetic llama in EXL2, written directly (random codes through QMatrix and exl2.io, with
exllamav2's tensor names and a llama config.json) instead of converted: a model of any size in
seconds, for load-memory and speed measurements. Its outputs are meaningless; its layers pass every
rule of the validator."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exl2.io import SafetensorsWriter
from exl2.qmatrix import QMatrix

#: 8-bit groups of 128 rows: 32 qrows each (4 rows per word).
GROUP_ROWS = 128


def layer(k: int, n: int, g: torch.Generator) -> QMatrix:
    """A random 8-bit layer of K x N (N a multiple of 32), small scales so activations stay finite."""
    groups = k // GROUP_ROWS
    q_groups = torch.tensor([v for i in range(groups) for v in (8, i * GROUP_ROWS // 4)], dtype=torch.int16)
    return QMatrix(torch.randint(-2**31, 2**31 - 1, (k // 4, n), generator=g, dtype=torch.int32),
                   torch.randint(-2**31, 2**31 - 1, (groups, n // 8), generator=g, dtype=torch.int32),
                   torch.full((groups,), 0.002, dtype=torch.float16), q_groups,
                   torch.randperm(k, generator=g).to(torch.int32))


def config(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
            "quantization_config": {"quant_method": "exl2", "version": "synthetic", "bits": 8.0, "head_bits": 8}}


def write_llama(out: Path, hidden: int = 2048, intermediate: int = 5632, layers: int = 20, vocab: int = 32000,
                seed: int = 0) -> int:
    """Write the model to ``out`` (``output.safetensors`` + config.json), one tensor at a time;
    returns the bytes of its tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
              "mlp.down_proj": (intermediate, hidden)}
    plan: list[tuple[str, object]] = [("model.embed_tokens.weight", ("embed", (vocab, hidden)))]
    for i in range(layers):
        p = f"model.layers.{i}"
        plan += [(f"{p}.input_layernorm.weight", ("norm", (hidden,))),
                 (f"{p}.post_attention_layernorm.weight", ("norm", (hidden,)))]
        plan += [(f"{p}.{name}", ("linear", kn)) for name, kn in shapes.items()]
    plan += [("model.norm.weight", ("norm", (hidden,))), ("lm_head", ("linear", (hidden, vocab)))]
    entries = []
    for name, (kind, shape) in plan:
        if kind == "linear":
            k, n = shape
            groups = k // GROUP_ROWS
            entries += [(f"{name}.q_weight", torch.int32, (k // 4, n)), (f"{name}.q_scale", torch.int32, (groups, n // 8)),
                        (f"{name}.q_scale_max", torch.float16, (groups,)), (f"{name}.q_groups", torch.int16, (2 * groups,)),
                        (f"{name}.q_invperm", torch.int32, (k,))]
        else:
            entries.append((name, torch.float16, shape))
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    with SafetensorsWriter(out / "output.safetensors", entries) as w:
        for name, (kind, shape) in plan:
            if kind == "linear":
                for t_name, t in layer(*shape, g).to_tensors(name).items():
                    w.write(t_name, t)
                    total += t.numel() * t.element_size()
            else:
                t = torch.ones(shape, dtype=torch.float16) if kind == "norm" else \
                    (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
                w.write(name, t)
                total += t.numel() * t.element_size()
    (out / "config.json").write_text(json.dumps(config(hidden, intermediate, layers, vocab), indent=1))
    return total
