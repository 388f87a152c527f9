"""Streaming conversion: the same bytes as loading the whole model, one block in memory at a time,
and peak RSS flat in the number of blocks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from exl2.io import open_model
from exl2.model import calibration, pipeline
from exl2.model.pipeline import Settings, quantize_model
from exl2.model.source import StreamingSource, open_source

from .tiny_models import small_options, write_model

ROOT = Path(__file__).resolve().parent.parent


def convert(src, out, streaming: bool, bpw: float = 4.0, **kw) -> dict:
    return quantize_model(Settings(src=str(src), out=out, bpw=bpw, rows=4, length=32, options=small_options(),
                                   streaming=streaming, **kw))


def same_folders(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "measurement.json":  # it names the source folder, which is the same here anyway
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "measurement.json").read_text()) == json.loads((b / "measurement.json").read_text())


@pytest.mark.parametrize("family, dtype, config", [
    ("llama", torch.float32, {}),
    ("llama", torch.bfloat16, {"tie_word_embeddings": True}),
    ("qwen2", torch.float16, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 40}),
], ids=["llama-f32", "llama-tied-bf16", "qwen2-bias-f16"])
def test_streaming_writes_the_bytes_of_the_eager_loader(tmp_path, family, dtype, config):
    src = write_model(tmp_path / "src", family, dtype, **config)
    convert(src, tmp_path / "eager", streaming=False)
    convert(src, tmp_path / "stream", streaming=True)
    same_folders(tmp_path / "eager", tmp_path / "stream")


@pytest.mark.slow
def test_streaming_minilm_equals_eager(tmp_path):
    from exl2.qparams import QParams

    options = (QParams(32, [4], [1.0]), QParams(128, [8], [1.0]))
    for streaming in (False, True):
        quantize_model(Settings(src="example:minilm", out=tmp_path / str(streaming), bpw=5.0, rows=2, length=32,
                                options=options, streaming=streaming))
    same_folders(tmp_path / "False", tmp_path / "True")


def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch):
    """Every parameter the streaming source loads is released before the next block is loaded,
    and nothing is left loaded at the end."""
    src = write_model(tmp_path / "src", num_hidden_layers=4)
    live: set[str] = set()
    most: list[int] = []
    load, release = StreamingSource._load, StreamingSource._release

    def tracked_load(self, names):
        load(self, names)
        live.update(names)
        blocks = {n.split(".")[2] for n in live if n.startswith("model.layers.")}
        outside = [n for n in live if not n.startswith("model.layers.")]
        assert len(blocks) <= 1 and not (blocks and outside), sorted(live)
        most.append(len(blocks))

    def tracked_release(self, names):
        release(self, names)
        live.difference_update(names)

    monkeypatch.setattr(StreamingSource, "_load", tracked_load)
    monkeypatch.setattr(StreamingSource, "_release", tracked_release)
    convert(src, tmp_path / "out", streaming=True)
    assert not live and max(most) == 1
    # the measurement pass and the quantization pass each load every block once
    assert most.count(1) == 2 * 4


def test_source_loads_one_block_as_the_eager_model_holds_it(tmp_path):
    """The same values as the eager model's float32 ones: linear weights in the checkpoint's
    bfloat16 (upcast while each runs), the rest in float32; the block's outputs the same bits."""
    src = write_model(tmp_path / "src", dtype=torch.bfloat16)
    eager = open_source(str(src), streaming=False)
    x = torch.randn(1, 8, eager.config["hidden_size"])
    with open_source(str(src)) as lazy:
        assert all(p.device.type == "meta" for p in lazy.model.parameters())
        with lazy.block(1) as block:
            ours = dict(block.named_parameters())
            theirs = dict(eager.blocks[1][1].named_parameters())
            assert ours.keys() == theirs.keys()
            for name, p in ours.items():
                linear = name.endswith("proj.weight")
                assert p.dtype == (torch.bfloat16 if linear else torch.float32), name
                assert torch.equal(p.to(torch.float32), theirs[name]), name
            assert lazy.block_bytes(1) == sum(p.numel() * p.element_size() for p in ours.values())
            inputs = calibration.first_block_inputs(eager.model, eager.blocks[0][1],
                                                    [{"input_ids": torch.arange(8)[None]}], **pipeline._model_kwargs(eager))
            assert torch.equal(calibration.run_block(block, inputs).args[0][0],
                               calibration.run_block(eager.blocks[1][1], inputs).args[0][0])
        assert all(p.device.type == "meta" for p in lazy.blocks[1][1].parameters())


def test_a_checkpoint_tensor_of_the_wrong_shape_is_named(tmp_path):
    from exl2.errors import ContainerError
    from exl2.io import save_tensors

    src = write_model(tmp_path / "src")
    f = next(src.glob("*.safetensors"))
    m = open_model(f)
    tensors = {n: m[n] for n in m}
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :8].contiguous()
    del m
    save_tensors(f, tensors)
    with pytest.raises(ContainerError) as e:
        open_source(str(src))
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and f.name in str(e.value)


def test_resume_after_interruption_gives_the_same_bytes_streaming(tmp_path, monkeypatch):
    src = write_model(tmp_path / "src")
    convert(src, tmp_path / "full", streaming=True)
    real = pipeline.Job.save_layer
    calls = {"n": 0}

    def crash_after_nine(self, key, qm):
        real(self, key, qm)
        calls["n"] += 1
        if calls["n"] == 9:  # in the second block
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Job, "save_layer", crash_after_nine)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "resumed", streaming=True)
    monkeypatch.setattr(pipeline.Job, "save_layer", real)
    convert(src, tmp_path / "resumed", streaming=True)
    same_folders(tmp_path / "full", tmp_path / "resumed")


def test_progress_prints_one_line_per_block_when_not_a_terminal(tmp_path):
    from exl2.model.progress import log_lines

    lines: list[str] = []
    ticks = iter(range(0, 1000, 10))
    wrap = log_lines(lines.append, now=lambda: float(next(ticks)))
    assert list(wrap(range(3), 3, "measure")) == [0, 1, 2]
    assert lines == ["quantize: measure block 1/3, elapsed 0:00:10, ETA 0:00:20",
                     "quantize: measure block 2/3, elapsed 0:00:20, ETA 0:00:10",
                     "quantize: measure block 3/3, elapsed 0:00:30, ETA 0:00:00"]


@pytest.mark.slow
def test_peak_rss_is_flat_in_the_number_of_blocks(tmp_path):
    """4 and 16 blocks of the same shapes, each converted by ``exl2 quantize`` in its own process:
    peak RSS within 10 %. Twelve more blocks held as loaded (float16 linears) would add about 20 %
    here."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.streaming import convert as bench_convert
    from benchmarks.streaming import write_llama

    hidden, vocab = 768, 512
    peaks = {}
    for blocks in (4, 16):
        work = tmp_path / f"b{blocks}"
        work.mkdir()
        src = work / "src"
        size = write_llama(src, hidden=hidden, intermediate=1536, blocks=blocks, heads=8, kv_heads=8, vocab=vocab)
        r = bench_convert(src, work / "out", rows=1, length=16, measure=False, work=work, timeout=900)
        peaks[blocks] = r["peak_rss_bytes"]
        block_held = (size - 2 * 2 * vocab * hidden) / blocks  # float16 on disk, as the source holds a block
    assert 12 * block_held > 0.15 * peaks[4]  # the test can see twelve blocks held at once
    assert peaks[16] <= 1.10 * peaks[4], peaks
