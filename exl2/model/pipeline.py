"""``exl2 quantize``: a Hugging Face checkpoint to an EXL2 model at a target bitrate.

The stages, each a function below, read the model through a :class:`~exl2.model.source.Source`
that gives one block's weights at a time (streamed from the safetensors files; or the whole model
loaded at once with ``Settings(streaming=False)``, which gives the same bytes):

1. **Checks before any long work** (:func:`_plan`): the settings, the source loads, the
   architecture has blocks of linears, every layer fits at least one option, the target is within
   what the options can reach, the disk has room, OUT does not exist. The memory estimate is
   printed (:mod:`exl2.model.memory`).
2. **Measurement** (:func:`measure`, skipped with ``--measurement``): block by block, the Hessian
   of every group of linears reading the same input, then every option of ``Settings.options``
   that fits the layer quantized with GPTQ and put in place alone; its error is the relative
   squared error of the *block's* outputs on the first ``error_rows`` calibration inputs (as exllamav2 measures at
   module level, so that errors of different layers are in the same units), and its cost the
   exact stored bits (``QParams.total_bits``). In the same pass (``Settings.sensitivity``), one
   weight per block: how much of its error reaches the last block's outputs
   (:mod:`exl2.model.sensitivity`).
3. **Allocation** (:func:`allocate_bits`): :func:`allocate.allocate` of the weighted errors
   within ``numel × bpw`` bits
   (numel: the quantized weights of the blocks; the head is quantized at ``--head-bits`` outside
   the budget, as exllamav2 does).
4. **Quantization** (:func:`quantize_pass`): block by block again, each block's Hessians computed
   from the outputs of the already-quantized blocks before it, GPTQ with the chosen option, aimed
   at the float model's outputs (``Settings.input_error``, :mod:`exl2.model.input_error`) and
   followed by coordinate descent (``Settings.refine``, :mod:`exl2.model.refine`), the block's
   weights replaced by their decoded values before its outputs feed the next block; then the
   head, from the last block's outputs.
5. **Output** (:func:`write_output`), atomically and tensor by tensor: ``config.json`` with
   ``quantization_config``, the weights in ``output.safetensors`` (or
   ``output-0000N-of-0000M.safetensors`` shards), other files copied.

Interrupted runs resume from ``OUT.partial`` (:mod:`exl2.model.job`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import ContainerError, FormatError, UsageError
from ..format import padded_columns, row_granule
from ..io import atomic_path, open_model
from ..qmatrix import QMatrix
from ..qparams import QParams
from . import arch, calibration, centering, held, input_error, memory, offload, output, sensitivity
from .allocate import allocate
from .job import Job
from .options import HEAD_OPTIONS, OPTIONS, head_option
from .refine import SWEEPS, refined
from .source import Source, open_source

SHARD_BYTES = 8 << 30  # exllamav2's default shard size (8192 MB)
SKIP_COPY = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass
class Settings:
    src: str
    out: Path
    bpw: float
    head_bits: int = 6
    calibration: Path | None = None
    rows: int = 128  #: calibration rows for the measurement's Hessians (all of the shipped corpus's paragraphs)
    #: the first rows of those on which the measurement takes each option's error (None: all)
    error_rows: int | None = 32
    length: int = 128
    layout: str = "documents"  #: calibration.batches: "stream" or "documents"
    quant_rows: int | None = 128  #: rows for the quantization pass (None: ``rows``)
    centered: bool = True  #: centering.encode: GPTQ on the input covariance, bias corrected
    refine: int = SWEEPS  #: refine.refine: coordinate-descent sweeps after GPTQ (0: none)
    #: input_error.encode in the quantization pass: GPTQ aimed at the float model's outputs
    input_error: bool = True
    #: sensitivity.OutputProbe: each block's errors weighted by how much of them reaches the output
    sensitivity: bool = True
    measurement: Path | None = None
    device: str = "cpu"
    shard_bytes: int = SHARD_BYTES
    overwrite: bool = False
    options: tuple[QParams, ...] = field(default=OPTIONS)
    #: Read one block at a time from the checkpoint (False: load the whole model with transformers).
    streaming: bool = True
    #: Where calibration activations are kept between blocks (:mod:`exl2.model.offload`): auto,
    #: device, cpu or disk
    activations: str = "auto"


@dataclass
class Layer:
    key: str
    module: torch.nn.Linear
    block: int
    #: Indices into ``Settings.options`` of the options whose groups this layer's rows can hold.
    fits: list[int] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.module.in_features, self.module.out_features

    @property
    def bias(self) -> bool:
        return self.module.bias is not None


def fits(option: QParams, rows: int) -> bool:
    """Whether every group ``option`` cuts from ``rows`` input rows has a multiple of 32 rows (16
    for 2-bit), as spec 4.4 requires of every group, the last included: exllamav2's kernels step
    32 rows at a time. A layer of 344 rows ends in a group of 24 under any option; one of 80 rows
    fits only options whose last group is a 16-row 2-bit one. exllamav2's ``AdaptiveGPTQ.pack``
    only asserts that each group packs into whole qrows, which a 24-row 4-bit group does; here
    such options are not offered."""
    return all(n % row_granule(b) == 0 for b, _, n in option.plan(rows).groups)


def cost(option: QParams, layer: Layer) -> int:
    """Stored bits of ``layer`` with ``option``, as written (a bias padded like q_weight, spec 3.3)."""
    k, n = layer.shape
    return option.total_bits(k, n, layer.bias) + (16 * (padded_columns(n) - n) if layer.bias else 0)


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that exists here."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a device (cpu, cuda or cuda:N)") from None
    if d.type == "cpu":
        return "cpu"
    if d.type != "cuda":
        raise UsageError(f"--device {device!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: no CUDA device is available to torch here")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return str(d)


def _encoder(device: str) -> Callable:
    if device.startswith("cuda"):
        try:
            from ..fast import quantize
            return quantize
        except Exception:  # pragma: no cover - fall back to the reference
            pass
    from ..reference import quantize
    return quantize


@dataclass
class Plan:
    """What the checks established: the layers, their costs, the bit budget."""

    layers: list[Layer]
    costs: dict[str, list[int]]
    numel: int
    text: str
    #: The kind of :class:`offload.Store` the run keeps its activations in.
    activations: str = "device"


def quantize_model(s: Settings, progress=None, log: Callable[[str], None] = lambda m: None) -> dict:
    """Run every stage; returns a summary (output folder, achieved bpw, bytes, layers, allocation)."""
    progress = progress or (lambda items, total, desc: items)
    s.out = Path(s.out)
    _check_settings(s)
    text = calibration.read_text(s.calibration)
    with open_source(s.src, s.device, streaming=s.streaming) as src:
        plan = _plan(s, src, text, log)
        params = {"source": str(src.path), "options": [o.desc() for o in s.options], "bpw": s.bpw,
                  "head_bits": s.head_bits,
                  "calibration": {"rows": s.rows, "length": s.length, "layout": s.layout, "quant_rows": s.quant_rows,
                                  "error_rows": s.error_rows,
                                  "centered": s.centered, "refine": s.refine, "input_error": s.input_error,
                                  "sensitivity": s.sensitivity,
                                  "sha256": hashlib.sha256(text.encode()).hexdigest()}}
        where = _calibration_name(s)
        data = calibration.batches(src.tokenizer, text, s.rows, s.length, s.device, where, layout=s.layout)
        quant_rows = _quant_rows(s)
        quant_data = data if quant_rows == s.rows else \
            calibration.batches(src.tokenizer, text, quant_rows, s.length, s.device, where, layout=s.layout)
        given = load_measurement(s, plan.layers) if s.measurement is not None else None
        job = _job(s.out, params)
        store = offload.Store(plan.activations, s.device, job.dir / "activations")
        encode = _encoder(s.device)
        # the options are measured with GPTQ alone: coordinate descent on every option would
        # cost the measurement more than twice its time (measured on MiniLM), for a change in
        # the errors' ranking that the allocation hardly sees
        m = measure(s, src, plan, data, job, encode, progress, given, store)
        choice, alloc = allocate_bits(plan, m, s.bpw, m.get("block_weights") if s.sensitivity else None)
        log(f"allocation: {alloc.total_bits / plan.numel:.4f} bpw, error {alloc.objective:.5g} "
            f"(certified gap {alloc.gap:.2g})")
        quantize_pass(s, src, plan.layers, choice, quant_data, job, refined(encode, s.refine), progress, store)
        store.close()
        summary = write_output(s, src, plan.layers, job, m, log)
    summary.update(allocation={"objective": alloc.objective, "bound": alloc.bound,
                               "choice": {k: s.options[j].desc() for k, j in choice.items()}})
    job.remove()
    return summary


# -- 1. checks ------------------------------------------------------------------------------


def _check_settings(s: Settings) -> None:
    if not (isinstance(s.bpw, (int, float)) and 2.0 <= s.bpw <= 8.5):
        raise UsageError(f"target {s.bpw} bpw is outside 2.0..8.5")
    if s.head_bits not in HEAD_OPTIONS:
        raise UsageError(f"--head-bits must be one of {sorted(HEAD_OPTIONS)} (exllamav2's head options)")
    if s.rows < 1 or s.length < 8 or (s.error_rows is not None and s.error_rows < 1):
        raise UsageError("--rows and --error-rows must be at least 1 and --length at least 8")
    if s.activations not in ("auto", *offload.KINDS):
        raise UsageError(f"--activations must be auto, {', '.join(offload.KINDS[:-1])} or {offload.KINDS[-1]}, "
                         f"not {s.activations!r}")
    s.device = check_device(s.device)
    if s.out.exists() and not (s.overwrite and s.out.is_dir()):
        raise ContainerError("already exists; choose another output folder or pass --overwrite", file=str(s.out))
    parent = next((p for p in s.out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ContainerError("cannot be created: a parent is not a folder", file=str(s.out))


def _plan(s: Settings, src: Source, text: str, log: Callable[[str], None]) -> Plan:
    layers = [Layer(k, m, i) for i, (p, b) in enumerate(src.blocks) for k, m in arch.linears(b, p).items()]
    for layer in layers:
        layer.fits = [j for j, o in enumerate(s.options) if fits(o, layer.shape[0])]
        if not layer.fits:
            raise FormatError(f"{layer.key} has {layer.shape[0]} input rows, which no option cuts into groups of a "
                              f"multiple of 32 rows (16 for 2-bit), as EXL2 requires (spec 4.4)", file=str(src.path))
    if src.head is not None and not fits(head_option(s.head_bits), src.head[1].in_features):
        raise FormatError(f"{src.head[0]}: its {src.head[1].in_features} input rows do not fit head option "
                          f"--head-bits {s.head_bits} (groups of a multiple of 32 rows, spec 4.4)", file=str(src.path))
    numel = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    costs = {layer.key: [cost(o, layer) for o in s.options] for layer in layers}
    lo = sum(min(costs[layer.key][j] for j in layer.fits) for layer in layers) / numel
    hi = sum(max(costs[layer.key][j] for j in layer.fits) for layer in layers) / numel
    if not lo <= s.bpw <= hi:
        raise UsageError(f"target {s.bpw} bpw is outside what the options reach for this model ({lo:.2f}..{hi:.2f})")
    # before any size is estimated from them
    calibration.check_tokens(_quant_rows(s), s.length, _calibration_name(s))
    probe = sensitivity.carried_bytes(len(src.blocks), s.length, layers[0].shape[0]) if s.sensitivity else 0
    tokens = _quant_rows(s) * s.length

    def peak(offloaded: int | None = None, host: int = 0) -> memory.Estimate:
        return memory_estimate(src, tokens, s.device, s.refine > 0, s.input_error, probe, measure_tokens=s.rows * s.length,
                               offloaded=offloaded, host=host)

    on_device, off_device = peak(), peak(s.length)
    # the hidden states a pass keeps at once: a block's inputs, its outputs, the float model's
    # and their successors (the quantization pass aimed at the float model)
    kept = 4 * tokens * layers[0].shape[0] * 4
    cuda = s.device != "cpu"
    kind, why = offload.choose(s.activations, s.device, on_device.gpu if cuda else on_device.cpu,
                               off_device.gpu if cuda else off_device.cpu, kept, offload.available_bytes(s.device),
                               offload.available_bytes("cpu") if cuda else None)
    estimate = numel * s.bpw / 8 + 2 * src.numel() - 2 * numel + (kept if kind == "disk" else 0)
    free = shutil.disk_usage(next(p for p in s.out.absolute().parents if p.exists())).free
    if free < 2 * estimate:
        raise ContainerError(f"not enough disk: about {2 * estimate / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free",
                             file=str(s.out))
    if kind == "device":
        log(on_device.line())
    else:
        log((peak(s.length, kept) if kind == "cpu" and cuda else off_device).line())
        where = "in CPU memory" if kind == "cpu" else "on disk, in the job folder"
        log(f"activations: {kept / 1e9:.2f} GB kept {where}, one batch at a time on the device ({why})")
    return Plan(layers, costs, numel, text, kind)


def _calibration_name(s: Settings) -> str:
    """The calibration text as errors name it."""
    return str(s.calibration or "the default calibration text")


def _quant_rows(s: Settings) -> int:
    """Rows of the quantization pass: ``quant_rows``, never fewer than the measurement's."""
    return max(s.quant_rows or s.rows, s.rows)


def memory_estimate(src: Source, tokens: int, device: str, refine: bool = True,
                    input_error: bool = True, probe_bytes: int = 0, measure_tokens: int | None = None,
                    offloaded: int | None = None, host: int = 0) -> memory.Estimate:
    """The memory :mod:`exl2.model.memory` expects for converting ``src`` with ``tokens``
    calibration tokens (rows x length), with or without the coordinate descent, the aim at the
    float model and the output probe's carried hidden states (``probe_bytes``, while measuring on
    ``measure_tokens``); ``offloaded`` and ``host``: as :func:`memory.estimate` takes them."""
    sizes = [sum(p.numel() for p in b.parameters()) for _, b in src.blocks]
    held_bytes = max(src.block_bytes(i) for i in range(len(src.blocks)))
    blocks = [list(arch.linears(b, p).values()) for p, b in src.blocks]
    # the aim at the float model holds the decoded weights of a block's earlier linears beside
    # their float ones (4 bytes a parameter outside the linears' weights, which are held as
    # stored), except for the block's last linear (input_error.quantize_block releases them)
    before = []
    for i, ms in enumerate(blocks):
        weights = sum(m.weight.numel() for m in ms)
        per_weight = (src.block_bytes(i) - 4 * (sizes[i] - weights)) / max(1, weights)
        seen = [sum(m.weight.numel() for m in ms[:j]) for j in range(len(ms))]
        before += [0 if j == len(ms) - 1 else math.ceil(per_weight * w) for j, w in enumerate(seen)]
    linears = [m for ms in blocks for m in ms]
    shapes = [(m.in_features, m.out_features) for m in linears]
    # which linears may read the same input as another (found only by running the block): any
    # with the input width of another linear of its block
    shared = [sum(o.in_features == m.in_features for o in ms) > 1 for ms in blocks for m in ms]
    head = src.head[1] if src.head is not None else None
    outside = src.numel() - sum(sizes) - (head.weight.numel() if head is not None else 0)
    return memory.estimate(held_bytes, shapes, shapes[0][0], tokens, max(0, outside),
                           None if head is None else (head.in_features, head.out_features), device,
                           resident=0 if src.streaming else 4 * src.numel(),
                           biased=[m.bias is not None for m in linears], head_bytes=src.head_weight_bytes(),
                           refine=refine, input_error=input_error, probe_bytes=probe_bytes, shared=shared,
                           measure_tokens=measure_tokens, offloaded=offloaded, host=host, before=before)


def _job(out: Path, params: dict) -> Job:
    try:
        return Job(out, params)
    except OSError as e:
        raise ContainerError(f"cannot be written ({e.strerror})", file=str(out.with_name(out.name + ".partial"))) \
            from None


# -- 2. measurement -------------------------------------------------------------------------


def _block_layers(layers: list[Layer], i: int) -> list[Layer]:
    return [layer for layer in layers if layer.block == i]


def _model_kwargs(src: Source) -> dict:
    return {"use_cache": False} if src.causal else {}


class _Hessians:
    """The input moments (Hessian and mean) of one block, one per group of linears reading the
    same input, each computed when first asked for and dropped after its group's last linear."""

    def __init__(self, block, layers: list[Layer], inputs: calibration.BlockInputs) -> None:
        self.block, self.inputs = block, inputs
        modules = {layer.key: layer.module for layer in layers}
        self.modules = modules
        self.group = {k: tuple(g) for g in calibration.input_groups(block, modules, inputs) for k in g}
        self.cache: dict[tuple[str, ...], centering.LinearStats] = {}

    def get(self, key: str) -> centering.LinearStats:
        """The input moments of ``key``'s group: the Hessian ``E[x x^T]`` and the mean ``E[x]``."""
        g = self.group[key]
        if g not in self.cache:
            self.cache[g] = centering.LinearStats(*calibration.group_moments(self.block, self.modules[g[0]], self.inputs))
        return self.cache[g]

    def done(self, key: str, remaining: set[str]) -> None:
        g = self.group[key]
        if not remaining.intersection(g):
            self.cache.pop(g, None)


def _encode(encode: Callable, key: str, where: Path, weight: torch.Tensor, option: QParams, hessian, bias=None):
    try:
        return encode(weight, option, hessian, bias=bias)
    except ValueError as e:
        raise ContainerError(f"cannot be quantized: {e}", file=str(where), tensor=f"{key}.weight") from None


def _encode_centered(s: Settings, encode: Callable, key: str, where: Path, weight: torch.Tensor, option: QParams,
                     stats: centering.LinearStats, bias) -> QMatrix:
    """GPTQ as :func:`centering.encode` does it: a layer with a bias on its input covariance, the
    bias corrected (with ``s.centered``); otherwise on the Hessian."""
    def encoder(w, o, h, bias=None):
        return _encode(encode, key, where, w, o, h, bias)
    return centering.encode(encoder, weight, option, stats, bias, centered=s.centered)


def measure(s: Settings, src: Source, plan: Plan, data, job: Job, encode: Callable, progress,
            given: dict | None = None, store: offload.Store | None = None) -> dict:
    """Every fitting option's error for every layer (``measurement.json``: per layer ``shape``,
    ``costs`` and ``errors`` aligned with ``options``; ``null`` for an option that does not fit),
    and with ``s.sensitivity`` the blocks' weights (``block_weights``, one per block). A
    ``given`` measurement (``--measurement``) is only completed with the weights when it has
    none."""
    m = given if given is not None else job.measurement()
    if given is None:
        m.update(options=[o.desc() for o in s.options], source=str(src.path))
    todo = [i for i in range(len(src.blocks)) if any(layer.key not in m["layers"] for layer in _block_layers(plan.layers, i))]
    probe = None
    if s.sensitivity and sensitivity.check_weights(m.get("block_weights"), len(src.blocks)) is None:
        probe = sensitivity.OutputProbe()
    if not todo and probe is None:
        return m
    last = len(src.blocks) - 1 if probe is not None else todo[-1]
    with src.outside():
        inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, store, **_model_kwargs(src))
    for i in progress(range(last + 1), last + 1, "measure"):
        with src.block(i) as block:
            layers = _block_layers(plan.layers, i)
            keep = {layer.key: _probe_index(plan, layer) for layer in layers} if probe is not None else {}
            kept = {}
            if i in todo:
                kept = _measure_block(s, src, block, layers, plan, inputs, m, encode, keep)
                job.save_measurement(m)
            if probe is not None:
                _probe_block(s, src, block, layers, inputs, probe, keep, kept, encode)
            if i < last:
                inputs = calibration.run_block(block, inputs)
    if probe is not None:
        m["block_weights"] = probe.weights()
        job.save_measurement(m)
    return m


def _probe_index(plan: Plan, layer: Layer) -> int:
    """The option the output probe quantizes ``layer`` with (:func:`sensitivity.probe_option`)."""
    k, n = layer.shape
    return sensitivity.probe_option(plan.costs[layer.key], k * n, layer.fits)


def _probe_block(s, src, block, layers: list[Layer], inputs, probe: sensitivity.OutputProbe, keep: dict[str, int],
                 kept: dict[str, QMatrix], encode) -> None:
    """The probe's step through this block: its linears quantized with the probe's option (the
    encodings kept from measuring it, or made here for a block measured before a resume)."""
    missing = [layer for layer in layers if layer.key not in kept]
    if missing:
        hessians = _Hessians(block, missing, inputs)
        remaining = {layer.key for layer in missing}
        for layer in missing:
            module = layer.module
            kept[layer.key] = _encode_centered(s, encode, layer.key, src.path, module.weight, s.options[keep[layer.key]],
                                               hessians.get(layer.key), module.bias if s.centered else None)
            remaining.discard(layer.key)
            hessians.done(layer.key, remaining)

    probe.block(block, inputs, lambda: held.compute_decoded([(layer.module, kept[layer.key]) for layer in layers]))


def _measure_block(s, src, block, layers: list[Layer], plan: Plan, inputs, m: dict, encode,
                   keep: dict[str, int]) -> dict[str, QMatrix]:
    """Measures the block's layers not yet in ``m``; returns their encodings with the option
    ``keep`` names for each (the probe's)."""
    kept: dict[str, QMatrix] = {}
    # the Hessians from every row, each option's error from the first error_rows (measured on
    # MiniLM: nearly all of what 128 rows give over 32 comes from the Hessians)
    sample = inputs.first(s.error_rows)
    reference = calibration.run_block(block, sample)
    hessians = _Hessians(block, layers, inputs)
    remaining = {layer.key for layer in layers if layer.key not in m["layers"]}
    for layer in layers:
        if layer.key not in remaining:
            continue
        stats = hessians.get(layer.key)
        module = layer.module
        w = module.weight.detach().clone()
        b = None if module.bias is None else module.bias.detach().clone()
        errors: list[float | None] = [None] * len(s.options)
        for j in layer.fits:
            # without centering the bias stays as it is while measuring; with it, the corrected
            # bias is part of what is measured (exl2.model.centering)
            qm = _encode_centered(s, encode, layer.key, src.path, w, s.options[j], stats, b if s.centered else None)
            _apply(module, qm)
            errors[j] = _output_error(block, sample, reference)
            if keep.get(layer.key) == j:
                kept[layer.key] = qm
        held.put_weight(module, w)  # the next layer is measured with this one as it was
        with torch.no_grad():
            if b is not None:
                module.bias.copy_(b)
        del w, b
        m["layers"][layer.key] = {"shape": list(layer.shape), "costs": plan.costs[layer.key], "errors": errors}
        remaining.discard(layer.key)
        hessians.done(layer.key, remaining)
    return kept


def _output_error(block, inputs, reference: calibration.BlockInputs) -> float:
    """Relative squared error of the block's outputs: ``Σ ||y_q - y||² / Σ ||y||²`` over the calibration batches."""
    return sensitivity.relative_error(calibration.run_block(block, inputs), reference)


def load_measurement(s: Settings, layers: list[Layer]) -> dict:
    """A ``--measurement`` file, checked against this model and option set (any other JSON is a
    one-line error naming the file and the first entry that is wrong)."""
    path = str(s.measurement)
    try:
        m = json.loads(Path(s.measurement).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise ContainerError("is not a readable measurement.json", file=path) from None

    def bad(why: str) -> ContainerError:
        return ContainerError(f"does not match this model and option set: {why}", file=path)

    if not isinstance(m, dict) or not isinstance(m.get("layers"), dict):
        raise bad("no 'layers' object")
    if m.get("options") != [o.desc() for o in s.options]:
        raise bad("other options")
    for layer in layers:
        entry = m["layers"].get(layer.key)
        if not isinstance(entry, dict):
            raise bad(f"no {layer.key}")
        errors = entry.get("errors")
        if entry.get("shape") != list(layer.shape) or not isinstance(errors, list) or len(errors) != len(s.options):
            raise bad(f"{layer.key} has another shape or number of errors")
        if not all(_error_value(errors[j]) for j in layer.fits):
            raise bad(f"{layer.key} has an error that is not a finite number >= 0")
    blocks = 1 + max((layer.block for layer in layers), default=-1)
    if "block_weights" in m and sensitivity.check_weights(m["block_weights"], blocks) is None:
        raise bad(f"block_weights is not a list of {blocks} finite numbers >= 0, not all 0")
    return m


def _error_value(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


# -- 3. allocation --------------------------------------------------------------------------


def allocate_bits(plan: Plan, m: dict, bpw: float, block_weights: list[float] | None = None):
    """One option per layer (among those that fit it) within ``numel × bpw`` bits; each layer's
    errors multiplied by its block's weight when ``block_weights`` are given."""
    layers = plan.layers
    costs = [[plan.costs[layer.key][j] for j in layer.fits] for layer in layers]
    scale = [1.0 if block_weights is None else block_weights[layer.block] for layer in layers]
    errors = [[w * float(m["layers"][layer.key]["errors"][j]) for j in layer.fits] for layer, w in zip(layers, scale)]
    alloc = allocate(costs, errors, int(plan.numel * bpw))
    return {layer.key: layer.fits[c] for layer, c in zip(layers, alloc.choice)}, alloc


# -- 4. quantization ------------------------------------------------------------------------


#: Replace a module's weights with their decoded values, so later blocks see them.
_apply = held.put_decoded


def quantize_pass(s: Settings, src: Source, layers: list[Layer], choice: dict[str, int], data, job: Job,
                  encode: Callable, progress, store: offload.Store | None = None) -> None:
    """GPTQ with each layer's chosen option, block by block, then the head. With
    ``s.input_error`` the float model's activations are carried beside the quantized model's
    (:mod:`exl2.model.input_error`)."""
    head_done = src.head is None or job.has_layer(src.head[0])
    pending = [i for i in range(len(src.blocks)) if not all(job.has_layer(lay.key) for lay in _block_layers(layers, i))]
    last = len(src.blocks) - 1 if not head_done else (pending[-1] if pending else -1)
    if last < 0:
        return
    with src.outside():
        inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, store, **_model_kwargs(src))
    reference = inputs if s.input_error else None  # the float model's inputs of the block
    for i in progress(range(last + 1), last + 1, "quantize"):
        more = i < last or not head_done
        with src.block(i) as block:
            if reference is None:
                _quantize_block(s, src, block, _block_layers(layers, i), choice, inputs, job, encode)
            else:
                following = calibration.run_block(block, reference) if more else None  # before any weight changes
                _quantize_block_matched(s, src, block, _block_layers(layers, i), choice, inputs, reference, job, encode)
                reference = following
            if more:
                inputs = calibration.run_block(block, inputs)
    del reference
    if not head_done:
        _quantize_head(s, src, inputs, data, job, encode)


def _quantize_block(s, src, block, layers: list[Layer], choice, inputs, job: Job, encode) -> None:
    # Every Hessian of the block is taken from its weights as loaded; the decoded weights are
    # put in place only once all its layers are quantized.
    todo = [layer for layer in layers if not job.has_layer(layer.key)]
    done: dict[str, QMatrix] = {}
    if todo:
        hessians = _Hessians(block, todo, inputs)
        remaining = {layer.key for layer in todo}
        for layer in todo:
            qm = _encode_centered(s, encode, layer.key, src.path, layer.module.weight, s.options[choice[layer.key]],
                                  hessians.get(layer.key), layer.module.bias)
            done[layer.key] = qm
            job.save_layer(layer.key, done[layer.key])
            remaining.discard(layer.key)
            hessians.done(layer.key, remaining)
    for layer in layers:
        qm = done.pop(layer.key, None) or job.load_layer(layer.key, layer.shape[1])
        _apply(layer.module, qm)


def _quantize_block_matched(s, src, block, layers: list[Layer], choice, inputs, reference, job: Job, encode) -> None:
    """The block's linears aimed at the float model's outputs (:func:`input_error.quantize_block`);
    layers the job already holds are loaded, not encoded again."""
    modules = {layer.key: layer for layer in layers}

    def encode_one(key: str, stats: input_error.CrossStats) -> QMatrix:
        module = modules[key].module
        try:
            qm = input_error.encode(encode, module.weight, s.options[choice[key]], stats, module.bias,
                                    centered=s.centered)
        except ValueError as e:
            raise ContainerError(f"cannot be quantized: {e}", file=str(src.path), tensor=f"{key}.weight") from None
        job.save_layer(key, qm)
        return qm

    def saved(key: str) -> QMatrix | None:
        return job.load_layer(key, modules[key].shape[1]) if job.has_layer(key) else None

    input_error.quantize_block(block, {k: lay.module for k, lay in modules.items()}, inputs, reference, encode_one,
                               _apply, saved)


def _quantize_head(s, src, last_outputs, data, job: Job, encode) -> None:
    key, module = src.head
    with src.outside():
        h = calibration.head_hessian(src.model, src.block_list, module, last_outputs, data, **_model_kwargs(src))
    weight, bias = src.head_weights()
    job.save_layer(key, _encode(encode, key, src.path, weight, head_option(s.head_bits), h, bias))


# -- 5. output ------------------------------------------------------------------------------


class _Reader:
    """Each output tensor by name: from the job's layer files (one file open at a time), else
    from the source."""

    def __init__(self, where: dict[str, Path], src: Source) -> None:
        self.where, self.src, self.open = where, src, (None, None)

    def __call__(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            return self.src.plain_tensor(name)
        if self.open[0] != f:
            self.open = (f, open_model(f))
        return self.open[1][name]


def write_output(s: Settings, src: Source, layers: list[Layer], job: Job, measurement: dict,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    quantized = {layer.key for layer in layers} | ({src.head[0]} if src.head else set())
    entries, where = output.layer_entries(job.layer_files())
    skip = {f"{k}.{p}" for k in quantized for p in ("weight", "bias")} | set(where)
    entries += src.plain_entries(skip)
    config, notes = arch.exllamav2_config(src.config)
    for note in notes:
        log(note)
    config["quantization_config"] = {
        "quant_method": "exl2", "version": __version__, "bits": s.bpw, "head_bits": s.head_bits,
        "calibration": {"rows": s.rows, "length": s.length,
                        "dataset": Path(s.calibration).name if s.calibration else "(default)"}}
    try:
        with atomic_path(s.out, folder=True) as tmp:  # an existing folder (--overwrite) goes only once this one is in place
            output.write_shards(tmp, entries, _Reader(where, src), s.shard_bytes)
            (tmp / "config.json").write_text(json.dumps(config, indent=4))
            (tmp / "measurement.json").write_text(json.dumps(measurement, indent=1))
            for f in sorted(src.path.iterdir()):
                if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIP_COPY):
                    shutil.copy2(f, tmp / f.name)
    except OSError as e:
        raise ContainerError(f"cannot be written ({e.strerror})", file=str(s.out)) from None
    q_bits = sum(job.load_layer(layer.key, layer.shape[1]).storage_bits() for layer in layers)
    numel = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    return {"out": str(s.out), "bpw": q_bits / numel, "target_bpw": s.bpw,
            "bytes": sum(f.stat().st_size for f in s.out.glob("*.safetensors")), "layers": len(layers)}


__all__ = ["Settings", "UsageError", "fits", "quantize_model"]
