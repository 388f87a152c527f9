"""Calibration: token batches, the inputs of each block, and the Hessian of each linear.

Inputs are collected block by block: the model runs once up to the first block (a pre-hook
captures that block's arguments and stops the forward pass), then each block is run on the
captured inputs and its outputs become the next block's inputs. Memory stays about one block
plus its activations.

Linears that read the same tensor (q/k/v of an attention, gate/up of an MLP) share one Hessian:
:func:`input_groups` finds them, :func:`group_hessian` computes one group's Hessian, stopping
the block's forward pass as soon as the group's input is seen, so that only one Hessian needs to
be in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import ContainerError

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


def batches(tokenizer, text: str, rows: int, length: int, device: str = "cpu",
            where: str = "calibration text") -> list[dict[str, torch.Tensor]]:
    """``rows`` sequences of ``length`` tokens cut from ``text`` (repeated as needed), one per batch."""
    if rows * length > MAX_TOKENS:
        raise ContainerError(f"{rows} rows x {length} tokens is more than the {MAX_TOKENS:,} calibration tokens "
                             f"accepted", file=where)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if len(ids) < 8:
        raise ContainerError(f"is too short: {len(ids)} tokens, at least 8 needed", file=where)
    need = rows * length
    ids = (ids * (need // len(ids) + 1))[:need]
    t = torch.tensor(ids, dtype=torch.long, device=device).view(rows, length)
    return [{"input_ids": t[i:i + 1], "attention_mask": torch.ones_like(t[i:i + 1])} for i in range(rows)]


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """The positional and keyword arguments of a block, one entry per calibration batch.
    ``tuple_output``: whether the blocks return a tuple (older transformers) or a tensor."""

    args: list[tuple]
    kwargs: list[dict]
    tuple_output: bool = False

    def nbytes(self) -> int:
        return sum(a[0].numel() * a[0].element_size() for a in self.args)


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


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs as the next block's inputs."""
    out = BlockInputs([], inputs.kwargs)
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
        self.count = 0

    def __call__(self, _module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        if self.total is None:
            self.total = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.total.addmm_(x.T, x)
        self.count += x.shape[0]
        raise _Stop


def _hessian(module: nn.Module, calls) -> torch.Tensor:
    """Mean of ``X^T X`` over every calibration row reaching ``module`` (``AdaptiveGPTQ.add_batch``)
    while each of ``calls`` runs."""
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
    return acc.total / max(1, acc.count)


def group_hessian(block: nn.Module, module: nn.Linear, inputs: BlockInputs) -> torch.Tensor:
    """The Hessian of ``module`` (and of every linear reading the same tensor) in ``block``."""
    return _hessian(module, (lambda a=a, k=k: block(*a, **k) for a, k in zip(inputs.args, inputs.kwargs)))


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
