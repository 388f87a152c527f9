"""Quality of a quantized model against its float source.

- sentence embeddings (mean pooling over tokens with the attention mask, L2-normalized, as
  sentence-transformers does for all-MiniLM-L6-v2): cosine similarity per sentence;
- per layer: relative Frobenius error ``||W_hat - W||_F / ||W||_F``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..io import open_model
from ..reference import dequantize


def default_sentences() -> list[str]:
    text = resources.files("exl2.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_quantized(model: torch.nn.Module, exl2_dir: str | Path) -> dict[str, float]:
    """Put the decoded EXL2 weights into ``model`` (in place); returns each layer's relative
    Frobenius error against the weights it replaced."""
    q = open_model(exl2_dir)
    modules = dict(model.named_modules())
    errors = {}
    with torch.no_grad():
        for key in q.layer_keys():
            module = modules[key]
            qm = q.qmatrix(key)
            w_hat = dequantize(qm)[:, : module.out_features].T.to(torch.float32)
            errors[key] = float((w_hat - module.weight).norm() / module.weight.norm())
            module.weight.copy_(w_hat)
            if module.bias is not None and qm.bias is not None:
                module.bias.copy_(qm.bias[: module.out_features].to(torch.float32))
    return errors


def sentence_embeddings(model: torch.nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def compare(src: str, exl2_dir: str | Path, sentences: list[str] | None = None) -> dict:
    """Cosine similarities of sentence embeddings (quantized vs float) and layer errors."""
    from . import arch

    sentences = sentences or default_sentences()
    ref = arch.load(src)
    base = sentence_embeddings(ref.model, ref.tokenizer, sentences)
    layer_errors = load_quantized(ref.model, exl2_dir)
    quant = sentence_embeddings(ref.model, ref.tokenizer, sentences)
    cos = (base * quant).sum(-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "layer_errors": layer_errors}
