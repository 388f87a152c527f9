"""The Triton fast path against the reference (under Triton's interpreter without a GPU):
bit-exact dequantize, packing and codes; matmul within the spec's bound; quantize."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2 import FormatError, QParams, fast, reference
from exl2.conformance.strategies import matmul_inputs, qmatrices
from exl2.fast import gptq, ops
from exl2.fast.tuning import DEQUANT_INSTRUCTIONS_PER_WEIGHT_BUDGET, GEMV_INSTRUCTIONS_PER_WEIGHT_BUDGET, GemvConfig
from exl2.format import BLOCKS, WIDTHS, row_granule
from exl2.reference.bounds import GPTQ_MAX_ERROR_RATIO, GPTQ_MIN_CODE_AGREEMENT, hessian_weighted_error, matmul_within_bound

SMALL = dict(max_groups=3, max_group_rows=64, max_out_features=70)
#: The fast path runs compiled on a GPU when there is one (benchmarks/gpu.sh), interpreted on the CPU otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


#: The matmul paths, each called directly: ``fast.matmul`` picks one by the rows of x.
MATMUL_PATHS = {"gemv": ops.gemv, "fused": ops.fused_matmul, "dequantize+matmul": ops.dequantize_matmul,
                "reference": reference.matmul}


def dev(t):
    return t.to(DEVICE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))



def exact_product(x: torch.Tensor, qm):
    """The reference's decoded matrix and ``x @ B + bias`` in float64 (spec 6.5)."""
    b = reference.dequantize(qm)
    y = x.double() @ b[:, : qm.out_features].double()
    return b, (y + qm.output_bias.double() if qm.bias is not None else y)

@settings(max_examples=15)
@given(qm=qmatrices(**SMALL))
def test_dequantize_is_bit_exact(qm):
    assert same_bits(fast.dequantize(dev(qm)).cpu(), reference.dequantize(qm))


DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])


@settings(max_examples=10)
@given(qm=qmatrices(**SMALL), data=st.data(), dtype=DTYPES)
def test_matmul_within_bound(qm, data, dtype):
    """``fast.matmul`` as users call it (M up to 64: all three paths), on any layer and x the
    strategies draw (zero-heavy layers and activation outliers included)."""
    x = data.draw(matmul_inputs(qm, max_m=64, dtype=dtype))
    y = fast.matmul(dev(x), dev(qm)).cpu()
    b, y_ref = exact_product(x, qm)
    assert y.dtype == dtype and y.shape == (x.shape[0], qm.out_features)
    assert matmul_within_bound(y, y_ref, x, b, qm.bias)


@settings(max_examples=12)
@given(qm=qmatrices(zero_heavy=True, **SMALL), data=st.data(), path=st.sampled_from(sorted(MATMUL_PATHS)), dtype=DTYPES)
def test_every_matmul_path_within_bound_on_zero_heavy_layers_with_outliers(qm, data, path, dtype):
    """Each path called directly (GEMV, fused, dequantize + matmul, reference) where a product
    computed as ``s (sum x q - z sum x)`` leaves the bound: most weights 0 (codes at the zero
    point) and activations with outliers, so large ``x_k`` meet zero weights."""
    x = data.draw(matmul_inputs(qm, max_m=fast.GEMV_MAX_M if path == "gemv" else 64, dtype=dtype, outliers=True))
    y = MATMUL_PATHS[path](dev(x), dev(qm)).cpu()
    b, y_ref = exact_product(x, qm)
    assert y.dtype == dtype and y.shape == (x.shape[0], qm.out_features)
    assert matmul_within_bound(y, y_ref, x, b, qm.bias)


@settings(max_examples=12)
@given(qm=qmatrices(**SMALL), data=st.data(), splits=st.sampled_from([1, 2, None, 1000]), dtype=DTYPES,
       config=st.sampled_from([None, GemvConfig(block_n=32, warps=1, permute_x=True), GemvConfig(block_n=64, warps=2)]))
def test_gemv_within_bound_for_any_split(qm, data, splits, dtype, config):
    """The split-K GEMV (M <= GEMV_MAX_M) for every width, split of K into parts and launch
    configuration (columns per program narrower than the layer, x gathered or read through q_perm)."""
    x = data.draw(matmul_inputs(qm, max_m=fast.GEMV_MAX_M, dtype=dtype))
    y = ops.gemv(dev(x), dev(qm), splits, config).cpu()
    b, y_ref = exact_product(x, qm)
    assert y.dtype == dtype and y.shape == (x.shape[0], qm.out_features)
    assert matmul_within_bound(y, y_ref, x, b, qm.bias)


def test_gemv_is_deterministic():
    """Two calls, the same bits: the split-K partial sums are added in a fixed order. (Under the
    interpreter programs run one after another, so this can only fail compiled, on a GPU.)"""
    qm = dev(reference.quantize(torch.randn(40, 256), QParams(32, [6, 2], [0.5, 0.5])))
    x = dev(torch.randn(3, 256))
    assert torch.equal(ops.gemv(x, qm, 4), ops.gemv(x, qm, 4))


def hand_layer():
    """One layer with a group of every width, codes ``(row + column) mod 2^bits``, unit scales
    (scale code 15: ``(15 + 1)^2 / 256`` times a maximum of 1) and stored row ``k`` holding input
    feature ``(37 k) mod K``; and its weights worked out by hand from spec 4.5 and 6.3 (not by
    the reference): ``B[q_perm[k], n] = code[k, n] - 2^(bits - 1)``."""
    plan, row = [], 0
    for bits in WIDTHS:
        plan.append((bits, row, row_granule(bits)))
        row += row_granule(bits)
    k, n = row, 40
    r = torch.arange(k)[:, None] + torch.arange(n)[None, :]
    codes = torch.cat([r[a:a + m] % (1 << b) for b, a, m in plan])
    q_perm = torch.arange(k) * 37 % k  # 37 is prime to K (176): a permutation
    qm = reference.pack(codes, plan, torch.full((len(plan), n), 16), torch.ones(len(plan)),
                        torch.argsort(q_perm).to(torch.int32), n)
    zero = torch.tensor([1 << (b - 1) for b, _, m in plan for _ in range(m)])
    expected = torch.empty(k, n)
    expected[q_perm] = (codes - zero[:, None]).float()
    return qm, expected


def test_dequantize_reads_each_width_at_its_offsets():
    qm, expected = hand_layer()
    assert torch.equal(fast.dequantize(dev(qm)).cpu()[:, :40], expected.half())


@pytest.mark.parametrize("path", ["gemv", "fused"])
def test_products_read_each_width_at_its_offsets(path):
    """One-hot rows of x pick rows of B: each must come out exactly (the values are small integers)."""
    qm, expected = hand_layer()
    rows = MATMUL_PATHS[path]
    x = torch.eye(qm.in_features)[::7]  # input features 0, 7, 14, ...
    step = fast.GEMV_MAX_M if path == "gemv" else x.shape[0]
    for m in range(0, x.shape[0], step):
        assert torch.equal(rows(dev(x[m:m + step]), dev(qm)).cpu(), expected[::7][m:m + step])


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("path", MATMUL_PATHS)
def test_matmul_error_scales_with_the_weights_not_the_zero_point(path, bits):
    """Issue 11's case: every code at the zero point (weight 0) but one, and an activation
    outlier on a zero weight, x = [1000, 0.001, 0, ...]. The exact product is 0.001 * B[1] (B[1]
    = 1: scale nibble 15, maximum 1); spec 8.2.1 allows about 2^-9 of that. A kernel that
    computes ``s (sum x q - z sum x)`` cancels ``1000 z`` against itself and is off by float32's
    step at 1000 z (0.0078 at 8 bits)."""
    k, n = row_granule(bits), 32
    codes = torch.full((k, n), 1 << (bits - 1))
    codes[1] += 1
    qm = reference.pack(codes, [(bits, 0, k)], torch.full((1, n), 16), torch.ones(1), torch.arange(k, dtype=torch.int32),
                        n)
    x = torch.zeros(1, k)
    x[0, 0], x[0, 1] = 1000.0, 0.001
    b = reference.dequantize(qm)
    assert torch.equal(b[1], torch.ones(n, dtype=torch.float16)) and not b[[0, *range(2, k)]].any()
    y = MATMUL_PATHS[path](dev(x), dev(qm)).cpu()
    exact = x.double() @ b.double()
    assert matmul_within_bound(y, exact, x, b), (y[0, :4], exact[0, :4])


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
    """The pack kernel against spec 5.1 written out with Python integers (a block's codes as one
    little-endian bit string, cut into 32-bit words), and against the reference."""
    codes = torch.randint(0, 1 << bits, (blocks * BLOCKS[bits].rows, cols), generator=torch.Generator().manual_seed(seed))
    words = fast.pack_codes(dev(codes), bits).cpu()
    assert torch.equal(words, reference.pack_codes(codes, bits))
    assert (words.long() & 0xFFFFFFFF).T.tolist() == [spec_words(column, bits) for column in codes.T.tolist()]


def spec_words(column: list[int], bits: int) -> list[int]:
    """Spec 5.1 for one column: per block, ``S = sum c_i 2^(i b)`` and word ``w`` = bits
    ``[32 w, 32 w + 32)`` of ``S``."""
    blk, out = BLOCKS[bits], []
    for j in range(0, len(column), blk.rows):
        s = sum(c << (i * bits) for i, c in enumerate(column[j:j + blk.rows]))
        out += [(s >> (32 * w)) & 0xFFFFFFFF for w in range(blk.words)]
    return out


@settings(max_examples=12)
@given(bits=st.sampled_from(WIDTHS), seed=st.integers(0, 2**31))
def test_codes_given_scales_are_bit_exact(bits, seed):
    """The encode kernel against spec 7.3's formula written out here, and against the reference."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 37, generator=g) * 3
    scale = reference.decoded_scales(torch.randint(1, 17, (37,), generator=g), torch.tensor(0.05).half())
    # include exact ties: values at half-integers of the scale
    w[0] = (torch.arange(37) - 18.5) * scale
    codes, values = (t.cpu() for t in fast.encode_rows(dev(w), dev(scale), bits))
    # spec 7.3 in numpy: a correctly rounded float32 division, rint ties to even, clamp; the
    # value half((q - z) s), whose float32 product is exact
    z, w32, s32 = 1 << (bits - 1), w.numpy().astype(np.float32), scale.float().numpy()
    q = np.clip(np.rint(w32 / s32) + z, 0, (1 << bits) - 1)
    assert torch.equal(codes, torch.from_numpy(q.astype(np.int64)))
    assert torch.equal(values, torch.from_numpy(((q - z).astype(np.float32) * s32).astype(np.float16).astype(np.float32)))
    c2, v2 = reference.encode_rows(w, scale, bits)
    assert torch.equal(codes, c2) and torch.equal(values, v2)


@st.composite
def qparams(draw) -> QParams:
    widths = sorted(draw(st.sets(st.sampled_from(WIDTHS), min_size=1, max_size=3)), reverse=True)
    sizes = {b: draw(st.sampled_from([16, 32, 64] if b == 2 else [32, 64])) for b in widths}
    weights = [draw(st.integers(1, 4)) for _ in widths]
    return QParams(sizes, widths, [w / sum(weights) for w in weights])


@settings(max_examples=8)
@given(qp=qparams(), rows=st.integers(1, 4), cols=st.integers(1, 70), seed=st.integers(0, 2**31), bias=st.booleans())
def test_quantize_plugs_the_kernels_into_the_reference_driver(qp, rows, cols, seed, bias):
    """Plumbing: ``fast.quantize`` is the reference's driver (scale search, group plan,
    permutation, scale packing) with the fast path's encode and pack kernels plugged in, so
    q_scale, q_scale_max, q_groups, q_invperm and the bias agree by construction; only q_weight
    depends on the kernels here. The kernels' own parts are checked alone against the spec's
    formulas in test_codes_given_scales_are_bit_exact and test_packing_is_bit_exact."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cols, rows * 32, generator=g) * torch.rand(1, rows * 32, generator=g)
    b = torch.randn(cols, generator=g) if bias else None
    a, r = fast.quantize(dev(w), qp, bias=None if b is None else dev(b)).to("cpu"), reference.quantize(w, qp, bias=b)
    for name in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"):
        assert torch.equal(getattr(a, name), getattr(r, name)), name
    assert (a.bias is None) == (b is None) and (b is None or torch.equal(a.bias, r.bias))


@settings(max_examples=6)
@given(bits=st.sampled_from(WIDTHS), rows=st.sampled_from([16, 32, 64, 96]), cols=st.integers(1, 50),
       seed=st.integers(0, 2**31))
def test_gptq_group_kernel_matches_the_row_loop(bits, rows, cols, seed):
    """The per-group GPTQ kernel against the row-by-row loop of the reference's algorithm
    (codes within the GPTQ agreement bound; on the CPU interpreter they are identical). The
    scales come from the reference's search: an input here, the same for both sides."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * rows, rows, generator=g)
    u = reference.encode._inverse_hessian_factor(x.T @ x / (4 * rows))
    w = torch.randn(rows, cols, generator=g)
    scale = reference.find_scales(w, bits).scale
    codes, err = gptq.gptq_group(dev(w), dev(u), dev(scale), bits)
    saved = gptq.GPTQ_GROUP_MAX_ROWS
    gptq.GPTQ_GROUP_MAX_ROWS = 0  # force the row loop
    try:
        codes_loop, err_loop = gptq.gptq_group(dev(w), dev(u), dev(scale), bits)
    finally:
        gptq.GPTQ_GROUP_MAX_ROWS = saved
    assert (codes.cpu() == codes_loop.cpu()).double().mean() >= GPTQ_MIN_CODE_AGREEMENT
    assert torch.allclose(err.cpu(), err_loop.cpu(), rtol=1e-3, atol=1e-3 * float(scale.max()))


def test_gptq_within_bound():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 16, generator=g) @ torch.randn(16, 64, generator=g)
    h = x.T @ x / 256
    w = torch.randn(40, 64, generator=g)
    qp = QParams(32, [4, 3], [0.5, 0.5])
    a, b = fast.quantize(dev(w), qp, dev(h)).to("cpu"), reference.quantize(w, qp, h)
    # plumbing (the reference's driver on both sides): the same act-order and group plan
    assert torch.equal(a.q_invperm, b.q_invperm) and torch.equal(a.q_groups, b.q_groups)
    # the group kernel's part: equal values: equal codes; only the 40 real columns (padded ones always agree)
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


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    qm = reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0]))
    monkeypatch.setattr(ops, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="GPU tensors"):
        fast.dequantize(qm)
    with pytest.raises(RuntimeError, match="GPU tensors"):
        fast.quantize(torch.randn(40, 64), QParams(32, [4], [1.0]))


def test_bad_activations_are_refused():
    qm = dev(reference.quantize(torch.randn(40, 64), QParams(32, [4], [1.0])))
    with pytest.raises(ValueError, match="features"):
        fast.matmul(dev(torch.randn(2, 63)), qm)
    with pytest.raises(ValueError, match="float"):
        fast.matmul(dev(torch.ones(2, 64, dtype=torch.int32)), qm)
    assert fast.matmul(dev(torch.randn(0, 64)), qm).shape == (0, 40)


@pytest.mark.skipif(DEVICE == "cuda", reason="there is a GPU")
def test_backend_note_says_interpreted():
    assert "interpreter" in fast.backend_note()


def test_kernels_compile_for_a_gpu(tmp_path):
    """Every kernel compiles for sm_90 (cubin) and for ROCm's gfx942 (hsaco) in the configurations
    ops launches (ahead of time, no GPU needed): catches errors only the compiler sees, which the
    interpreter does not.
    In the compiled code no kernel spills registers, and the GEMV at M = 1 and dequantize spend
    no more instructions per 4-bit weight than the budgets that let them run near memory speed
    (tuning.*_INSTRUCTIONS_PER_WEIGHT_BUDGET; static counts, not timings). With the Triton the
    docs' figures were compiled with, the launches in use compile to exactly the counts and
    registers docs/results/compiled.json holds (so a change to the kernels must refresh them)."""
    import json
    from pathlib import Path

    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(fast.__file__).with_name("aot_check.py")
    r = subprocess.run([sys.executable, str(script), "--arch", "90", "--arch", "gfx942", "--sass", "--json", "--results",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    for arch in (90, "gfx942"):
        assert {row["kernel"] for row in rows if row["arch"] == str(arch)} == set(aot_check_kernels())
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    assert all(row["stack"] == 0 for row in rows), [row for row in rows if row["stack"]]
    rows = [row for row in rows if row["arch"] == "90"]
    gemv = {row["config"].split()[0]: row for row in rows if row["kernel"] == "gemv_kernel"}
    assert gemv["M_MAX=1"]["instructions_per_weight"]["4"] <= GEMV_INSTRUCTIONS_PER_WEIGHT_BUDGET, gemv["M_MAX=1"]
    dequantize = next(row for row in rows if row["kernel"] == "dequantize_kernel")
    assert dequantize["instructions_per_weight"]["4"] <= DEQUANT_INSTRUCTIONS_PER_WEIGHT_BUDGET, dequantize
    documented = json.loads((Path(__file__).parent.parent / "docs" / "results" / "compiled.json").read_text())
    if documented["triton"] == triton.__version__:
        now = json.loads((tmp_path / "compiled.json").read_text())["targets"]
        for target, kernels_now in now.items():
            for kernel, entry in kernels_now.items():
                assert documented["targets"][target][kernel] == entry, (target, kernel)


def aot_check_kernels() -> list[str]:
    """The kernels of exl2/fast/kernels.py (public ``*_kernel`` functions)."""
    from exl2.fast import kernels

    return [name for name in dir(kernels) if name.endswith("_kernel")]


@pytest.mark.skipif(DEVICE == "cuda", reason="the CLI decodes on the CPU")
def test_cli_fast_backend_matches_reference(tmp_path):
    from exl2.io import save_tensors

    qm = reference.quantize(torch.randn(45, 96), QParams(32, [5, 4], [0.5, 0.5]), bias=torch.randn(45))
    save_tensors(tmp_path / "m.safetensors", qm.to_tensors("layer"))
    outs = []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command opts in by itself
    for backend in ("reference", "fast"):
        out = tmp_path / f"{backend}.safetensors"
        r = subprocess.run([sys.executable, "-m", "exl2.cli", "dequantize", str(tmp_path / "m.safetensors"), "-o",
                            str(out), "--backend", backend], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
        if backend == "fast" and not torch.cuda.is_available():
            assert "interpreter" in r.stderr
    assert outs[0] == outs[1]


def test_conformance_vectors_through_the_harness():
    """The positive conformance vectors, through the harness's own check of one layer (dequantize
    bit for bit, matmul within the bound). Under the interpreter only those up to 1024 input
    features (the 16-bit-limit vectors have 65536 and run on a GPU)."""
    from exl2.conformance import harness, vectors

    backend = harness.load_backend("fast")
    ran = 0
    for v in vectors.positives():
        if DEVICE == "cpu" and v.spec.in_features > 1024:
            continue
        qm = v.spec.build()
        expected = reference.dequantize(qm)
        x = torch.randn(v.m, qm.in_features, generator=torch.Generator().manual_seed(ran)).half()
        outcome = harness.check_one_layer(backend, qm, expected, x, harness.reference_product(x, expected, qm))
        assert outcome.dequantize is None and outcome.matmul is None and outcome.matmul_run, (v.name, outcome)
        ran += 1
    assert ran >= 10
