"""The Triton fast path against the reference (under Triton's interpreter without a GPU):
bit-exact dequantize, packing and codes; matmul within the spec's bound; quantize."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2 import FormatError, QParams, fast, reference
from exl2.conformance.strategies import matmul_inputs, qmatrices
from exl2.format import BLOCKS, WIDTHS
from exl2.reference.bounds import GPTQ_MAX_ERROR_RATIO, GPTQ_MIN_CODE_AGREEMENT, hessian_weighted_error, matmul_within_bound

SMALL = dict(max_groups=3, max_group_rows=64, max_out_features=70)
#: The fast path runs compiled on a GPU when there is one (benchmarks/gpu.sh), interpreted on the CPU otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dev(t):
    return t.to(DEVICE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@settings(max_examples=15)
@given(qm=qmatrices(**SMALL))
def test_dequantize_is_bit_exact(qm):
    assert same_bits(fast.dequantize(dev(qm)).cpu(), reference.dequantize(qm))


@settings(max_examples=10)
@given(qm=qmatrices(**SMALL), data=st.data(), dtype=st.sampled_from([torch.float16, torch.float32]))
def test_matmul_within_bound(qm, data, dtype):
    x = data.draw(matmul_inputs(qm, max_m=64, dtype=dtype))
    y = fast.matmul(dev(x), dev(qm)).cpu()
    b = reference.dequantize(qm)
    y_ref = x.double() @ b[:, : qm.out_features].double()
    if qm.bias is not None:
        y_ref = y_ref + qm.bias.double()
    assert y.dtype == dtype and y.shape == (x.shape[0], qm.out_features)
    assert matmul_within_bound(y, y_ref, x, b, qm.bias)


@pytest.mark.parametrize("m", [1, 3, 5, 33])  # GEMV, fused kernel, dequantize + torch.matmul
def test_matmul_paths_and_batch_shape(m):
    qm = reference.quantize(torch.randn(40, 64), QParams(32, [5, 3], [0.5, 0.5]), bias=torch.randn(40))
    x = torch.randn(2, m, 64).half()
    y = fast.matmul(dev(x), dev(qm)).cpu()
    assert y.shape == (2, m, 40)
    assert matmul_within_bound(y.reshape(-1, 40), reference.matmul(x.reshape(-1, 64).float(), qm).double(),
                               x.reshape(-1, 64), reference.dequantize(qm), qm.bias)


@settings(max_examples=12)
@given(bits=st.sampled_from(WIDTHS), blocks=st.integers(1, 3), cols=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_packing_is_bit_exact(bits, blocks, cols, seed):
    codes = torch.randint(0, 1 << bits, (blocks * BLOCKS[bits].rows, cols), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(fast.pack_codes(dev(codes), bits).cpu(), reference.pack_codes(codes, bits))


@settings(max_examples=12)
@given(bits=st.sampled_from(WIDTHS), seed=st.integers(0, 2**31))
def test_codes_given_scales_are_bit_exact(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 37, generator=g) * 3
    scale = reference.decoded_scales(torch.randint(1, 17, (37,), generator=g), torch.tensor(0.05).half())
    # include exact ties: values at half-integers of the scale
    w[0] = (torch.arange(37) - 18.5) * scale
    c1, v1 = (t.cpu() for t in fast.encode_rows(dev(w), dev(scale), bits))
    c2, v2 = reference.encode_rows(w, scale, bits)
    assert torch.equal(c1, c2) and torch.equal(v1, v2)


@pytest.mark.parametrize("qp", [QParams(32, [4], [1.0]), QParams({6: 32, 3: 32, 2: 16}, [6, 3, 2], [0.2, 0.4, 0.4])])
def test_round_to_nearest_quantize_matches(qp):
    w = torch.randn(45, 96, generator=torch.Generator().manual_seed(3))
    a, b = fast.quantize(dev(w), qp, bias=torch.ones(45)).to("cpu"), reference.quantize(w, qp, bias=torch.ones(45))
    for name in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_gptq_within_bound():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 16, generator=g) @ torch.randn(16, 64, generator=g)
    h = x.T @ x / 256
    w = torch.randn(40, 64, generator=g)
    qp = QParams(32, [4, 3], [0.5, 0.5])
    a, b = fast.quantize(dev(w), qp, dev(h)).to("cpu"), reference.quantize(w, qp, h)
    assert torch.equal(a.q_invperm, b.q_invperm) and torch.equal(a.q_groups, b.q_groups)
    # equal values: equal codes; only the 40 real columns (padded ones always agree)
    agree = (reference.dequantize(a)[:, :40] == reference.dequantize(b)[:, :40]).double().mean()
    assert agree >= GPTQ_MIN_CODE_AGREEMENT
    ea = hessian_weighted_error(w.T, reference.dequantize(a)[:, :40], h)
    eb = hessian_weighted_error(w.T, reference.dequantize(b)[:, :40], h)
    assert ea <= eb * GPTQ_MAX_ERROR_RATIO


def test_malformed_input_is_refused_before_launch():
    qm = reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0]), bias=torch.randn(40))
    qm.q_weight[:, 40:] = 0  # padded codes that decode to non-zero: EXL2-S003
    with pytest.raises(FormatError, match="EXL2-S003"):
        fast.dequantize(dev(qm))


@pytest.mark.skipif(DEVICE == "cuda", reason="the CLI decodes on the CPU")
def test_cli_fast_backend_matches_reference(tmp_path):
    from exl2.io import save_tensors

    qm = reference.quantize(torch.randn(45, 96), QParams(32, [5, 4], [0.5, 0.5]), bias=torch.randn(45))
    save_tensors(tmp_path / "m.safetensors", qm.to_tensors("layer"))
    outs = []
    for backend in ("reference", "fast"):
        out = tmp_path / f"{backend}.safetensors"
        r = subprocess.run([sys.executable, "-m", "exl2.cli", "dequantize", str(tmp_path / "m.safetensors"), "-o",
                            str(out), "--backend", backend], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
        if backend == "fast" and not torch.cuda.is_available():
            assert "interpreter" in r.stderr
    assert outs[0] == outs[1]


@pytest.mark.skipif(DEVICE == "cuda", reason="the harness passes CPU layers")
def test_conformance_run_fast_backend():
    r = subprocess.run([sys.executable, "-m", "exl2.cli", "conformance", "run", "--backend", "fast", "--examples", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
