"""exl2 against exllamav2 itself: the golden fixtures that ``benchmarks/golden_fixtures.py``
wrote from exllamav2's own kernels on a GPU (``tests/golden/exllamav2/``, committed after a
device run; ``EXL2_GOLDEN_DIR`` points at another folder, as ``benchmarks/gpu.sh`` does with the
fixtures it has just written).

Per case:

- raw layers: exl2's reference packs the converter's inputs into exactly the tensors that
  exllamav2's ``pack_columns`` / ``pack_rows_4`` made (spec 5; compared byte for byte);
- every case: the reference's and the fast path's ``dequantize`` of exllamav2's tensors equal
  exllamav2's ``reconstruct`` bit for bit (spec 8.1; the fast path compiled on a GPU, else under
  Triton's interpreter on layers up to 1024 input features);
- matmul: exllamav2's ``gemm_half_q_half`` and ours (reference and fast) each within the bound of
  spec 8.2.1 of the exact product of the decoded matrix, so also within twice the bound of each
  other.

Without fixtures these tests skip, saying why. ``test_fixture_plumbing_on_the_emulation`` runs the
fixture script's ``--cpu-smoke`` mode (tests/exllamav2_emulation.py in place of exllamav2) and the
same checks on what it writes, so the format, the loading and the comparisons run on every CI run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from exl2 import QMatrix
from exl2.conformance import harness
from exl2.reference import dequantize
from exl2.reference.bounds import matmul_within_bound

from .raw_layers import RawLayer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("EXL2_GOLDEN_DIR") or ROOT / "tests" / "golden" / "exllamav2")
SCRIPT = ROOT / "benchmarks" / "golden_fixtures.py"
#: Under Triton's interpreter the fast path is checked on layers up to this many input features
#: (as in tests/test_fast.py: the two 65536-row vectors run on a GPU).
INTERPRETED_MAX_IN_FEATURES = 1024
ABSENT = (f"no golden fixtures from exllamav2 in {GOLDEN}: they are written on a GPU by benchmarks/gpu.sh "
          "(docs/performance.md, 'Ground truth from exllamav2') and committed after that run")


@dataclass
class Golden:
    """A fixture folder: its manifest and its tensors (the data file's sha256 checked)."""

    directory: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, directory: Path) -> "Golden":
        manifest = json.loads((directory / "manifest.json").read_text())
        data = directory / manifest["file"]
        assert hashlib.sha256(data.read_bytes()).hexdigest() == manifest["file_sha256"], f"{data} was changed"
        return cls(directory, manifest, load_file(str(data)))

    def cases(self) -> list[dict]:
        return self.manifest["cases"]


def _golden_case_names() -> list:
    if not (GOLDEN / "manifest.json").is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="absent")]
    return [c["name"] for c in json.loads((GOLDEN / "manifest.json").read_text())["cases"]]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def raw_layer(golden: Golden, entry: dict) -> RawLayer:
    """The converter's inputs of a raw case, as :mod:`tests.raw_layers` holds them."""
    t = {k.removeprefix(f"{entry['name']}.raw."): v for k, v in golden.tensors.items()
         if k.startswith(f"{entry['name']}.raw.")}
    return RawLayer(qweight=t["qweight"].numpy().astype(np.int16), qscale=t["qscale"].numpy().astype(np.int16),
                    qscale_max=t["qscale_max"].numpy(), qgroups=t["qgroups"].numpy(),
                    group_size={int(b): s for b, s in entry["group_size"].items()}, invperm=t["invperm"].numpy(),
                    bias=t["bias"].numpy() if "bias" in t else None)


def exllamav2_decoded(golden: Golden, entry: dict, ours: torch.Tensor) -> torch.Tensor:
    """exllamav2's reconstruct of the case; where only its sha256 was kept, ``ours`` once its
    digest matches (asserted)."""
    stored = entry["reconstruct"]
    if stored == "tensor":
        return golden.tensors[f"{entry['name']}.reconstruct"]
    digest = hashlib.sha256(ours.contiguous().numpy().tobytes()).hexdigest()
    assert digest == stored["sha256"] and list(ours.shape) == stored["shape"], \
        f"{entry['name']}: the reference's dequantize differs from exllamav2's reconstruct (sha256)"
    return ours


def layer_and_products(golden: Golden, entry: dict, tmp_path: Path) -> tuple[QMatrix, list[tuple]]:
    """The case's layer (exllamav2's tensors) and its products ``(x, y by exllamav2)``; for raw
    cases also checks that the reference packs the same tensors."""
    name = entry["name"]
    if entry["kind"] == "raw":
        prefix = f"{name}.layer"
        theirs = {k: v for k, v in golden.tensors.items() if k.startswith(prefix + ".")}
        ours = raw_layer(golden, entry).pack_by_reference().to_tensors(prefix)
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            assert same_bits(ours[key], theirs[key]), f"{key}: the reference packs other bits than exllamav2"
        qm = QMatrix.from_tensors(theirs, prefix, out_features=entry["out_features"])
        products = [(golden.tensors[f"{name}.x.{m}"], golden.tensors[f"{name}.y.{m}"]) for m in entry["m"]]
        return qm, products
    sys.path.insert(0, str(ROOT))
    from benchmarks.golden_fixtures import vector_file

    path = vector_file(tmp_path, name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["vector_sha256"], \
        f"conformance vector {name} changed since the fixtures were written: write them again on a GPU"
    data = load_file(str(path))
    from exl2.conformance.vectors import load_layer

    return load_layer(data), [(data["x"], golden.tensors[f"{name}.y"])]


def check_case(golden: Golden, entry: dict, tmp_path: Path) -> None:
    qm, products = layer_and_products(golden, entry, tmp_path)
    expected = exllamav2_decoded(golden, entry, dequantize(qm))
    for x, y_theirs in products:
        y_exact = harness.reference_product(x, expected, qm)
        assert matmul_within_bound(y_theirs[:, : qm.out_features], y_exact, x, expected, qm.bias), \
            f"{entry['name']}: exllamav2's gemm_half_q_half (M={x.shape[0]}) is outside the bound of spec 8.2.1"
    backends = [harness.load_backend("reference"), harness.load_backend("fast")]
    if backends[1].device == "cpu" and qm.in_features > INTERPRETED_MAX_IN_FEATURES:
        backends.pop()  # checked by gpu.sh's parity step, compiled
    for backend in backends:
        for x, _ in products or [(None, None)]:
            y_exact = None if x is None else harness.reference_product(x, expected, qm)
            outcome = harness.check_one_layer(backend, qm, expected, x, y_exact)
            assert outcome.dequantize is None, f"{entry['name']}, {backend.name}: {outcome.dequantize}"
            assert outcome.matmul is None, f"{entry['name']}, {backend.name}: {outcome.matmul}"


@pytest.fixture(scope="module")
def golden() -> Golden:
    return Golden.load(GOLDEN)


@pytest.mark.parametrize("name", _golden_case_names())
def test_exl2_equals_exllamav2(golden, name, tmp_path):
    (entry,) = [c for c in golden.cases() if c["name"] == name]
    check_case(golden, entry, tmp_path)


def test_fixtures_come_from_exllamav2(request):
    """Committed fixtures must be exllamav2's, not the CPU smoke run's emulation."""
    if not (GOLDEN / "manifest.json").is_file():
        pytest.skip(ABSENT)
    if GOLDEN != ROOT / "tests" / "golden" / "exllamav2":
        pytest.skip("EXL2_GOLDEN_DIR set: checking a fresh run")
    golden = request.getfixturevalue("golden")
    assert golden.manifest["source"] == "exllamav2", golden.manifest["provenance"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Golden:
    """What the fixture script's --cpu-smoke run writes (the emulation in place of exllamav2)."""
    out = tmp_path_factory.mktemp("golden-smoke")
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke"], capture_output=True,
                       text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return Golden.load(out)


def test_fixture_plumbing_on_the_emulation(smoke, tmp_path):
    """Every check above, on the smoke run's fixtures."""
    assert smoke.manifest["source"] == "emulation"
    kinds = [c["kind"] for c in smoke.cases()]
    assert "raw" in kinds and "vector" in kinds
    for entry in smoke.cases():
        check_case(smoke, entry, tmp_path)


def _flip_lowest_bit(t: torch.Tensor, index: int) -> torch.Tensor:
    t = t.clone()
    t.view(-1).view(torch.uint8)[index * t.element_size()] ^= 1
    return t


@pytest.mark.parametrize("key, message", [("reconstruct", "dequantize"), ("layer.q_weight", "packs other bits"),
                                          ("layer.q_scale", "packs other bits"), ("y.16", "exllamav2's gemm")])
def test_one_changed_value_is_found(smoke, tmp_path, key, message):
    """The checks fail on a fixture that differs in one bit (one value far off for a product)."""
    entry = next(c for c in smoke.cases() if c["kind"] == "raw" and c["m"])
    changed = Golden(smoke.directory, smoke.manifest, dict(smoke.tensors))
    name = f"{entry['name']}.{key}"
    if key.startswith("y."):
        y = changed.tensors[name].clone()
        y[3, 5] += 1.0 + y[3, 5].abs()
        changed.tensors[name] = y
    else:
        changed.tensors[name] = _flip_lowest_bit(changed.tensors[name], 7)
    with pytest.raises(AssertionError, match=message):
        check_case(changed, entry, tmp_path)
