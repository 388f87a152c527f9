"""Each block's weight in the allocation: how much of its error reaches the model's output.

The measurement (:mod:`exl2.model.pipeline`, as exllamav2's) scores an option by the relative
error of *one block's* outputs. Those errors are in the same units for every block, but the
allocation wants the error at the *model's* output, and a block's error does not reach it in the
same proportion everywhere: measured on MiniLM, the ratio of the last block's relative output
error to the block's own ranged from about 0.6 to 2.1 between layers, and for one layer it was
nearly the same whichever option was measured (docs/quantizing.md). So one number per block,
measured once, converts its errors into the units the allocation should sum:

    weight(b) = e_final(b) / e_block(b)

with the block's linears quantized by the probe option (:func:`probe_option`) and the rest of
the model float: ``e_block`` is the relative squared error of block b's outputs, ``e_final``
that of the last block's outputs, both on the first :data:`PROBE_ROWS` calibration rows. The
weights are scaled to a mean of 1 (only their ratios matter to the allocation).

A probe that ran to the model's output for every option of every linear would cost the
measurement once per later block; this one costs one forward per later block of
:data:`PROBE_ROWS` rows per block, and streams: a perturbed copy of the hidden states is carried
for every block already seen (:class:`OutputProbe`, as a bfloat16 difference from the float
model's), each advanced through the next block as it is loaded, so no block is read twice. Its
memory grows with the blocks: ``blocks x PROBE_ROWS x length x hidden x 2`` bytes (for
llama-2-7b's 32 blocks with rows of 128 tokens, 0.27 GB). The file stays plain EXL2: only which option each linear
gets changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import calibration
from .calibration import BlockInputs

#: Calibration rows the probe carries (a copy of their hidden states per block seen).
PROBE_ROWS = 8

#: The probe quantizes each linear with the fitting option whose stored bits per weight are
#: nearest this (exllamav2's 4-bit option with groups of 128 among the default options).
PROBE_BPW = 4.0

#: Below this relative block error the probe saw no error to follow, and the block keeps weight 1.
TINY = 1e-12


def probe_option(costs: Sequence[int], numel: int, fits: Sequence[int]) -> int:
    """The index (among ``fits``, into ``costs``) of the option whose bits per weight are nearest
    :data:`PROBE_BPW`; the lower index on a tie."""
    return min(fits, key=lambda j: (abs(costs[j] / numel - PROBE_BPW), j))


def relative_error(out: BlockInputs, reference: BlockInputs) -> float:
    """``Σ ||y - y_ref||² / Σ ||y_ref||²`` over the batches (float64 sums)."""
    num = sum(float((a[0] - b[0]).to(torch.float64).square().sum()) for a, b in zip(out.args, reference.args))
    den = sum(float(b[0].to(torch.float64).square().sum()) for b in reference.args)
    return num / max(den, 1e-30)


class OutputProbe:
    """Carries, for every block seen so far, the probe rows' hidden states with that block's
    linears quantized and all else float, as their difference from the float model's hidden
    states, in bfloat16: half the memory of float32, and the rounding is relative to the
    difference itself (about 0.4 %), not to the hidden states. Call :meth:`block` for every
    block in order, with the float model's inputs of that block; then :meth:`weights`."""

    #: dtype of the carried differences
    DTYPE = torch.bfloat16

    def __init__(self, rows: int = PROBE_ROWS) -> None:
        self.rows = rows
        self.deltas: list[list[torch.Tensor]] = []  # per block seen, per row: perturbed - float
        self.block_errors: list[float] = []
        self.final: BlockInputs | None = None

    def _shifted(self, rows: BlockInputs, delta: list[torch.Tensor]) -> BlockInputs:
        args = [(a[0] + d.to(a[0].dtype),) + tuple(a[1:]) for a, d in zip(rows.args, delta)]
        return BlockInputs(args, rows.kwargs, rows.tuple_output)

    def _delta(self, out: BlockInputs, reference: BlockInputs) -> list[torch.Tensor]:
        return [(a[0] - b[0]).to(self.DTYPE) for a, b in zip(out.args, reference.args)]

    def block(self, block: torch.nn.Module, inputs: BlockInputs, perturb: Callable[[], Callable[[], None]]) -> None:
        """Advance every earlier difference through ``block`` (float), then start this block's:
        ``perturb()`` puts the probe's decoded weights in place and returns what restores them."""
        rows = inputs.first(self.rows)
        reference = calibration.run_block(block, rows)
        self.deltas = [self._delta(calibration.run_block(block, self._shifted(rows, d)), reference)
                       for d in self.deltas]
        restore = perturb()
        try:
            out = calibration.run_block(block, rows)
        finally:
            restore()
        self.block_errors.append(relative_error(out, reference))
        self.deltas.append(self._delta(out, reference))
        self.final = reference

    def weights(self) -> list[float]:
        """Per block, the error at the last block's outputs over the block's own, scaled to a
        mean of 1 (a block whose probe error was below :data:`TINY` gets 1 before scaling)."""
        if self.final is None:
            return []
        den = sum(float(b[0].to(torch.float64).square().sum()) for b in self.final.args)
        raw = []
        for delta, e in zip(self.deltas, self.block_errors):
            num = sum(float(d.to(torch.float64).square().sum()) for d in delta)
            raw.append(num / max(den, 1e-30) / e if e > TINY else 1.0)
        raw = [r if math.isfinite(r) else 1.0 for r in raw]
        mean = sum(raw) / len(raw)
        return [r / mean for r in raw] if mean > 0 else [1.0] * len(raw)

    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for delta in self.deltas for d in delta)


def carried_bytes(blocks: int, tokens_per_row: int, hidden: int, rows: int = PROBE_ROWS) -> int:
    """The probe's differences at the last block: ``rows`` rows of hidden states in bfloat16 per
    block."""
    return blocks * rows * tokens_per_row * hidden * 2


def check_weights(value, blocks: int) -> list[float] | None:
    """``value`` read from a measurement file as block weights: a list of ``blocks`` finite
    numbers >= 0, not all 0 (a block whose error never reaches the output weighs 0), else None."""
    if not isinstance(value, list) or len(value) != blocks:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in value):
        return None
    return [float(x) for x in value] if sum(value) > 0 else None
