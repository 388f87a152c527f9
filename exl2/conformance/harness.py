"""``exl2 conformance run``: check an implementation against the vectors and random layers.

A backend is anything with ``dequantize(qm: QMatrix) -> Tensor`` (float16 ``[K, N']``) and,
optionally, ``matmul(x, qm) -> Tensor`` (``[M, N]``). Name one as ``reference``, ``fast``,
``MODULE`` (a module with those functions) or ``MODULE:FUNCTION`` (a dequantize function).

Positive vectors check dequantize bit for bit and matmul within the spec's bound. Negative
vectors check the validator (``exl2.conformance.rules``) reports their code; a backend's own
input checks are its own business, but it must not accept them silently if it validates.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ContainerError
from ..qmatrix import QMatrix
from ..reference import dequantize as ref_dequantize
from ..reference.bounds import matmul_within_bound
from . import vectors


@dataclass
class Backend:
    name: str
    dequantize: Callable[[QMatrix], torch.Tensor]
    matmul: Callable[[torch.Tensor, QMatrix], torch.Tensor] | None = None


def load_backend(spec: str) -> Backend:
    """Resolve ``reference``, ``fast``, ``MODULE`` or ``MODULE:FUNCTION``."""
    target = {"reference": "exl2.reference", "fast": "exl2.fast"}.get(spec, spec)
    module_name, _, func = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ContainerError(f"backend {spec!r} cannot be imported: {type(e).__name__}: {e}") from None
    if func:
        fn = getattr(module, func, None)
        if not callable(fn):
            raise ContainerError(f"backend {spec!r}: {module_name} has no function {func}")
        return Backend(spec, fn)
    if not callable(getattr(module, "dequantize", None)):
        raise ContainerError(f"backend {spec!r}: module has no dequantize(qm) function")
    mm = getattr(module, "matmul", None)
    return Backend(spec, module.dequantize, mm if callable(mm) else None)


@dataclass
class Result:
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


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float16 and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _call(fn: Callable, *args) -> tuple[torch.Tensor | None, str]:
    try:
        out = fn(*args)
        return (out.detach().cpu() if isinstance(out, torch.Tensor) else None), ""
    except Exception as e:  # the backend's failure is a test failure, not a crash
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def run(backend: Backend, vector_dir: Path | None = None, examples: int = 25, seed: int = 0) -> dict[str, Result]:
    """Run the suite; returns results per feature."""
    results: dict[str, Result] = defaultdict(lambda: Result(""))

    def res(feature: str) -> Result:
        r = results[feature]
        r.feature = feature
        return r

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(vector_dir) if vector_dir else Path(tmp) / "vectors"
        if vector_dir is None:
            vectors.export(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        for v in manifest["vectors"]:
            if v["kind"] == "negative-folder":
                from .validate import validate_path

                codes = {f.code for f in validate_path(directory / v["file"], deep=True).findings}
                res(f"negative:{v['code']}").record(v["code"] in codes, f"{v['name']}: validator reported {sorted(codes)}")
                continue
            t = load_file(directory / v["file"])
            if v["kind"] == "negative":
                from .rules import check_layer

                codes = {f.code for f in check_layer(t, vectors.PREFIX) if f.severity == "error"}
                res(f"negative:{v['code']}").record(codes == {v["code"]}, f"{v['name']}: validator reported {sorted(codes)}")
                continue
            qm = vectors.load_layer(t, v["layer"]["out_features"])
            got, err = _call(backend.dequantize, qm)
            ok = got is not None and same_bits(got, t["expected"])
            for feature in v["features"]:
                res(feature).record(ok, f"{v['name']}: {err or 'dequantized values differ'}")
            if backend.matmul is not None:
                y, err = _call(backend.matmul, t["x"], qm)
                ok = y is not None and y.shape == t["y"].shape and matmul_within_bound(
                    y, t["y"], t["x"], t["expected"], qm.bias)
                res("matmul").record(ok, f"{v['name']}: {err or 'matmul outside the bound'}")
        if examples > 0:
            _random_layers(backend, examples, seed, res)
    return dict(results)


def _random_layers(backend: Backend, examples: int, seed: int, res) -> None:
    """Hypothesis-generated layers: the backend against the reference."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .strategies import qmatrices

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(qm=qmatrices(), m=st.integers(1, 64), xseed=st.integers(0, 2**31 - 1))
    def check(qm: QMatrix, m: int, xseed: int) -> None:
        got, err = _call(backend.dequantize, qm)
        res("random-layers").record(got is not None and same_bits(got, ref_dequantize(qm)),
                                    err or f"layer {[(g.bits, g.rows) for g in qm.groups]} x {qm.out_features} differs")
        if backend.matmul is not None:
            x = torch.randn(m, qm.in_features, generator=torch.Generator().manual_seed(xseed)).half()
            y, err = _call(backend.matmul, x, qm)
            b = ref_dequantize(qm)
            y_ref = x.double() @ b[:, : qm.out_features].double()
            if qm.bias is not None:
                y_ref = y_ref + qm.bias.double()
            res("random-matmul").record(y is not None and matmul_within_bound(y, y_ref, x, b, qm.bias),
                                        err or f"matmul M={m} outside the bound")

    check()


def all_passed(results: dict[str, Result]) -> bool:
    return all(r.failed == 0 for r in results.values())


__all__ = ["Backend", "Result", "all_passed", "load_backend", "run", "same_bits"]
