"""Calibration: token batches, the inputs of each block, and the Hessian of each linear.

Inputs are collected block by block: the model runs once up to the first block (a pre-hook
captures that block's arguments and stops the forward pass), then each block is run on the
captured inputs and its outputs become the next block's inputs. Memory stays about one block
plus its activations.

Linears that read the same tensor (q/k/v of an attention, gate/up of an MLP) share one Hessian:
:func:`input_groups` finds them, :func:`group_moments` computes one group's Hessian and mean
input, stopping the block's forward pass as soon as the group's input is seen, so that only one
Hessian needs to be in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import ContainerError
from .offload import Batches, Store, empty_like

#: Most calibration tokens (rows x length) accepted: exllamav2's largest default is 100 x 2048.
MAX_TOKENS = 1 << 24


def default_text() -> str:
    return resources.files("exl2.data").joinpath("calibration.txt").read_text(encoding="utf-8")


def read_text(path: Path | None) -> str:
    """The calibration text: the shipped corpus, or ``path`` as UTF-8 (one-line errors otherwise)."""
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ContainerError(f"is not UTF-8 text (byte {e.start})", file=str(path)) from None
    except OSError as e:
        raise ContainerError(f"cannot be read ({e.strerror})", file=str(path)) from None


def check_tokens(rows: int, length: int, where: str = "calibration text") -> None:
    """Refuses more than :data:`MAX_TOKENS` calibration tokens (a one-line error naming ``where``)."""
    if rows * length > MAX_TOKENS:
        raise ContainerError(f"{rows} rows x {length} tokens is more than the {MAX_TOKENS:,} calibration tokens "
                             f"accepted", file=where)


def batches(tokenizer, text: str, rows: int, length: int, device: str = "cpu", where: str = "calibration text",
            layout: str = "stream") -> list[dict[str, torch.Tensor]]:
    """Calibration rows, one per batch. ``layout="stream"``: ``rows`` sequences of ``length``
    tokens cut from ``text`` as one token stream (repeated as needed), no special tokens.
    ``layout="documents"``: one row per paragraph (line) of ``text``, framed as the model sees
    its inputs (the tokenizer's special tokens: BERT's [CLS] ... [SEP], a llama's BOS), a
    paragraph longer than ``length`` tokens split over several rows; rows repeat from the first
    when ``rows`` outnumbers them. ``where`` names the text in errors."""
    check_tokens(rows, length, where)
    if layout == "documents":
        return _document_rows(tokenizer, text, rows, length, device, where)
    if layout != "stream":
        raise ValueError(f"unknown calibration layout {layout!r} (stream or documents)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if len(ids) < 8:
        raise ContainerError(f"is too short: {len(ids)} tokens, at least 8 needed", file=where)
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


def _document_rows(tokenizer, text: str, rows: int, length: int, device: str,
                   where: str) -> list[dict[str, torch.Tensor]]:
    """Each paragraph in pieces of at most ``length`` tokens, special tokens included (a long
    paragraph gives several rows, so no text is cut away); the first ``rows`` pieces, cycling."""
    prefix, suffix = _special_frame(tokenizer)
    specials = len(prefix) + len(suffix)
    if length <= specials:
        raise ContainerError(f"rows of {length} tokens leave no room for text between the {specials} special "
                             f"tokens of each row (raise --length)", file=where)
    pieces = []
    for p in (p.strip() for p in text.split("\n")):
        ids = tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"] if p else []
        step = length - specials
        pieces += [prefix + ids[i:i + step] + suffix for i in range(0, len(ids), step)]
    tokens = sum(len(x) - specials for x in pieces)
    if tokens < 8:
        raise ContainerError(f"is too short: {tokens} tokens, at least 8 needed", file=where)
    out = []
    for i in range(rows):
        t = torch.tensor([pieces[i % len(pieces)]], dtype=torch.long, device=device)
        out.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
    return out


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """The positional and keyword arguments of a block, one entry per calibration batch.
    ``tuple_output``: whether the blocks return a tuple (older transformers) or a tensor.
    ``args`` is a list, or an :class:`exl2.model.offload.Batches` (which acts as one) whose
    hidden states are held in CPU memory or on disk."""

    args: list[tuple] | Batches
    kwargs: list[dict]
    tuple_output: bool = False

    def first(self, rows: int | None) -> BlockInputs:
        """The first ``rows`` batches (all of them for None)."""
        if rows is None or rows >= len(self.args):
            return self
        return BlockInputs(self.args[:rows], self.kwargs[:rows], self.tuple_output)


def _is_cache(value: object) -> bool:
    """Whether ``value`` is a transformers key/value cache (``Cache``: update, get_seq_length)."""
    return callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None))


def first_block_inputs(model: nn.Module, block: nn.Module, data: list[dict], store: Store | None = None,
                       **model_kwargs) -> BlockInputs:
    """The first block's arguments for each calibration batch, its hidden states held by
    ``store`` (default: as computed, on the device)."""
    captured = BlockInputs(store.batches() if store is not None else [], [])

    def hook(_module, args, kwargs):
        captured.args.append(args)
        # A key/value cache (transformers makes one per forward when use_cache is on, e.g. for a
        # config.json without "architectures") would grow by every block's keys and values for
        # every batch kept: memory growing with the number of blocks. No block needs it.
        captured.kwargs.append({k: None if _is_cache(v) else v for k, v in kwargs.items()})
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


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs as the next block's inputs (held as its inputs are)."""
    out = BlockInputs(empty_like(inputs.args), inputs.kwargs)
    with torch.inference_mode():
        for args, kwargs in zip(inputs.args, inputs.kwargs):
            y = block(*args, **kwargs)
            out.tuple_output = isinstance(y, (tuple, list))
            out.args.append((y[0] if out.tuple_output else y,) + tuple(args[1:]))
    return out


def input_groups(block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs) -> list[list[str]]:
    """The linears of ``layers`` grouped by the tensor they read (in the first calibration batch),
    in order of first use: ``[[q, k, v], [o], [gate, up], [down]]`` for a llama block."""
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def make(key):
        def hook(_m, args):
            for x, keys in seen:
                if x is args[0]:
                    keys.append(key)
                    return
            seen.append((args[0], [key]))
        return hook

    handles = [m.register_forward_pre_hook(make(k)) for k, m in layers.items()]
    try:
        run_block(block, BlockInputs(inputs.args[:1], inputs.kwargs[:1]))
    finally:
        for h in handles:
            h.remove()
    groups = [keys for _, keys in seen]
    unused = [k for k in layers if not any(k in g for g in groups)]
    return groups + [[k] for k in unused]


class _HessianSum:
    """Sums ``X^T X`` of the inputs reaching a module, as a forward pre-hook that then stops the
    forward pass (nothing after the module's input is needed)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None  #: sum of the rows, for their mean (exl2.model.centering)
        self.count = 0

    def __call__(self, _module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.total.addmm_(x.T, x)
        self.sum += x.sum(0).to(torch.float64)
        self.count += x.shape[0]
        raise _Stop


def _moments(module: nn.Module, calls) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[x x^T], E[x])`` over every calibration row reaching ``module`` while each of ``calls``
    runs: the Hessian of ``AdaptiveGPTQ.add_batch`` and the mean input (:mod:`exl2.model.centering`)."""
    acc = _HessianSum()
    handle = module.register_forward_pre_hook(acc)
    try:
        with torch.inference_mode():
            for call in calls:
                try:
                    call()
                except _Stop:
                    pass
    finally:
        handle.remove()
    if acc.total is None:
        raise ValueError("no calibration input reached the layer")
    n = max(1, acc.count)
    return acc.total / n, (acc.sum / n).to(torch.float32)


def _hessian(module: nn.Module, calls) -> torch.Tensor:
    """Mean of ``X^T X`` over every calibration row reaching ``module`` while each of ``calls`` runs."""
    return _moments(module, calls)[0]


def group_moments(block: nn.Module, module: nn.Linear, inputs: BlockInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[x x^T], E[x])`` of the input of ``module`` (and of every linear reading the same
    tensor) in ``block``."""
    return _moments(module, (lambda a=a, k=k: block(*a, **k) for a, k in zip(inputs.args, inputs.kwargs)))


class _Replay(nn.Module):
    """Stands in for a block: returns its input unchanged, or, for the last block, the stored
    output of the current batch."""

    def __init__(self, outputs: BlockInputs, last: bool) -> None:
        super().__init__()
        self.outputs, self.last, self.batch = outputs, last, 0

    def forward(self, hidden, *args, **kwargs):
        if self.last:
            hidden = self.outputs.args[self.batch][0]
            self.batch += 1
        return (hidden,) if self.outputs.tuple_output else hidden


def head_hessian(model: nn.Module, blocks: nn.ModuleList, head: nn.Linear, last_outputs: BlockInputs,
                 data: list[dict], **model_kwargs) -> torch.Tensor:
    """Hessian of the output head from the last block's outputs: the model runs with its blocks
    replaced by a replay of ``last_outputs`` (no block weights are needed), up to the head's input
    (through the final norm and whatever else lies between the blocks and the head)."""
    originals = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = _Replay(last_outputs, last=i == len(blocks) - 1)
    try:
        return _hessian(head, (lambda b=b: model(**b, **model_kwargs) for b in data))
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
