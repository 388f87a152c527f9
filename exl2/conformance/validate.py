"""``validate_path``: every check of the spec over a model folder or safetensors file, streaming
one layer at a time. Never raises for bad content; raises :class:`exl2.ContainerError` only when
there is nothing to validate (missing path, no safetensors file)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from pydantic import BaseModel

from ..errors import ContainerError, Exl2Error
from ..io import DTYPES, Model, config_path, shard_files
from ..layer_rules import LAYER_TENSORS, layer_keys
from ..qmatrix import QMatrix
from ..reference import dequantize
from .config import check_float_shape, check_layer_shape, check_quantization_config, check_rope, llama_dims
from .container import ContainerCheck, check_file
from .findings import Finding, finding
from .rules import BPW_TOLERANCE, check_layer

#: Version of the JSON report (``Report``); bumped when a field changes meaning or disappears.
SCHEMA_VERSION = 1
#: Shard names exllamav2's converter writes (spec 2.2).
SHARD_NAME = re.compile(r"^output(-\d{5}-of-\d{5})?\.safetensors$")
#: Any numbered shard: NAME-NNNNN-of-MMMMM.safetensors (spec 2.2).
NUMBERED_SHARD = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")


ProgressFn = Callable[[Iterable[str], int, str], Iterator[str]]


class LayerStats(BaseModel):
    """Per-layer statistics of the decoded weights (``--deep``)."""

    key: str
    in_features: int
    out_features: int
    bpw: float
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    nonfinite: int | None = None


class Summary(BaseModel):
    errors: int
    warnings: int
    infos: int
    layers: int
    files: int
    bpw: float | None
    target_bpw: float | None
    seconds: float
    bytes: int
    layers_per_second: float
    megabytes_per_second: float


class Report(BaseModel):
    """The validator's report; ``exl2 validate --json`` prints it."""

    schema_version: int = SCHEMA_VERSION
    path: str
    files: list[str]
    ok: bool
    deep: bool
    run: bool = False
    summary: Summary
    findings: list[Finding]
    layers: list[LayerStats]


def validate_path(path: str | Path, *, deep: bool = False, progress: bool | ProgressFn = False,
                  run: bool = False) -> Report:
    """Validate a model folder or a ``.safetensors`` file (spec 2 to 7).

    Container checks come first, on header bytes only; a file failing them is never opened with
    safe_open. Layers are then read and checked one at a time (memory: about one layer). With
    ``deep``, every valid layer is decoded with the reference and checked for NaN/Inf.
    ``progress``: True for a progress bar on a terminal (:func:`exl2.cli.common.progress`), or a
    function ``progress(items, total, description)`` wrapping the layer iterator.
    Never raises for bad content; raises :class:`exl2.ContainerError` only when there is nothing
    to validate (a missing path, a folder without .safetensors files, another file type).
    With ``run``, a folder without errors is also run on a few tokens (:mod:`exl2.runtime.check`,
    needs transformers; its ContainerError when transformers cannot build the architecture)."""
    start = time.perf_counter()
    path = Path(path)
    files = shard_files(path)
    findings: list[Finding] = []
    if progress is True:
        from ..cli.common import progress as bar
        progress = bar

    checks: dict[Path, ContainerCheck] = {}
    good = []
    for f in files:
        check = checks[f] = check_file(f)
        findings += check.findings
        if check.ok:
            good.append(f)
        if path.is_dir() and not SHARD_NAME.match(f.name):
            findings.append(finding("EXL2-C008", file=str(f), message="exllamav2 writes output.safetensors or "
                                                                      "output-NNNNN-of-NNNNN.safetensors"))
    if path.is_dir():
        findings += _check_shard_set(path, files)
    good = _drop_duplicates(good, checks, findings)
    config, cfg_findings = _read_config(path)
    findings += cfg_findings
    qc = None
    if config is not None:
        qc_findings, qc = check_quantization_config(config, str(config_path(path)))
        findings += qc_findings
    if path.is_dir():
        findings += _check_index(path, files, checks)

    try:
        model = Model(path, files=good)
    except Exl2Error as e:  # only if a file changed since its container check
        findings.append(finding("EXL2-C009", file=e.file, tensor=e.tensor, message=e.message))
        model = Model(path, files=[])
    dims = llama_dims(config) if config else None
    if config is not None:
        findings += check_rope(config, str(config_path(path)))
    layers: list[LayerStats] = []
    bits = _BitCount()
    keys = layer_keys(model.tensors)
    for key in (progress(keys, len(keys), "validate") if progress else keys):
        file = str(model.tensors[model.layer_tensor_names(key)[0]].file)
        findings += _check_one_layer(model, key, file, dims, deep, layers, bits)  # a bug raises: it is no finding

    if dims is not None:
        for name, info in model.tensors.items():
            findings += check_float_shape(dims, name, info.shape, str(info.file))
    bpw = bits.stored / bits.weights if bits.weights else None
    if bpw is not None and qc is not None and abs(bpw - qc.bits) > BPW_TOLERANCE:
        excluded = f"; {bits.unsized} layer(s) whose size the headers do not give are not counted" if bits.unsized else ""
        findings.append(finding("EXL2-K005", file=str(config_path(path)),
                                message=f"layers average {bpw:.3f} bits per weight (weighted by layer size), "
                                        f"quantization_config.bits is {qc.bits}{excluded}"))

    if run and not any(f.severity == "error" for f in findings):
        from ..runtime.check import forward_findings

        findings += forward_findings(path)
    seconds = time.perf_counter() - start
    nbytes = sum(checks[f].size for f in files)
    count = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    summary = Summary(errors=count["error"], warnings=count["warning"], infos=count["info"], layers=len(keys),
                      files=len(files), bpw=bpw, target_bpw=qc.bits if qc else None, seconds=seconds, bytes=nbytes,
                      layers_per_second=len(keys) / seconds if seconds else 0.0,
                      megabytes_per_second=nbytes / 1e6 / seconds if seconds else 0.0)
    return Report(path=str(path), files=[str(f) for f in files], ok=count["error"] == 0, deep=deep, run=run,
                  summary=summary, findings=findings, layers=layers)


class _BitCount:
    """Stored bits and weights (in_features x padded out_features) of the quantized layers,
    lm_head excluded: their quotient is the average exllamav2's optimizer budgets against
    ``bits`` (spec 7.5). From the headers alone, so that a layer counts whatever rules it breaks;
    ``unsized``: layers whose headers do not give their size."""

    def __init__(self) -> None:
        self.stored = 0
        self.weights = 0
        self.unsized = 0

    def add(self, model: Model, key: str) -> None:
        if key == "lm_head":
            return
        qw, inv = model.tensors.get(key + ".q_weight"), model.tensors.get(key + ".q_invperm")
        if qw is None or inv is None or len(qw.shape) != 2 or len(inv.shape) != 1 or not qw.shape[1] * inv.shape[0]:
            self.unsized += 1
            return
        names = [key + "." + n for n in (*LAYER_TENSORS, "bias")]
        self.stored += sum(8 * _element_size(i.dtype) * math.prod(i.shape) for i in map(model.tensors.get, names) if i)
        self.weights += inv.shape[0] * qw.shape[1]


def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size() if dtype in DTYPES else 0


def _check_one_layer(model: Model, key: str, file: str, dims, deep: bool, layers: list[LayerStats],
                     bits: _BitCount) -> list[Finding]:
    """The findings of one layer: its shape against config.json, every rule of
    :func:`check_layer`, and with ``deep`` its decoded values. Every layer adds its bits to ``bits``
    (from its headers); a valid layer adds its statistics to ``layers``. Only this layer's tensors are in memory."""
    findings: list[Finding] = []
    out_features = None
    if dims is not None:
        qw, inv = model.tensors.get(key + ".q_weight"), model.tensors.get(key + ".q_invperm")
        if qw is not None and inv is not None and len(qw.shape) == 2 and len(inv.shape) == 1:
            shape_findings, out_features = check_layer_shape(dims, key, inv.shape[0], qw.shape[1], file)
            findings += shape_findings
    bits.add(model, key)
    tensors = {}
    for name in model.layer_tensor_names(key):
        try:
            tensors[name] = model[name]
        except Exl2Error as e:
            findings.append(finding("EXL2-C009", file=e.file, tensor=name, message=e.message))
    if len(tensors) < len(model.layer_tensor_names(key)):
        return findings  # a layer with unreadable tensors cannot be checked further
    layer_findings = check_layer(tensors, key, file=file, out_features=out_features)
    findings += layer_findings
    if any(f.severity == "error" for f in layer_findings):
        return findings
    qm = QMatrix.from_tensors(tensors, key, out_features=out_features)  # accepts what check_layer accepts
    stats = LayerStats(key=key, in_features=qm.in_features, out_features=qm.out_features, bpw=qm.bits_per_weight)
    if deep:
        _decode_stats(qm, stats, findings, file, key)
    layers.append(stats)
    return findings


def _drop_duplicates(files: list[Path], checks: dict[Path, ContainerCheck], findings: list[Finding]) -> list[Path]:
    """Files whose tensor names are not already in an earlier file (EXL2-C006 for the rest; spec 2.2)."""
    seen: dict[str, Path] = {}
    keep = []
    for f in files:
        names = [e.name for e in checks[f].entries]
        dup = [n for n in names if n in seen]
        for n in dup[:10]:
            findings.append(finding("EXL2-C006", file=str(f), tensor=n, message=f"is also in {seen[n].name}"))
        if not dup:
            keep.append(f)
            seen.update((n, f) for n in names)
    return keep


def _read_config(path: Path) -> tuple[dict | None, list[Finding]]:
    cfg = config_path(path)
    if not cfg.is_file():
        return None, [finding("EXL2-K002", file=str(cfg), message="config.json not found")] if path.is_dir() else []
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, [finding("EXL2-K001", file=str(cfg), message=f"is not valid JSON: {str(e).splitlines()[0][:100]}")]
    if not isinstance(data, dict):
        return None, [finding("EXL2-K001", file=str(cfg), message=f"is a JSON {type(data).__name__}, not an object")]
    return data, []


def _check_shard_set(folder: Path, files: list[Path]) -> list[Finding]:
    """Numbered shards of one name must make up their whole set, 1 .. total (spec 2.2)."""
    sets: dict[str, dict[int, set[int]]] = {}
    for f in files:
        if m := NUMBERED_SHARD.match(f.name):
            sets.setdefault(m["name"], {}).setdefault(int(m["total"]), set()).add(int(m["index"]))
    findings = []
    for name, by_total in sorted(sets.items()):
        if len(by_total) > 1:
            totals = ", ".join(f"{t:05}" for t in sorted(by_total))
            findings.append(finding("EXL2-C010", file=str(folder), message=f"{name}-*-of-* shards disagree on "
                                                                           f"how many there are ({totals})"))
            continue
        (total, present), = by_total.items()
        missing = [i for i in range(1, total + 1) if i not in present]
        for i in missing:
            findings.append(finding("EXL2-C010", file=str(folder / f"{name}-{i:05}-of-{total:05}.safetensors"),
                                    message=f"is missing: {len(present)} of the {total} shards of {name} are here"))
        for i in sorted(present - set(range(1, total + 1))):
            findings.append(finding("EXL2-C010", file=str(folder / f"{name}-{i:05}-of-{total:05}.safetensors"),
                                    message=f"is numbered beyond the {total} shards it names"))
    return findings


def _check_index(folder: Path, files: list[Path], checks: dict[Path, ContainerCheck]) -> list[Finding]:
    """``model.safetensors.index.json`` against the shards: a warning when stale (spec 2.3)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        named = set(weight_map.values())
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError, RecursionError):
        return [finding("EXL2-C007", file=str(index), message="is not a valid index file; readers ignore it")]
    missing = sorted(n for n in named if not (folder / str(n)).is_file())
    if missing:
        return [finding("EXL2-C007", file=str(index), message=f"names {len(missing)} file(s) that do not exist "
                                                              f"(e.g. {missing[0]}); stale, readers ignore it")]
    have = {e.name for f in files for e in checks[f].entries}
    if not isinstance(weight_map, dict) or set(weight_map) != have:
        return [finding("EXL2-C007", file=str(index), message="lists other tensors than the shards hold; readers ignore it")]
    return []


def _decode_stats(qm: QMatrix, stats: LayerStats, findings: list[Finding], file: str, key: str) -> None:
    b = dequantize(qm)[:, : qm.out_features].to(torch.float32)
    finite = torch.isfinite(b)
    stats.nonfinite = int((~finite).sum())
    if stats.nonfinite:
        findings.append(finding("EXL2-D001", file=file, tensor=f"{key}.q_weight",
                                message=f"{stats.nonfinite} decoded weights are NaN or Inf"))
    vals = b[finite]
    if vals.numel():
        stats.min, stats.max = float(vals.min()), float(vals.max())
        stats.mean, stats.std = float(vals.mean()), float(vals.std()) if vals.numel() > 1 else 0.0


__all__ = ["Report", "LayerStats", "Summary", "validate_path", "ContainerError"]
