"""Calibration: token batches, the inputs of each block, and the Hessian of each linear.

Inputs are collected block by block: the model runs once up to the first block (a pre-hook
captures that block's arguments and stops the forward pass), then each block is run on the
captured inputs and its outputs become the next block's inputs. Memory stays about one block
plus its activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn


def default_text() -> str:
    return resources.files("exl2.data").joinpath("calibration.txt").read_text(encoding="utf-8")


def batches(tokenizer, text: str, rows: int, length: int, device: str = "cpu",
            layout: str = "stream") -> list[dict[str, torch.Tensor]]:
    """Calibration rows, one per batch. ``layout="stream"``: ``rows`` sequences of ``length``
    tokens cut from ``text`` as one token stream (repeated as needed), no special tokens.
    ``layout="documents"``: one row per paragraph (line) of ``text``, framed as the model sees
    its inputs (the tokenizer's special tokens: BERT's [CLS] ... [SEP], a llama's BOS), a
    paragraph longer than ``length`` tokens split over several rows; rows repeat from the first
    when ``rows`` outnumbers them."""
    if layout == "documents":
        return _document_rows(tokenizer, text, rows, length, device)
    if layout != "stream":
        raise ValueError(f"unknown calibration layout {layout!r} (stream or documents)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if len(ids) < 8:
        raise ValueError("the calibration text is too short")
    need = rows * length
    ids = (ids * (need // len(ids) + 1))[:need]
    t = torch.tensor(ids, dtype=torch.long, device=device).view(rows, length)
    return [{"input_ids": t[i:i + 1], "attention_mask": torch.ones_like(t[i:i + 1])} for i in range(rows)]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; llama: BOS)."""
    plain = tokenizer("calibration", add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer("calibration", add_special_tokens=True, verbose=False)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    return [], []


def _document_rows(tokenizer, text: str, rows: int, length: int, device: str) -> list[dict[str, torch.Tensor]]:
    """Each paragraph in pieces of at most ``length`` tokens, special tokens included (a long
    paragraph gives several rows, so no text is cut away); the first ``rows`` pieces, cycling."""
    prefix, suffix = _special_frame(tokenizer)
    specials = len(prefix) + len(suffix)
    if length <= specials:
        raise ValueError(f"calibration rows of {length} tokens leave no room for text")
    pieces = []
    for p in (p.strip() for p in text.split("\n")):
        ids = tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"] if p else []
        step = length - specials
        pieces += [prefix + ids[i:i + step] + suffix for i in range(0, len(ids), step)]
    if sum(len(x) for x in pieces) < 8:
        raise ValueError("the calibration text is too short")
    out = []
    for i in range(rows):
        t = torch.tensor([pieces[i % len(pieces)]], dtype=torch.long, device=device)
        out.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
    return out


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """The positional and keyword arguments of a block, one entry per calibration batch."""

    args: list[tuple]
    kwargs: list[dict]


def first_block_inputs(model: nn.Module, block: nn.Module, data: list[dict], **model_kwargs) -> BlockInputs:
    captured = BlockInputs([], [])

    def hook(_module, args, kwargs):
        captured.args.append(args)
        captured.kwargs.append(kwargs)
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in data:
                try:
                    model(**batch, **model_kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs as the next block's inputs."""
    out = BlockInputs([], inputs.kwargs)
    with torch.inference_mode():
        for args, kwargs in zip(inputs.args, inputs.kwargs):
            out.args.append((_hidden(block(*args, **kwargs)),) + tuple(args[1:]))
    return out


def hessians(block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """Mean of ``X^T X`` over every calibration row reaching each linear (``AdaptiveGPTQ.add_batch``)."""
    sums = {k: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for k, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def make(key):
        def hook(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            sums[key].addmm_(x.T, x)
            counts[key] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in layers.items()]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return {k: sums[k] / max(1, counts[k]) for k in layers}


def read_text(path: Path | None) -> str:
    return default_text() if path is None else Path(path).read_text(encoding="utf-8")
