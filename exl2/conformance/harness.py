"""``exl2 conformance run``: check an implementation against the vectors and random layers.

A *backend* is any object (a module, a class instance) with

- ``dequantize(qm: exl2.QMatrix) -> torch.Tensor``: float16 ``[in_features, out_features_padded]``,
  compared bit for bit with the reference (spec 8.1);
- optionally ``matmul(x, qm) -> torch.Tensor``: ``x @ B + bias``, ``[M, out_features]``, compared
  within the bound of spec 8.2.1 (:mod:`exl2.reference.bounds`);
- optionally ``load(tensors: Mapping[str, Tensor], prefix: str) -> object``: the backend's own
  reader of a layer's raw tensors (``{prefix}.q_weight`` ...). It must accept every valid layer and
  raise (any exception) for every layer that breaks a rule of severity error;
- optionally ``DEVICE`` (a string, e.g. ``"cuda"``): layers and activations are moved there
  before each call, and results brought back to the CPU.

Name one as ``reference``, ``fast`` (:mod:`exl2.fast`, on the GPU when there is one), ``MODULE``
(a module with those attributes), ``MODULE:NAME`` where NAME is a backend object or a bare
dequantize function.

What is checked, feature by feature (the rows of the table):

- every positive vector: ``dequantize`` bit for bit, under each feature the vector covers
  (``width-4``, ``padding``, ``subnormal``, ...), and ``matmul`` within the bound (row ``matmul``);
- negative vectors: a backend with ``load`` must refuse each broken layer and accept each
  positive one (row ``loader``). A backend without ``load`` only ever sees QMatrix objects, which
  exl2 builds and checks itself, so its negatives are run through exl2's validator instead (row
  ``validator``), as are the model-folder negatives, which no backend reads;
- hypothesis-generated layers (:mod:`exl2.conformance.strategies`) against the reference: rows
  ``random: dequantize``, ``random: matmul`` and, with ``load``, ``random: loader``.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ContainerError
from ..qmatrix import QMatrix

Tensors = Mapping[str, torch.Tensor]


@dataclass
class Backend:
    """An implementation under test (see the module's docstring)."""

    name: str
    dequantize: Callable[[QMatrix], torch.Tensor]
    matmul: Callable[[torch.Tensor, QMatrix], torch.Tensor] | None = None
    load: Callable[[Tensors, str], Any] | None = None
    device: str = "cpu"


def checked_load(tensors: Tensors, prefix: str) -> QMatrix:
    """exl2's own strict loader, :meth:`QMatrix.from_tensors`: it refuses a layer at the first
    error of the rule table the validator reports from (:mod:`exl2.layer_rules`). The ``load`` of
    the ``reference`` and ``fast`` backends."""
    return QMatrix.from_tensors(tensors, prefix)


def _fast_module():
    try:
        fast = importlib.import_module("exl2.fast")
        fast.interpreted  # noqa: B018 - loads the kernels: triton missing or broken shows here
        return fast
    except Exception as e:  # triton missing or broken: say so in one line
        raise ContainerError(f"backend 'fast' is not usable here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             f" (install exl2[fast], or use --backend reference)") from None


def load_backend(spec: str, device: str | None = None) -> Backend:
    """Resolve ``reference``, ``fast``, ``MODULE`` or ``MODULE:NAME`` to a :class:`Backend`.
    Raises :class:`ContainerError` (one line) when it cannot be imported, has no dequantize, or
    its device is not usable here."""
    backend = _resolve(spec, device)
    try:
        torch.empty(1, device=backend.device)
    except Exception as e:
        raise ContainerError(f"backend {spec!r}: device {backend.device!r} is not usable here: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return backend


def _resolve(spec: str, device: str | None) -> Backend:
    if spec == "reference":
        from .. import reference

        return Backend("reference", reference.dequantize, reference.matmul, checked_load, device or "cpu")
    if spec == "fast":
        fast = _fast_module()
        default = "cpu" if fast.interpreted() else "cuda"
        return Backend("fast", fast.dequantize, fast.matmul, checked_load, device or default)
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:
        raise ContainerError(f"backend {spec!r} cannot be imported: {type(e).__name__}: {e}") from None
    if attr:
        if not hasattr(target, attr):
            raise ContainerError(f"backend {spec!r}: module {module_name} has no attribute {attr}")
        target = getattr(target, attr)
        if not callable(getattr(target, "dequantize", None)):
            if not callable(target):
                raise ContainerError(f"backend {spec!r} is neither a function nor an object with dequantize()")
            return Backend(spec, target, device=device or "cpu")
    if not callable(getattr(target, "dequantize", None)):
        raise ContainerError(f"backend {spec!r} has no dequantize(qm) function")

    def optional(name: str) -> Callable | None:
        fn = getattr(target, name, None)
        return fn if callable(fn) else None

    return Backend(spec, target.dequantize, optional("matmul"), optional("load"),
                   device or str(getattr(target, "DEVICE", "cpu")))


@dataclass
class Result:
    """Outcome of one feature: counts, and a description of each failure."""

    feature: str
    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append(what)


class Results(dict[str, Result]):
    def __missing__(self, feature: str) -> Result:
        self[feature] = Result(feature)
        return self[feature]


def same_bits(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``got`` is float16 of ``expected``'s shape with the same 16-bit patterns."""
    return (got.dtype == expected.dtype == torch.float16 and got.shape == expected.shape
            and torch.equal(got.view(torch.int16), expected.view(torch.int16)))


def _difference(got: torch.Tensor | None, expected: torch.Tensor) -> str:
    if got is None:
        return "returned no tensor"
    if got.dtype != torch.float16 or got.shape != expected.shape:
        return f"returned {str(got.dtype).removeprefix('torch.')} {list(got.shape)}, expected float16 {list(expected.shape)}"
    bad = (got.view(torch.int16) != expected.view(torch.int16)).nonzero()
    k, n = bad[0].tolist()
    return (f"{len(bad)} values differ, first at [{k}, {n}]: {float(got[k, n])!r} "
            f"instead of {float(expected[k, n])!r}")


def _call(fn: Callable, *args) -> tuple[torch.Tensor | None, str]:
    """``fn(*args)`` on the CPU afterwards; an exception becomes a failure message, not a crash."""
    try:
        out = fn(*args)
    except Exception as e:
        return None, f"raised {type(e).__name__}: {str(e)[:160]}"
    return (out.detach().cpu() if isinstance(out, torch.Tensor) else None), ""


def _raises(fn: Callable, *args) -> bool:
    try:
        fn(*args)
    except Exception:
        return True
    return False


def reference_product(x: torch.Tensor, b: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """float64 ``x @ b[:, :out_features] + bias`` (the bound's ``y_ref`` for random layers)."""
    y = x.to(torch.float64) @ b[:, : qm.out_features].to(torch.float64)
    return y + qm.output_bias.to(torch.float64) if qm.bias is not None else y


@dataclass(frozen=True)
class LayerOutcome:
    """Failure messages of one layer: None where the check passed; ``matmul_run`` is False when
    the backend has no matmul or no ``x`` was given."""

    dequantize: str | None
    matmul: str | None = None
    matmul_run: bool = False


def check_one_layer(backend: Backend, qm: QMatrix, expected: torch.Tensor, x: torch.Tensor | None = None,
                    y_ref: torch.Tensor | None = None) -> LayerOutcome:
    """Run ``dequantize`` (and ``matmul`` when the backend has one and ``x`` is given) on one layer
    and compare with ``expected`` (bit for bit) and ``y_ref`` (within the bound)."""
    from ..reference.bounds import matmul_within_bound

    on_device = qm.to(backend.device) if backend.device != "cpu" else qm
    got, err = _call(backend.dequantize, on_device)
    deq = None if got is not None and same_bits(got, expected) else (err or _difference(got, expected))
    if backend.matmul is None or x is None or y_ref is None:
        return LayerOutcome(deq)
    y, err = _call(backend.matmul, x.to(backend.device), on_device)
    if y is None:
        mm: str | None = err or "matmul returned no tensor"
    elif y.shape != y_ref.shape:
        mm = f"matmul returned {list(y.shape)}, expected {list(y_ref.shape)}"
    else:
        ok = matmul_within_bound(y, y_ref, x, expected, qm.bias)
        mm = None if ok else f"matmul (M={x.shape[0]}) outside the bound of spec 8.2.1"
    return LayerOutcome(deq, mm, True)


def run(backend: Backend, vector_dir: str | Path | None = None, examples: int = 25, seed: int = 0) -> Results:
    """Check ``backend`` against the vectors in ``vector_dir`` (exported to a temporary folder when
    None) and ``examples`` hypothesis-generated layers. Returns the results per feature. Raises
    :class:`ContainerError` when the vectors cannot be read."""
    from . import vectors

    if examples > 0:  # random layers need the conformance extra: say so before any other work
        import hypothesis  # noqa: F401
    results = Results()
    with tempfile.TemporaryDirectory(prefix="exl2-vectors-") as tmp:
        directory = Path(vector_dir) if vector_dir is not None else Path(tmp) / "vectors"
        if vector_dir is None:
            vectors.export(directory)
        manifest = vectors.read_manifest(directory)
        for v in manifest["vectors"]:
            if v["kind"] == "positive":
                _positive(backend, directory, v, results)
            elif v["kind"] == "negative":
                _negative(backend, directory, v, results)
            else:
                _folder_negative(directory, v, results)
    if examples > 0:
        _random_layers(backend, examples, seed, results)
    return results


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise ContainerError(f"cannot be read as safetensors ({type(e).__name__})", file=str(path)) from None


def _positive(backend: Backend, directory: Path, v: dict, results: Results) -> None:
    t = _read(directory / v["file"])
    from .vectors import PREFIX, load_layer

    qm = load_layer(t, v["layer"]["out_features"])
    out = check_one_layer(backend, qm, t["expected"], t["x"], t["y"])
    for feature in v["features"]:
        results[feature].record(out.dequantize is None, f"{v['name']}: {out.dequantize}")
    if out.matmul_run:
        results["matmul"].record(out.matmul is None, f"{v['name']}: {out.matmul}")
    if backend.load is not None:
        layer = {k: x for k, x in t.items() if k.startswith(PREFIX + ".")}
        results["loader"].record(not _raises(backend.load, layer, PREFIX), f"{v['name']}: a valid layer was refused")


def _negative(backend: Backend, directory: Path, v: dict, results: Results) -> None:
    from .findings import CATALOGUE
    from .vectors import PREFIX, reported_codes

    t = _read(directory / v["file"])
    if backend.load is not None:
        if CATALOGUE[v["code"]].severity == "error":
            results["loader"].record(_raises(backend.load, t, PREFIX), f"{v['name']}: accepted a layer breaking {v['code']}")
        return
    reported = reported_codes(t, v["code"])
    results["validator"].record(v["code"] in reported, f"{v['name']}: exl2's validator reported {reported}")


def _folder_negative(directory: Path, v: dict, results: Results) -> None:
    from .validate import validate_path

    reported = {f.code for f in validate_path(directory / v["file"], deep=True, run=v.get("validate") == "run").findings}
    results["validator: folders"].record(v["code"] in reported, f"{v['name']}: exl2's validator reported {sorted(reported)}")


def _random_layers(backend: Backend, examples: int, seed: int, results: Results) -> None:
    """Hypothesis-generated layers: the backend against the reference (nothing is shrunk: every
    example is recorded, failing or not)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    from ..reference import dequantize
    from .findings import CATALOGUE
    from .strategies import MUTATIONS, broken_layers, layer_specs, matmul_inputs

    error_codes = sorted({m.code for m in MUTATIONS if CATALOGUE[m.code].severity == "error"})

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(spec=layer_specs(), data=st.data())
    def check(spec, data) -> None:
        qm = spec.build()
        x = data.draw(matmul_inputs(qm)) if backend.matmul is not None else None
        expected = dequantize(qm)
        y_ref = reference_product(x, expected, qm) if x is not None else None
        out = check_one_layer(backend, qm, expected, x, y_ref)
        where = f"layer {[list(g) for g in spec.groups]} x {spec.out_features} (seed {spec.seed})"
        results["random: dequantize"].record(out.dequantize is None, f"{where}: {out.dequantize}")
        if out.matmul_run:
            results["random: matmul"].record(out.matmul is None, f"{where}: {out.matmul}")
        if backend.load is not None:
            tensors, code = data.draw(broken_layers(codes=error_codes))
            results["random: loader"].record(_raises(backend.load, tensors, "layer"), f"accepted a layer breaking {code}")

    check()


def all_passed(results: Mapping[str, Result]) -> bool:
    return all(r.failed == 0 for r in results.values())


__all__ = ["Backend", "LayerOutcome", "Result", "Results", "all_passed", "check_one_layer", "checked_load", "load_backend",
           "reference_product", "run", "same_bits"]
