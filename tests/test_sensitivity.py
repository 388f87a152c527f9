"""The output probe (exl2.model.sensitivity): each block's weight is the error at the last
block's outputs over the block's own, computed here by hand on chains of linear blocks."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2.model import pipeline, sensitivity
from exl2.model.calibration import BlockInputs
from exl2.model.pipeline import Settings, quantize_model
from exl2.model.sensitivity import OutputProbe, probe_option

from .tiny_models import small_options, write_model


def chain(mats: list[torch.Tensor]) -> list[torch.nn.Linear]:
    blocks = []
    for m in mats:
        lin = torch.nn.Linear(m.shape[1], m.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(m)
        blocks.append(lin)
    return blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().square().sum() / b.double().square().sum())


def run_probe(blocks, x, deltas, rows):
    probe = OutputProbe(rows)
    inputs = BlockInputs([(r,) for r in x], [{} for _ in x])
    for block, delta in zip(blocks, deltas):
        def perturb(block=block, delta=delta):
            saved = block.weight.detach().clone()
            with torch.no_grad():
                block.weight.add_(delta)

            def restore():
                with torch.no_grad():
                    block.weight.copy_(saved)
            return restore
        probe.block(block, inputs, perturb)
        with torch.no_grad():
            inputs = BlockInputs([(block(a[0]),) for a in inputs.args], inputs.kwargs)
    return probe


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(1, 3))
def test_weights_are_the_ratio_of_final_to_block_error(seed, n_blocks, rows):
    g = torch.Generator().manual_seed(seed)
    d = 6
    mats = [torch.randn(d, d, generator=g, dtype=torch.float64).float() for _ in range(n_blocks)]
    # the last block throws away half of its inputs: errors there reach the output only in part
    mats[-1][:, d // 2:] = 0
    deltas = [0.05 * torch.randn(d, d, generator=g) for _ in range(n_blocks)]
    x = [torch.randn(3, d, generator=g) for _ in range(rows + 1)]  # one row more than the probe carries
    blocks = chain(mats)
    before = [b.weight.detach().clone() for b in blocks]
    probe = run_probe(blocks, x, deltas, rows)
    assert all(torch.equal(b.weight, w) for b, w in zip(blocks, before))  # restored after each block

    # by hand, on the first `rows` rows only
    X = torch.cat(x[:rows]).double()
    raw = []
    for i in range(n_blocks):
        h = X
        for j in range(i):
            h = h @ mats[j].double().T
        y_block = h @ mats[i].double().T
        y_pert = h @ (mats[i].double() + deltas[i].double()).T
        block_err = rel(y_pert, y_block)
        f, fp = y_block, y_pert
        for j in range(i + 1, n_blocks):
            f, fp = f @ mats[j].double().T, fp @ mats[j].double().T
        raw.append(rel(fp, f) / block_err)
    want = [r / (sum(raw) / len(raw)) for r in raw]
    got = probe.weights()
    assert got == pytest.approx(want, rel=2e-2)  # the differences are carried in bfloat16
    assert sum(got) / len(got) == pytest.approx(1.0)
    assert probe.nbytes() == sensitivity.carried_bytes(n_blocks, 3, d, rows)


def test_a_block_whose_error_the_output_masks_weighs_less():
    d = 4
    keep_first = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    blocks = chain([torch.eye(d), keep_first])
    # block 0's error lies in the two coordinates block 1 drops; block 1's in those it keeps
    d0 = torch.zeros(d, d)
    d0[2:, 2:] = 0.1 * torch.eye(2)
    d1 = torch.zeros(d, d)
    d1[:2, :2] = 0.1 * torch.eye(2)
    w = run_probe(blocks, [torch.randn(5, d)], [d0, d1], rows=1).weights()
    assert w[0] == pytest.approx(0.0, abs=1e-12) and w[1] == pytest.approx(2.0)


def test_probe_option_is_nearest_four_bits():
    numel = 1000
    costs = [2500, 3900, 4200, 8000]
    assert probe_option(costs, numel, range(4)) == 1
    assert probe_option(costs, numel, [0, 2, 3]) == 2
    assert probe_option([3000, 5000], numel, [0, 1]) == 0  # a tie goes to the lower index


@pytest.mark.parametrize("value,ok", [([1.0, 2.0], True), ([0, 1], True), ([1.0], False), ([1.0, -1.0], False),
                                      ([1.0, float("nan")], False), ([True, 1.0], False), ("1,1", False),
                                      ([1.0, 1e309], False), ({"a": 1}, False), ([[1.0], 1.0], False)])
def test_check_weights(value, ok):
    assert (sensitivity.check_weights(value, 2) is not None) == ok


# -- in the pipeline ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("llama") / "src")


def run(src, out, bpw, **kw):
    return quantize_model(Settings(src=str(src), out=out, bpw=bpw, rows=4, length=32, options=small_options(), **kw))


def test_measurement_holds_the_weights_and_a_resume_in_measuring_gives_the_same_bytes(llama, tmp_path, monkeypatch):
    run(llama, tmp_path / "full", 4.0)
    full = json.loads((tmp_path / "full" / "measurement.json").read_text())
    weights = full["block_weights"]
    assert len(weights) == 2 and all(w > 0 for w in weights) and sum(weights) == pytest.approx(2.0)

    calls = {"n": 0}
    real = pipeline.Job.save_measurement

    def crash_on_second_block(self, m):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self, m)
    monkeypatch.setattr(pipeline.Job, "save_measurement", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        run(llama, tmp_path / "resumed", 4.0)
    monkeypatch.setattr(pipeline.Job, "save_measurement", real)
    run(llama, tmp_path / "resumed", 4.0)
    resumed = json.loads((tmp_path / "resumed" / "measurement.json").read_text())
    assert resumed["block_weights"] == weights  # block 0's probe encoding was made again, the same
    a, b = (tmp_path / "full" / "output.safetensors").read_bytes(), (tmp_path / "resumed" / "output.safetensors").read_bytes()
    assert a == b


def test_weighing_off_measures_no_weights_and_a_given_measurement_is_completed(llama, tmp_path):
    run(llama, tmp_path / "flat", 4.0, sensitivity=False)
    m = json.loads((tmp_path / "flat" / "measurement.json").read_text())
    assert "block_weights" not in m
    # a measurement without weights (an older file) gets them, without measuring the options again
    run(llama, tmp_path / "given", 4.0, measurement=tmp_path / "flat" / "measurement.json")
    g = json.loads((tmp_path / "given" / "measurement.json").read_text())
    assert g["layers"] == m["layers"] and len(g["block_weights"]) == 2


def test_allocation_follows_the_weights(llama, tmp_path):
    """A block weighted far above the other gets at least as many bits as without weights, and
    the other at most as many."""
    run(llama, tmp_path / "a", 4.0, sensitivity=False)
    m = json.loads((tmp_path / "a" / "measurement.json").read_text())
    costs = {k: v["costs"] for k, v in m["layers"].items()}
    bits = {}
    for name, w in (("flat", [1.0, 1.0]), ("heavy0", [100.0, 0.01])):
        m["block_weights"] = w
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(m))
        summary = run(llama, tmp_path / name, 4.0, measurement=path)
        options = [o.desc() for o in small_options()]
        choice = summary["allocation"]["choice"]
        bits[name] = [sum(costs[k][options.index(d)] for k, d in choice.items() if k.startswith(f"model.layers.{b}."))
                      for b in range(2)]
    assert bits["heavy0"][0] >= bits["flat"][0] and bits["heavy0"][1] <= bits["flat"][1]
    assert bits["heavy0"] != bits["flat"]


@pytest.mark.parametrize("bad", [[1.0], [1.0, -2.0], "x", [1.0, None]])
def test_bad_block_weights_in_a_measurement_file_fail_with_one_line(llama, tmp_path, bad):
    run(llama, tmp_path / "a", 4.0, sensitivity=False)
    m = json.loads((tmp_path / "a" / "measurement.json").read_text())
    m["block_weights"] = bad
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    from exl2.errors import ContainerError
    with pytest.raises(ContainerError, match="block_weights"):
        run(llama, tmp_path / "b", 4.0, measurement=path)
    assert not (tmp_path / "b").exists()
