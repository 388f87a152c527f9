"""The forward pass of ``exl2 validate --run``: the model built as :func:`exl2.load` builds it,
in float16 as exllamav2 computes (its modules load float tensors with ``.half()``,
exllamav2/module.py ``load_weight``), run on a few tokens; non-finite outputs are finding
EXL2-R001, naming the first module whose output holds NaN or Inf (spec 8.4)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..conformance.findings import Finding, finding
from ..io import Model
from .load import build_skeleton, fill

#: Tokens of the forward pass (ids 1 .. N, within any vocabulary the config can declare).
TOKENS = 8


def forward_findings(path: str | Path, dtype: torch.dtype = torch.float16) -> list[Finding]:
    """Run the model of a folder that passed the validator's rules; raises
    :class:`exl2.ContainerError` when transformers cannot build its architecture."""
    model = build_skeleton(path, dtype)
    with Model(path) as files:
        fill(model, files)
    model.eval()
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    ids = torch.arange(1, TOKENS + 1)[None] % max(vocab, 1)
    first: list[str] = []

    def hook(name):
        def check(_module, _args, out):
            t = out[0] if isinstance(out, tuple) else out
            if not first and isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                first.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if n and not isinstance(m, (nn.ModuleList, nn.Dropout))]
    try:
        with torch.inference_mode():
            out = model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    bad = int((~torch.isfinite(y)).sum())
    if not bad:
        return []
    where = f"; first in the output of {first[0]}" if first else ""
    return [finding("EXL2-R001", file=str(path), tensor=first[0] if first else None,
                    message=f"a {dtype} forward pass on {TOKENS} tokens gives {bad} non-finite outputs{where}")]
