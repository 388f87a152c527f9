"""Encoder variants for the ablation (``docs/make_ablation.py``): one conversion in memory per recipe.

``exl2 quantize`` (:mod:`exl2.model.pipeline`) ships one recipe. To credit each technique on its
own, this module runs the same steps with every choice a field of :class:`Recipe`:

- **calibration**: rows, length, and the layout of the rows: ``"stream"`` (the corpus as one
  token stream cut into ``rows`` x ``length``, no special tokens: the pipeline's former default)
  or ``"documents"`` (one row per paragraph, tokenized as the model sees its inputs, special
  tokens included, truncated to ``length``); ``quant_rows`` rows for the quantization pass'
  Hessians (exllamav2 also measures on fewer rows than it quantizes with);
- **GPTQ**: on or off (round-to-nearest), damping, the scale search's error norm, and
  ``centered`` (for layers with a bias: GPTQ on the input covariance ``E[xx^T] - mu mu^T``, then
  the bias corrected by ``(W - W_hat) mu``; the optimal bias for the quantized weights, stored in
  the float16 bias the format already has);
- **what is allocated**: one QParams for every linear (``uniform``), or a measurement per linear
  on the block output (as the pipeline) or per exllamav2 slot (attention / MLP, with its tables
  ``qparams_attn`` / ``qparams_mlp``, :mod:`exl2.model.slots`), allocated by the exact allocator
  (or, per slot, by exllamav2's annealing: :func:`slots.anneal_plans`, which batches many
  measurements into one run of :mod:`exl2.model.baseline_exllamav2`).

Measurements are cached per recipe fields that change them, so rows that differ only in what is
done with a measurement share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..qmatrix import QMatrix
from ..qparams import QParams
from ..reference import quantize as reference_quantize
from ..reference.encode import ERR_NORM, PERCDAMP
from . import arch, calibration, centering, held, input_error, sensitivity
from .allocate import allocate
from .centering import LinearStats, decoded, input_stats  # noqa: F401 (decoded: used by the tests through here)
from .options import OPTIONS
from .refine import refined
from .source import Source


@dataclass(frozen=True)
class Recipe:
    """Every choice of one conversion (see the module docstring)."""

    layout: str = "stream"
    rows: int = 16
    length: int = 128
    quant_rows: int | None = None  #: rows for the quantization pass (None: ``rows``)
    error_rows: int | None = None  #: the first rows on which the measurement takes errors (None: all)
    gptq: bool = True
    percdamp: float = PERCDAMP
    err_norm: float = ERR_NORM
    centered: bool = False
    refine: int = 0  #: coordinate-descent sweeps after GPTQ in the quantization pass (:mod:`exl2.model.refine`)
    input_error: bool = False  #: the quantization pass aims at the float model (:mod:`exl2.model.input_error`)
    #: the allocation weighs each block's errors by the output probe's weight (:mod:`exl2.model.sensitivity`)
    sensitivity: bool = False
    uniform: QParams | None = None  #: one QParams for every linear: no measurement, no allocation
    measure: str = "linear"  #: "linear" (per linear, block output) or "slot" (exllamav2's tables)
    options: tuple[QParams, ...] = field(default=OPTIONS)

    def measurement_key(self) -> tuple:
        """The fields a measurement depends on."""
        return (self.layout, self.rows, self.error_rows, self.length, self.gptq, self.percdamp, self.err_norm,
                self.centered, self.measure, tuple(o.desc() for o in self.options))


# -- calibration ------------------------------------------------------------------------------

def batches(tokenizer, text: str, rows: int, length: int, layout: str) -> list[dict[str, torch.Tensor]]:
    """Calibration rows in the recipe's layout (:func:`calibration.batches`)."""
    return calibration.batches(tokenizer, text, rows, length, layout=layout)


# -- encoding one linear ------------------------------------------------------------------------

def encode(module: torch.nn.Linear, qparams: QParams, stats: LinearStats | None, recipe: Recipe) -> QMatrix:
    """One linear quantized under the recipe (its weights are not changed)."""
    if not recipe.gptq:
        return reference_quantize(module.weight.detach(), qparams, None, bias=module.bias, err_norm=recipe.err_norm)
    return centering.encode(refined(reference_quantize, recipe.refine), module.weight, qparams, stats, module.bias,
                            centered=recipe.centered, percdamp=recipe.percdamp, err_norm=recipe.err_norm)


#: The module computes with the decoded weights (and stored bias) from now on, as in the pipeline.
put = held.put_decoded


def output_errors(block, inputs: calibration.BlockInputs, reference: list[tuple]) -> tuple[float, float]:
    """The block's output error on the calibration rows, two ways: the relative squared error
    ``Σ ||y_q - y||² / Σ ||y||²`` (the pipeline's measurement) and exllamav2's ``1 - accuracy``,
    the mean over rows of ``||y_q - y||_F / ||y||_F`` (``measure.py test_error``)."""
    out = calibration.run_block(block, inputs).args
    num = den = rfn = 0.0
    for a, b in zip(out, reference):
        d = float((a[0] - b[0]).to(torch.float64).square().sum())
        r = float(b[0].to(torch.float64).square().sum())
        num, den = num + d, den + r
        rfn += (d / max(r, 1e-30)) ** 0.5
    return num / max(den, 1e-30), min(1 - 1e-6, rfn / max(1, len(out)))


# -- the conversion ---------------------------------------------------------------------------

@dataclass
class Conversion:
    """A quantized model in memory: the source with decoded weights in place, the chosen option
    (its description) per linear, the stored bits of the block linears over their weights, and
    the seconds spent (measurement included when it was not taken from the cache)."""

    src: Source
    choice: dict[str, str]
    bpw: float
    seconds: float
    measure_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def block_linears(src: Source) -> list[list[tuple[str, torch.nn.Linear]]]:
    return [list(arch.linears(b, p).items()) for p, b in src.blocks]


def measure_linears(src: Source, data, recipe: Recipe, progress: Callable = lambda m: None) -> dict:
    """Per linear and option, the block's relative squared output error with that linear alone
    quantized (the pipeline's measurement), on the float model's block inputs (the Hessians from
    every row, the errors from the first ``recipe.error_rows``); with GPTQ alone,
    as the pipeline measures (no coordinate descent). Returns ``{"errors": {key: [per option]},
    "block_weights": [per block]}``: the output probe's weights (:mod:`exl2.model.sensitivity`),
    taken in the same pass as the pipeline takes them."""
    measuring = replace(recipe, refine=0)
    errors: dict[str, list[float]] = {}
    probe = sensitivity.OutputProbe()
    inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, **_model_kwargs(src))
    for (prefix, block), linears in zip(src.blocks, block_linears(src)):
        stats = input_stats(block, dict(linears), inputs)
        sample = inputs.first(recipe.error_rows)
        reference = calibration.run_block(block, sample).args
        kept: dict[str, QMatrix] = {}
        for key, module in linears:
            saved = (module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone())
            k, n = module.in_features, module.out_features
            costs = [o.total_bits(k, n, module.bias is not None) for o in recipe.options]
            keep = sensitivity.probe_option(costs, k * n, range(len(costs)))
            errors[key] = []
            for j, opt in enumerate(recipe.options):
                qm = encode(module, opt, stats[key], measuring)
                put(module, qm)
                errors[key].append(output_errors(block, sample, reference)[0])
                _restore(module, saved)
                if j == keep:
                    kept[key] = qm
            progress(key)
        probe.block(block, inputs, _perturb(linears, kept))
        inputs = calibration.run_block(block, inputs)
    return {"errors": errors, "block_weights": probe.weights()}


def _perturb(linears: list[tuple[str, torch.nn.Linear]], kept: dict[str, QMatrix]) -> Callable:
    """For :meth:`sensitivity.OutputProbe.block`: the block computes with the kept encodings."""
    return lambda: held.compute_decoded([(module, kept[key]) for key, module in linears])


def _restore(module: torch.nn.Linear, saved) -> None:
    with torch.no_grad():
        module.weight.copy_(saved[0])
        if saved[1] is not None:
            module.bias.copy_(saved[1])


def _model_kwargs(src: Source) -> dict:
    return {"use_cache": False} if src.head is not None else {}


def quantize_pass(src: Source, choice: dict[str, QParams], data, recipe: Recipe) -> int:
    """Block by block, Hessians from the already-quantized blocks' outputs, each linear encoded
    with its chosen QParams and put in place (the pipeline's quantization pass). Returns the
    stored bits of the block linears, biases included (as the pipeline's budget counts them)."""
    bits = 0
    if not recipe.gptq:  # round-to-nearest needs no calibration inputs
        for linears in block_linears(src):
            for key, module in linears:
                qm = encode(module, choice[key], None, recipe)
                bits += qm.storage_bits()
                put(module, qm)
        return bits
    inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, **_model_kwargs(src))
    reference = inputs
    for (prefix, block), linears in zip(src.blocks, block_linears(src)):
        if recipe.input_error:
            following = calibration.run_block(block, reference)
            modules = dict(linears)
            encoder = refined(reference_quantize, recipe.refine)

            def encode_one(key, stats):
                return input_error.encode(encoder, modules[key].weight, choice[key], stats, modules[key].bias,
                                          centered=recipe.centered, percdamp=recipe.percdamp, err_norm=recipe.err_norm)
            done = input_error.quantize_block(block, modules, inputs, reference, encode_one, put)
            bits += sum(qm.storage_bits() for qm in done.values())
            reference = following
        else:
            stats = input_stats(block, dict(linears), inputs)
            for key, module in linears:
                qm = encode(module, choice[key], stats[key], recipe)
                bits += qm.storage_bits()
                put(module, qm)
        inputs = calibration.run_block(block, inputs)
    return bits


class Converter:
    """Converts one source under many recipes, caching measurements between them."""

    def __init__(self, src: str, text: str, log: Callable[[str], None] = print) -> None:
        self.src_name, self.text, self.log = src, text, log
        self._measurements: dict[tuple, tuple[dict, float]] = {}
        self._numel: int | None = None
        self._keys: list[str] | None = None

    def load(self) -> Source:
        return arch.load(self.src_name)

    def data(self, src: Source, recipe: Recipe, rows: int):
        return batches(src.tokenizer, self.text, rows, recipe.length, recipe.layout)

    def measurement(self, recipe: Recipe) -> tuple[dict, float, bool]:
        """(measurement, seconds it took, whether it came from the cache)."""
        key = recipe.measurement_key()
        if key in self._measurements:
            m, seconds = self._measurements[key]
            return m, seconds, True
        t0 = time.perf_counter()
        src = self.load()
        data = self.data(src, recipe, recipe.rows)
        if recipe.measure == "linear":
            m = measure_linears(src, data, recipe)
        elif recipe.measure == "slot":
            from .slots import measure_slots

            m = measure_slots(src, data, recipe)
        else:
            raise ValueError(f"unknown measurement {recipe.measure!r}")
        seconds = time.perf_counter() - t0
        self._measurements[key] = (m, seconds)
        return m, seconds, False

    def layers(self, src: Source) -> list[tuple[str, torch.nn.Linear]]:
        return [(k, m) for linears in block_linears(src) for k, m in linears]

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = [k for k, _ in self.layers(self.load())]
        return self._keys

    def numel(self) -> int:
        """The weights of the block linears (loads the source once)."""
        if self._numel is None:
            src = self.load()
            self._numel = sum(m.in_features * m.out_features for _, m in self.layers(src))
            self._keys = [k for k, _ in self.layers(src)]
        return self._numel

    def plans(self, recipe: Recipe, bpws: list[float]) -> tuple[list[dict[str, QParams]], float]:
        """The choice of QParams per linear for each target, and the seconds the allocation took
        (exact allocation; exllamav2's annealing is run by :func:`slots.anneal_plans`, which
        batches many measurements)."""
        if recipe.uniform is not None:
            return [dict.fromkeys(self.keys(), recipe.uniform)], 0.0
        m, _, _ = self.measurement(recipe)
        src = self.load()
        layers = self.layers(src)
        t0 = time.perf_counter()
        budgets = [int(self.numel() * b) for b in bpws]
        if recipe.measure == "linear":
            costs = [[o.total_bits(mod.in_features, mod.out_features, mod.bias is not None) for o in recipe.options]
                     for _, mod in layers]
            # layers are in block order: each gets its block's weight (1 without the probe's)
            weights = [m["block_weights"][i] if recipe.sensitivity else 1.0
                       for i, linears in enumerate(block_linears(src)) for _ in linears]
            errors = [[w * e for e in m["errors"][k]] for (k, _), w in zip(layers, weights)]
            plans = [{k: recipe.options[j] for (k, _), j in zip(layers, allocate(costs, errors, b).choice)}
                     for b in budgets]
        else:
            from .slots import exact_plans

            plans = exact_plans(m, budgets)
        return plans, time.perf_counter() - t0

    def quantize(self, recipe: Recipe, choice: dict[str, QParams]) -> Conversion:
        """The quantization pass on a fresh copy of the source (its time excludes measurement
        and allocation)."""
        t0 = time.perf_counter()
        src = self.load()
        data = self.data(src, recipe, recipe.quant_rows or recipe.rows)
        bits = quantize_pass(src, choice, data, recipe)
        return Conversion(src, {k: q.desc() for k, q in choice.items()}, bits / self.numel(),
                          time.perf_counter() - t0)

    def convert(self, recipe: Recipe, bpws: list[float] | None = None) -> list[Conversion]:
        """One conversion per target (one for a ``uniform`` recipe). A row's ``seconds`` is what
        converting it from scratch takes: its measurement (even when taken from the cache), the
        allocation and the quantization pass."""
        plans, alloc_seconds = self.plans(recipe, bpws or [])
        measure_seconds = self.measurement(recipe)[1] if recipe.uniform is None else 0.0
        out = []
        for choice in plans:
            conv = self.quantize(recipe, choice)
            conv.measure_seconds = measure_seconds
            conv.seconds += measure_seconds + alloc_seconds
            out.append(conv)
        return out
