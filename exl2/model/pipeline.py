"""``exl2 quantize``: a Hugging Face checkpoint to an EXL2 model at a target bitrate.

1. **Checks before any long work**: the source loads, the architecture has blocks of linears, the
   target is within what the options can reach, the disk has room, OUT does not exist.
2. **Measurement** (skipped with ``--measurement``): block by block, the Hessian of every linear
   from the calibration data, then every option of :data:`options.OPTIONS` quantized with GPTQ
   and put in place alone; its error is the relative squared error of the *block's* outputs on
   the calibration inputs (as exllamav2 measures at module level, so that errors of different
   layers are in the same units), and its cost the exact stored bits (``QParams.total_bits``).
3. **Allocation**: :func:`allocate.allocate` within ``numel × bpw`` bits (numel: the quantized
   weights of the blocks; the head is quantized at ``--head-bits`` outside the budget, as
   exllamav2 does).
4. **Quantization**: block by block again, each block's Hessians computed from the outputs of the
   already-quantized blocks before it, GPTQ with the chosen option, the block's weights replaced
   by their decoded values before its outputs feed the next block.
5. **Output**, atomically: ``config.json`` with ``quantization_config``, the weights in
   ``output.safetensors`` (or ``output-0000N-of-0000M.safetensors`` shards), other files copied.

Interrupted runs resume from ``OUT.partial`` (:mod:`exl2.model.job`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import ContainerError, Exl2Error
from ..io import atomic_path, save_tensors
from ..qmatrix import QMatrix
from ..qparams import QParams
from . import arch, calibration, centering
from .allocate import allocate
from .job import Job
from .options import HEAD_OPTIONS, OPTIONS, head_option

SHARD_BYTES = 8 << 30  # exllamav2's default shard size (8192 MB)
SKIP_COPY = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass
class Settings:
    src: str
    out: Path
    bpw: float
    head_bits: int = 6
    calibration: Path | None = None
    rows: int = 32
    length: int = 128
    layout: str = "documents"  #: calibration.batches: "stream" or "documents"
    quant_rows: int | None = 128  #: rows for the quantization pass (None: ``rows``)
    centered: bool = True  #: centering.encode: GPTQ on the input covariance, bias corrected
    measurement: Path | None = None
    device: str = "cpu"
    shard_bytes: int = SHARD_BYTES
    overwrite: bool = False
    options: tuple[QParams, ...] = field(default=OPTIONS)


@dataclass
class Layer:
    key: str
    module: torch.nn.Linear
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.module.in_features, self.module.out_features

    @property
    def bias(self) -> bool:
        return self.module.bias is not None


def _encoder(device: str) -> Callable:
    if device.startswith("cuda"):
        try:
            from ..fast import quantize
            return quantize
        except Exception:  # pragma: no cover - fall back to the reference
            pass
    from ..reference import quantize
    return quantize


def quantize_model(s: Settings, progress=None, log: Callable[[str], None] = lambda m: None) -> dict:
    progress = progress or (lambda items, total, desc: items)
    s.out = Path(s.out)
    if s.out.exists() and not (s.overwrite and s.out.is_dir()):
        raise ContainerError("already exists; choose another output folder or pass --overwrite", file=str(s.out))
    if not 2.0 <= s.bpw <= 8.5:
        raise Exl2Error(f"target {s.bpw} bpw is outside 2.0..8.5")
    if s.head_bits not in HEAD_OPTIONS:
        raise Exl2Error(f"--head-bits must be one of {sorted(HEAD_OPTIONS)} (exllamav2's head options)")
    text = calibration.read_text(s.calibration) if s.calibration else calibration.default_text()
    src = arch.load(s.src, s.device)
    layers = [Layer(k, m, i) for i, (p, b) in enumerate(src.blocks) for k, m in arch.linears(b, p).items()]
    numel = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    costs = {layer.key: [o.total_bits(*layer.shape, layer.bias) for o in s.options] for layer in layers}
    lo = sum(min(c) for c in costs.values()) / numel
    hi = sum(max(c) for c in costs.values()) / numel
    if not lo <= s.bpw <= hi:
        raise Exl2Error(f"target {s.bpw} bpw is outside what the options reach for this model ({lo:.2f}..{hi:.2f})")
    estimate = numel * s.bpw / 8 + 2 * sum(p.numel() for p in src.model.parameters()) - 2 * numel
    free = shutil.disk_usage(s.out.parent if s.out.parent.exists() else Path.cwd()).free
    if free < 2 * estimate:
        raise Exl2Error(f"not enough disk: about {2 * estimate / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")

    params = {"source": str(src.path), "options": [o.desc() for o in s.options], "bpw": s.bpw, "head_bits": s.head_bits,
              "calibration": {"rows": s.rows, "length": s.length, "layout": s.layout, "quant_rows": s.quant_rows,
                              "centered": s.centered, "sha256": hashlib.sha256(text.encode()).hexdigest()}}
    job = Job(s.out, params)
    data = calibration.batches(src.tokenizer, text, s.rows, s.length, s.device, layout=s.layout)
    quant_rows = max(s.quant_rows or s.rows, s.rows)  # never fewer rows than the measurement's
    quant_data = data if quant_rows == s.rows else \
        calibration.batches(src.tokenizer, text, quant_rows, s.length, s.device, layout=s.layout)
    model_kwargs = {"use_cache": False} if src.head is not None else {}
    encode = _encoder(s.device)

    measurement = _measurement(s, src, layers, costs, data, model_kwargs, job, encode, progress, log)
    keys = [layer.key for layer in layers]
    alloc = allocate([measurement["layers"][k]["costs"] for k in keys], [measurement["layers"][k]["errors"] for k in keys],
                     int(numel * s.bpw))
    choice = dict(zip(keys, alloc.choice))
    log(f"allocation: {alloc.total_bits / numel:.4f} bpw, error {alloc.objective:.5g} (certified gap {alloc.gap:.2g})")

    _quantize_pass(s, src, layers, choice, quant_data, model_kwargs, job, encode, progress)
    summary = _write_output(s, src, layers, job, measurement, text)
    summary.update(allocation={"objective": alloc.objective, "bound": alloc.bound,
                               "choice": {k: s.options[j].desc() for k, j in choice.items()}})
    job.remove()
    return summary


def _measurement(s, src, layers, costs, data, model_kwargs, job, encode, progress, log) -> dict:
    options = [o.desc() for o in s.options]
    if s.measurement is not None:
        try:
            m = json.loads(Path(s.measurement).read_text())
        except (OSError, ValueError):
            raise ContainerError("is not a readable measurement.json", file=str(s.measurement)) from None
        missing = [layer.key for layer in layers if layer.key not in m.get("layers", {})]
        if m.get("options") != options or missing:
            raise Exl2Error(f"{s.measurement}: measurement does not match this model and option set"
                            + (f" (no {missing[0]})" if missing else ""))
        return m
    m = job.measurement()
    m.update(options=options, source=str(src.path))
    todo = [i for i, (p, b) in enumerate(src.blocks)
            if any(layer.key not in m["layers"] for layer in layers if layer.block == i)]
    if todo:
        inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, **model_kwargs)
        for i, (prefix, block) in progress(list(enumerate(src.blocks)), len(src.blocks), "measure"):
            block_layers = [layer for layer in layers if layer.block == i]
            if i in todo:
                stats = centering.input_stats(block, {layer.key: layer.module for layer in block_layers}, inputs)
                reference = calibration.run_block(block, inputs).args
                for layer in block_layers:
                    if layer.key in m["layers"]:
                        continue
                    w = layer.module.weight.detach().clone()
                    bias = None if layer.module.bias is None else layer.module.bias.detach().clone()
                    errors = []
                    for opt in s.options:
                        # without centering the bias stays as it is while measuring (as on main)
                        qm = centering.encode(encode, w, opt, stats[layer.key], bias if s.centered else None,
                                              centered=s.centered)
                        _apply(layer.module, qm)
                        errors.append(_output_error(block, inputs, reference))
                    with torch.no_grad():
                        layer.module.weight.copy_(w)
                        if bias is not None:
                            layer.module.bias.copy_(bias)
                    m["layers"][layer.key] = {"shape": list(layer.shape), "costs": costs[layer.key], "errors": errors}
                job.save_measurement(m)
            if i + 1 < len(src.blocks):
                inputs = calibration.run_block(block, inputs)
    return m


def _output_error(block, inputs, reference) -> float:
    """Relative squared error of the block's outputs: ``Σ ||y_q - y||² / Σ ||y||²`` over the calibration batches."""
    out = calibration.run_block(block, inputs).args
    num = sum(float((a[0] - b[0]).to(torch.float64).square().sum()) for a, b in zip(out, reference))
    den = sum(float(b[0].to(torch.float64).square().sum()) for b in reference)
    return num / max(den, 1e-30)


def _decoded(qm: QMatrix) -> torch.Tensor:
    from ..reference import dequantize

    return dequantize(qm)[:, : qm.out_features].to(torch.float32)


def _apply(module: torch.nn.Linear, qm: QMatrix) -> None:
    """Replace the module's weights with their decoded values, so later blocks see them."""
    with torch.no_grad():
        module.weight.copy_(_decoded(qm).T.to(module.weight.device))
        if module.bias is not None and qm.bias is not None:
            module.bias.copy_(qm.bias.to(module.bias.device, torch.float32))


def _quantize_pass(s, src, layers, choice, data, model_kwargs, job, encode, progress) -> None:
    inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, **model_kwargs)
    for i, (prefix, block) in progress(list(enumerate(src.blocks)), len(src.blocks), "quantize"):
        block_layers = [layer for layer in layers if layer.block == i]
        pending = [layer for layer in block_layers if not job.has_layer(layer.key)]
        stats = centering.input_stats(block, {layer.key: layer.module for layer in pending}, inputs) if pending else {}
        for layer in block_layers:
            if job.has_layer(layer.key):
                qm = job.load_layer(layer.key, layer.shape[1])
            else:
                qm = centering.encode(encode, layer.module.weight, s.options[choice[layer.key]], stats[layer.key],
                                      layer.module.bias, centered=s.centered)
                job.save_layer(layer.key, qm)
            _apply(layer.module, qm)
        if i + 1 < len(src.blocks):
            inputs = calibration.run_block(block, inputs)
    if src.head is not None:
        key, module = src.head
        if job.has_layer(key):
            qm = job.load_layer(key, module.out_features)
        else:
            h = _head_hessian(src, module, data, model_kwargs)
            qm = encode(module.weight.detach().to(torch.float32), head_option(s.head_bits), h, bias=module.bias)
            job.save_layer(key, qm)
        _apply(module, qm)


def _head_hessian(src, module, data, model_kwargs) -> torch.Tensor:
    total = torch.zeros(module.in_features, module.in_features, device=module.weight.device)
    count = 0

    def hook(_m, args, _out):
        nonlocal count
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        total.addmm_(x.T, x)
        count += x.shape[0]

    handle = module.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for batch in data:
                src.model(**batch, **model_kwargs)
    finally:
        handle.remove()
    return total / max(count, 1)


def _write_output(s, src, layers, job, measurement, text) -> dict:
    quantized = {layer.key for layer in layers} | ({src.head[0]} if src.head else set())
    tensors: dict[str, torch.Tensor] = {}
    for f in job.layer_files():
        from ..io import open_model

        m = open_model(f)
        tensors.update({n: m[n] for n in m})
    skip = {f"{k}.{p}" for k in quantized for p in ("weight", "bias")}
    for name, t in src.model.state_dict().items():
        if name in skip or name in tensors:
            continue
        t = t.detach().cpu()
        tensors[name] = t.to(torch.float16) if t.is_floating_point() else t.contiguous()
    config = dict(src.config)
    config["quantization_config"] = {
        "quant_method": "exl2", "version": __version__, "bits": s.bpw, "head_bits": s.head_bits,
        "calibration": {"rows": s.rows, "length": s.length,
                        "dataset": Path(s.calibration).name if s.calibration else "(default)"}}
    with atomic_path(s.out) as tmp:
        tmp.unlink()
        tmp.mkdir()
        names = list(tensors)
        shards, size, current = [], 0, []
        for n in names:
            nbytes = tensors[n].numel() * tensors[n].element_size()
            if current and size + nbytes > s.shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(n)
            size += nbytes
        shards.append(current)
        for i, shard in enumerate(shards):
            fname = "output.safetensors" if len(shards) == 1 else f"output-{i + 1:05}-of-{len(shards):05}.safetensors"
            save_tensors(tmp / fname, {n: tensors[n] for n in shard})
        (tmp / "config.json").write_text(json.dumps(config, indent=4))
        (tmp / "measurement.json").write_text(json.dumps(measurement, indent=1))
        for f in sorted(src.path.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIP_COPY):
                shutil.copy2(f, tmp / f.name)
        if s.out.exists():  # --overwrite: the old folder goes only once the new one is complete
            shutil.rmtree(s.out)
    q_bits = sum(QMatrix.from_tensors(tensors, layer.key, out_features=layer.shape[1]).storage_bits() for layer in layers)
    numel = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    return {"out": str(s.out), "bpw": q_bits / numel, "target_bpw": s.bpw,
            "bytes": sum(f.stat().st_size for f in s.out.glob("*.safetensors")), "layers": len(layers)}


__all__ = ["Settings", "quantize_model"]
