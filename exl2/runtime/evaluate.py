"""``exl2 eval``: how well an EXL2 model predicts a text, and how close it stays to its source.

- causal LM: perplexity over the text, cut into windows of ``length`` tokens; with the float
  source also the mean KL divergence KL(source || quantized) of the next-token distributions,
  the largest per-token KL and top-1 agreement;
- encoder (anything not a causal LM): with the source, the cosine similarity of sentence
  embeddings (mean pooling, L2-normalized: the figure docs/quantizing.md reports).

The default text (exl2/data/eval.txt) is original prose written for this purpose, not the
calibration corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel

from ..errors import ContainerError
from .load import dtype_kwarg, load, read_config

#: Version of the JSON report; bumped when a field changes meaning or disappears.
SCHEMA_VERSION = 1


class EvalReport(BaseModel):
    """``exl2 eval --json``."""

    schema_version: int = SCHEMA_VERSION
    model: str
    source: str | None = None
    kind: str  # "causal-lm" or "encoder"
    text: str
    tokens: int
    windows: int
    perplexity: float | None = None
    source_perplexity: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None


def default_text() -> str:
    return resources.files("exl2.data").joinpath("eval.txt").read_text(encoding="utf-8")


def is_causal(path: str | Path) -> bool:
    archs = read_config(path).get("architectures")
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)


def tokenizer(path: str | Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise ContainerError(f"has no tokenizer transformers can read: {str(e).splitlines()[0][:200] if str(e) else ''}",
                             file=str(path)) from None


def source_model(path: str | Path, causal: bool):
    """The float source, in float32, as ``exl2 quantize`` read it."""
    import transformers

    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **dtype_kwarg(torch.float32)).eval()
    except Exception as e:
        raise ContainerError(f"cannot be loaded by transformers: {str(e).splitlines()[0][:200] if str(e) else ''}",
                             file=str(path)) from None


Step = Callable[[list, str], list]


def evaluate(model_path: str | Path, source: str | Path | None = None, text: str | None = None, length: int = 256,
             max_windows: int | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
             progress: Step = lambda items, desc: items) -> EvalReport:
    """Evaluate the EXL2 model at ``model_path`` (see the module docstring). ``progress(items,
    description)`` wraps the window loop (a bar or log lines)."""
    text_name = "exl2/data/eval.txt" if text is None else "(given)"
    text = default_text() if text is None else text
    causal = is_causal(model_path)
    model = load(model_path, device=device, dtype=dtype)  # validates the folder first
    tok = tokenizer(model_path)
    ref = source_model(source, causal).to(model.device) if source is not None else None
    report = dict(model=str(model_path), source=None if source is None else str(source), text=text_name)
    if causal:
        return EvalReport(**report, **_causal(model, ref, tok, text, length, max_windows, progress))
    if ref is None:
        raise ContainerError("is an encoder: exl2 eval compares its embeddings with the source model's, "
                             "pass --source", file=str(model_path))
    return EvalReport(**report, **_encoder(model, ref, tok, text, progress))


def _causal(model, ref, tok, text, length, max_windows, progress) -> dict:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    limit = getattr(model.config, "max_position_embeddings", None)
    length = max(2, min(length, limit or length))
    windows = [ids[i:i + length] for i in range(0, len(ids) - 1, length)]
    windows = [w for w in windows if len(w) > 1][:max_windows]
    if not windows:
        raise ContainerError("the text is too short: it gives fewer than 2 tokens")
    nll = ref_nll = kl_sum = 0.0
    kl_max, agree, count = 0.0, 0, 0
    with torch.inference_mode():
        for w in progress(windows, "eval"):
            x = w[None].to(model.device)
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            target = x[0, 1:]
            nll -= float(logp.gather(-1, target[:, None]).sum())
            count += len(target)
            if ref is not None:
                ref_logp = torch.log_softmax(ref(x).logits[0, :-1].float(), -1)
                ref_nll -= float(ref_logp.gather(-1, target[:, None]).sum())
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(source || quantized) per token
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    out = dict(kind="causal-lm", tokens=count, windows=len(windows), perplexity=float(torch.tensor(nll / count).exp()))
    if ref is not None:
        out |= dict(source_perplexity=float(torch.tensor(ref_nll / count).exp()), kl_mean=kl_sum / count,
                    kl_max=kl_max, top1_agreement=agree / count)
    return out


def _encoder(model, ref, tok, text, progress) -> dict:
    from ..model.evaluate import sentence_embeddings

    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
    cos = []
    for s in progress(sentences, "eval"):
        a = sentence_embeddings(model, tok, [s]).float()
        b = sentence_embeddings(ref, tok, [s]).float()
        cos.append(float((a * b).sum()))
    tokens = sum(len(tok(s)["input_ids"]) for s in sentences)
    c = torch.tensor(cos)
    return dict(kind="encoder", tokens=tokens, windows=len(sentences), cosine_mean=float(c.mean()),
                cosine_min=float(c.min()))
