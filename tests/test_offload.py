"""Calibration activations held off the device (``--activations cpu|disk``): the same output
bytes, the hidden states really kept in files and never all in memory, and ``auto``'s choice."""

from __future__ import annotations

import gc

import pytest
import torch

from exl2.model import calibration, offload, pipeline
from exl2.model.pipeline import Settings, quantize_model

from .test_streaming import same_folders
from .tiny_models import small_options, write_model


def convert(src, out, **kw) -> dict:
    return quantize_model(Settings(src=str(src), out=out, bpw=4.0, rows=4, length=32, options=small_options(), **kw))


@pytest.mark.parametrize("kind", ["disk", "cpu"])
def test_offloaded_activations_give_the_same_bytes(tmp_path, kind):
    src = write_model(tmp_path / "src", "qwen2", torch.float16, num_attention_heads=4, num_key_value_heads=2, head_dim=40)
    convert(src, tmp_path / "device", activations="device")
    convert(src, tmp_path / kind, activations=kind)
    same_folders(tmp_path / "device", tmp_path / kind)
    assert not (tmp_path / f"{kind}.partial").exists()


def test_disk_store_keeps_hidden_states_in_files_until_no_sequence_holds_them(tmp_path):
    store = offload.Store("disk", "cpu", tmp_path / "acts")
    batches = store.batches()
    tensors = [torch.randn(1, 5, 8) for _ in range(3)]
    mask = torch.ones(1, 5)
    for t in tensors:
        batches.append((t, mask))
    files = sorted((tmp_path / "acts").iterdir())
    assert len(files) == 3 and all(e.tensor is None for e in batches._entries)
    for (h, m), t in zip(batches, tensors):
        assert torch.equal(h, t) and h is not t and m is mask
    head = batches[:2]
    assert len(head) == 2 and torch.equal(head[1][0], tensors[1]) and torch.equal(batches[-1][0], tensors[2])
    del batches
    gc.collect()
    assert sorted((tmp_path / "acts").iterdir()) == files[:2]  # the slice still holds the first two
    del head
    gc.collect()
    assert list((tmp_path / "acts").iterdir()) == []
    store.close()
    assert not (tmp_path / "acts").exists()


def test_a_new_disk_store_clears_what_a_crashed_run_left(tmp_path):
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "00000000.safetensors").write_bytes(b"left over")
    offload.Store("disk", "cpu", tmp_path / "acts")
    assert list((tmp_path / "acts").iterdir()) == []


def test_run_block_keeps_outputs_as_its_inputs_are_kept(tmp_path):
    store = offload.Store("disk", "cpu", tmp_path / "acts")
    block = torch.nn.Linear(8, 8)
    inputs = calibration.BlockInputs(store.batches(), [{}, {}])
    for _ in range(2):
        inputs.args.append((torch.randn(1, 3, 8),))
    out = calibration.run_block(block, inputs)
    assert isinstance(out.args, offload.Batches) and len(list((tmp_path / "acts").iterdir())) == 4
    with torch.no_grad():
        for (y,), (x,) in zip(out.args, inputs.args):
            assert torch.equal(y, block(x))


def test_the_device_never_holds_all_batches_at_once(tmp_path, monkeypatch):
    """During a whole conversion with ``disk``, at most a few batches' hidden states are loaded at a time."""
    live: set[int] = set()
    most = [0]
    real = offload._Entry.load

    def load(self, device):
        args = real(self, device)
        key = id(args[0])
        live.add(key)
        most[0] = max(most[0], len(live))
        import weakref
        weakref.finalize(args[0], live.discard, key)
        return args

    monkeypatch.setattr(offload._Entry, "load", load)
    src = write_model(tmp_path / "src")
    quantize_model(Settings(src=str(src), out=tmp_path / "out", bpw=4.0, rows=12, length=32, quant_rows=12,
                            options=small_options(), activations="disk"))
    assert 0 < most[0] <= 6  # 12 rows: a handful of batches at once, never all of them


def test_auto_offloads_only_when_the_peak_would_not_fit():
    assert offload.choose("auto", "cpu", 10, 5, 4, available=20, cpu_available=None)[0] == "device"
    assert offload.choose("auto", "cpu", 10, 5, 4, available=None, cpu_available=None)[0] == "device"
    assert offload.choose("auto", "cpu", 10, 5, 4, available=8, cpu_available=None)[0] == "disk"
    assert offload.choose("auto", "cpu", 10, 10, 4, available=8, cpu_available=None)[0] == "device"  # no gain
    assert offload.choose("auto", "cuda", 10, 5, 4, available=8, cpu_available=100)[0] == "cpu"
    assert offload.choose("auto", "cuda", 10, 5, 4, available=8, cpu_available=2)[0] == "disk"
    assert offload.choose("disk", "cpu", 10, 5, 4, available=100, cpu_available=None)[0] == "disk"


def test_the_estimate_counts_one_batch_when_offloaded():
    from exl2.model import memory

    shapes = [(64, 64), (64, 256), (256, 64)]
    full = memory.estimate(10_000, shapes, 64, 4096, 1000, (64, 500))
    one = memory.estimate(10_000, shapes, 64, 4096, 1000, (64, 500), offloaded=32)
    assert full.block - one.block == 3 * (4096 - 32) * 64 * 4
    gpu = memory.estimate(10_000, shapes, 64, 4096, 1000, (64, 500), device="cuda", offloaded=32, host=123)
    assert gpu.cpu == memory.BASE_BYTES + 123 and gpu.gpu == one.peak


def test_auto_is_logged_and_a_bad_kind_refused(tmp_path, monkeypatch):
    src = write_model(tmp_path / "src")
    monkeypatch.setattr(offload, "available_bytes", lambda device: 1)  # nothing fits
    lines: list[str] = []
    quantize_model(Settings(src=str(src), out=tmp_path / "out", bpw=4.0, rows=2, length=32, options=small_options()),
                   log=lines.append)
    assert any(line.startswith("activations: ") and "on disk" in line for line in lines)
    with pytest.raises(pipeline.UsageError, match="--activations"):
        convert(src, tmp_path / "bad", activations="swap")
