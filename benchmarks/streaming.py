"""Streaming conversion benchmark: peak RSS of ``exl2 quantize`` against the source's size, and
flat in the number of blocks.

    nice -n 10 flock /tmp/exl2-heavy.lock python benchmarks/streaming.py --plain  # the runs of docs/quantizing.md
    python benchmarks/streaming.py --hidden 256 --intermediate 512 --heads 8 --kv-heads 8 --vocab 512 \
        --blocks 2,4 --no-record                                               # a quick try

The defaults are 4 and 16 blocks of llama-2-7b's shapes (7 GB of float16 at 16 blocks), with 2
calibration rows of 128 tokens in both passes: with ``--plain`` (``exl2 quantize --aim plain
--sweeps 0``, GPTQ alone) about two minutes per block on two cores; with the converter's
defaults (the aim at the float model and three sweeps of coordinate descent) about four.

    nice -n 10 flock /tmp/exl2-heavy.lock python benchmarks/streaming.py --plain --blocks 32 --add
    nice -n 10 flock /tmp/exl2-heavy.lock python benchmarks/streaming.py --blocks 2 --results streaming-defaults

add llama-2-7b's own 32 blocks to the recorded runs, and measure the defaults' peak on 2 blocks
(it does not grow with the blocks).

For each block count a synthetic llama is written to disk (random float16 weights, shard by
shard, never held whole), converted at 4.0 bpw by ``exl2 quantize`` in a child process whose
peak RSS is read with ``resource.getrusage(RUSAGE_CHILDREN)`` in a wrapper process between it and
this one (so that neither this process nor an earlier run blurs it), and deleted. The figures go
to ``docs/results/streaming.json`` and ``docs/results/streaming.md``.

By default the measurement pass is skipped with a ``--measurement`` file written here (exact
costs of every option, errors falling with the bits, so the allocation is a real one): measuring
runs every option's GPTQ on every layer, twelve times the work of the conversion itself: for the
16-block model about five hours more on two cores. ``--measure`` runs it too. Peak memory does not
depend on the number of options (they are tried one after another); the measurement pass's own
memory is covered by ``tests/test_streaming.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"

#: Run in a child: runs the command given as arguments, then prints the largest resident set of
#: its own children (the command) in KiB. The wrapper's own memory is not counted.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:])\n"
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
)


def peak_rss(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> tuple[int, int]:
    """Run ``cmd`` (its stderr to ``log``); its peak RSS in bytes and its exit code."""
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=err, text=True,
                           env=env, timeout=timeout)
    m = re.search(r"PEAK_RSS_KIB (\d+) (-?\d+)", r.stdout)
    if m is None:
        raise RuntimeError(f"no peak reported: {r.stdout[-500:]}")
    return int(m[1]) * 1024, int(m[2])


def write_llama(folder: Path, hidden: int, intermediate: int, blocks: int, heads: int, kv_heads: int,
                vocab: int, seed: int = 0, shard_bytes: int = 2 << 30) -> int:
    """A llama checkpoint of random float16 weights (std 0.02, as transformers initializes) and a
    character tokenizer; returns the bytes of its safetensors files. A causal LM, so that its head
    is quantized too, as a real llama's is."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from exl2.io import SafetensorsWriter
    from exl2.model.output import shards

    folder.mkdir(parents=True)
    head_dim = hidden // heads
    LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16").save_pretrained(folder)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(blocks):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,)),
                   (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)), (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
                   (f"{p}.mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    entries = [(n, torch.float16, s) for n, s in shapes]
    cut = shards(entries, shard_bytes)
    g = torch.Generator().manual_seed(seed)
    total = 0
    for i, shard in enumerate(cut):
        path = folder / f"model-{i + 1:05}-of-{len(cut):05}.safetensors"
        with SafetensorsWriter(path, shard) as w:
            for name, dtype, shape in shard:
                t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
                w.write(name, t.to(dtype))
        total += path.stat().st_size
    vocab_map = {chr(i + 32): i for i in range(95)} | {"<unk>": 95}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    return total


def write_measurement(src: Path, path: Path) -> None:
    """A measurement.json for ``src`` with the default options: exact costs, and errors that fall
    as 4^-bpw (so the allocator trades bits for error as with a real measurement), every block
    weighted 1."""
    from exl2.model import arch
    from exl2.model.options import OPTIONS
    from exl2.model.pipeline import Layer, cost, fits
    from exl2.model.source import open_source

    with open_source(str(src)) as s:
        layers = {}
        for i, (prefix, block) in enumerate(s.blocks):
            for key, module in arch.linears(block, prefix).items():
                layer = Layer(key, module, i)
                k, n = layer.shape
                costs = [cost(o, layer) for o in OPTIONS]
                layers[key] = {"shape": [k, n], "costs": costs,
                               "errors": [4.0 ** -(c / (k * n)) if fits(o, k) else None for o, c in zip(OPTIONS, costs)]}
        blocks = len(s.blocks)
    # flat block weights: the output probe (exl2.model.sensitivity) is part of measuring, skipped here
    path.write_text(json.dumps({"options": [o.desc() for o in OPTIONS], "layers": layers,
                                "block_weights": [1.0] * blocks}))


def block_seconds(log: Path, phase: str = "quantize") -> list[float]:
    """Seconds per block of ``phase`` from the converter's plain log lines."""
    clock = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(rf"exl2: quantize: {phase} block (\d+)/(\d+), elapsed (\d+):(\d+):(\d+)", line)
        if m:
            clock.append(int(m[3]) * 3600 + int(m[4]) * 60 + int(m[5]))
    return [b - a for a, b in zip([0] + clock, clock)]


def child_threads() -> int:
    """Torch threads of the converter: ``OMP_NUM_THREADS`` when set, else every CPU."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def convert(src: Path, out: Path, rows: int, length: int, measure: bool, work: Path, timeout: float | None = None,
            extra: tuple[str, ...] = ()) -> dict:
    # the quantization pass takes as many rows as the measurement (its default is 128)
    cmd = [sys.executable, "-m", "exl2.cli", "quantize", str(src), "-o", str(out), "-b", "4.0", "--rows", str(rows),
           "--quant-rows", str(rows), "--length", str(length), "--device", "cpu", *extra]
    if not measure:
        write_measurement(src, work / "measurement.json")
        cmd += ["--measurement", str(work / "measurement.json")]
    env = dict(os.environ, OMP_NUM_THREADS=str(child_threads()))
    log = work / f"{src.name}.log"
    t0 = time.perf_counter()
    peak, code = peak_rss(cmd, log, env, timeout)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"exl2 quantize failed ({code}): {log.read_text()[-2000:]}")
    per_block = block_seconds(log)
    from exl2.model.pipeline import memory_estimate
    from exl2.model.source import open_source

    plain = "--aim" in extra and extra[extra.index("--aim") + 1] == "plain"
    no_sweeps = "--sweeps" in extra and extra[extra.index("--sweeps") + 1] == "0"
    with open_source(str(src)) as source:
        estimate = memory_estimate(source, rows * length, "cpu", refine=not no_sweeps, input_error=not plain).cpu
        block_weights = sum(m.weight.numel() for m in source.blocks[0][1].modules() if isinstance(m, torch.nn.Linear))
    return {"peak_rss_bytes": peak, "estimate_bytes": estimate, "seconds": round(seconds, 1),
            "seconds_per_block": round(sum(per_block) / len(per_block), 1) if per_block else None,
            "block_weights": block_weights,
            "seconds_per_weight": sum(per_block) / len(per_block) / block_weights if per_block else None,
            "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


#: Shapes of the models the docs extrapolate to: hidden, intermediate, blocks, heads, kv heads, vocab.
MODELS = {"llama-2-7b": (4096, 11008, 32, 32, 32, 32000), "llama-2-70b": (8192, 28672, 80, 64, 8, 32000)}


def extrapolate(seconds_per_weight: float, options: int, rows: int, length: int) -> dict:
    """Time and memory of converting real shapes (float16 checkpoints) on this machine, from the
    measured seconds per weight of one GPTQ pass: the measurement pass runs ``options`` GPTQs per
    weight, the quantization pass one. Memory from :func:`exl2.model.memory.estimate`, with the
    default calibration (the quantization pass on 128 rows of 128 tokens; also with those
    activations on disk, ``--activations disk``) and with the benchmark's (``rows`` x ``length``
    for both passes)."""
    from exl2.model.memory import estimate
    from exl2.model.sensitivity import carried_bytes

    out = {}
    for name, (hidden, inter, blocks, heads, kv, vocab) in MODELS.items():
        head_dim = hidden // heads
        shapes = [(hidden, heads * head_dim), (hidden, kv * head_dim), (hidden, kv * head_dim),
                  (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
        weights = sum(k * n for k, n in shapes)
        per_block = seconds_per_weight * weights * (options + 1)
        source = 2 * (blocks * (weights + 2 * hidden) + 2 * vocab * hidden + hidden)

        def peak(tokens: int, plain: bool = False, offloaded: int | None = None):
            # linears' weights held in float16 (2 bytes), norms in float32 (4); plain: with
            # --aim plain --sweeps 0 (GPTQ alone, no float model carried); the output probe on, as
            # by default; q, k, v, o, gate and up read inputs as wide as another's, down does not
            return estimate(2 * weights + 4 * 2 * hidden, shapes, hidden, tokens, vocab * hidden + hidden,
                            (hidden, vocab), head_bytes=2, refine=not plain, input_error=not plain,
                            probe_bytes=carried_bytes(blocks, length, hidden), measure_tokens=tokens,
                            shared=[True] * 6 + [False], offloaded=offloaded,
                            before=[2 * sum(k * n for k, n in shapes[:j]) for j in range(6)] + [0])

        e, few, plain = peak(128 * 128), peak(rows * length), peak(128 * 128, plain=True)
        disk = peak(128 * 128, offloaded=length)  # --activations disk: one batch of each on the device
        out[name] = {"blocks": blocks, "weights_per_block": weights, "source_gb": source / 1e9,
                     "hours_per_block": per_block / 3600, "hours": blocks * per_block / 3600,
                     "quantize_pass_hours": blocks * seconds_per_weight * weights / 3600,
                     "peak_gb": e.cpu / 1e9, "block_gb": e.block / 1e9, "head_gb": e.head / 1e9,
                     "peak_over_source_pct": 100 * e.cpu / source,
                     "peak_gb_few_rows": few.cpu / 1e9, "peak_over_source_pct_few_rows": 100 * few.cpu / source,
                     "peak_gb_plain": plain.cpu / 1e9, "peak_over_source_pct_plain": 100 * plain.cpu / source,
                     "peak_gb_disk": disk.cpu / 1e9, "peak_over_source_pct_disk": 100 * disk.cpu / source}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--blocks", default="4,16", help="block counts, comma-separated")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--measure", action="store_true", help="run the measurement pass too")
    ap.add_argument("--plain", action="store_true",
                    help="convert with --aim plain --sweeps 0 (GPTQ alone: no float model carried, no coordinate descent)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stream-bench"))
    ap.add_argument("--no-record", action="store_true", help="do not write docs/results/RESULTS.*")
    ap.add_argument("--results", default="streaming", choices=["streaming", "streaming-defaults"],
                    help="the results' name under docs/results/ (streaming: the --plain runs the docs quote; "
                         "streaming-defaults: runs with the converter's defaults)")
    ap.add_argument("--add", action="store_true",
                    help="add these runs to those recorded in docs/results/RESULTS.json (same shapes and settings; "
                         "a run of the same block count is replaced) instead of recording these alone")
    ap.add_argument("--summarize", action="store_true",
                    help="only recompute the derived figures of docs/results/RESULTS.json from its runs")
    a = ap.parse_args(argv)
    if a.summarize:
        record(summarize(json.loads((RESULTS / f"{a.results}.json").read_text())), a.results)
        return 0
    shapes = {"hidden": a.hidden, "intermediate": a.intermediate, "heads": a.heads, "kv_heads": a.kv_heads,
              "vocab": a.vocab, "rows": a.rows, "length": a.length, "measured": a.measure,
              "settings": "--aim plain --sweeps 0" if a.plain else "defaults"}
    extra = ("--aim", "plain", "--sweeps", "0") if a.plain else ()
    recorded = []
    if a.add:
        old = json.loads((RESULTS / f"{a.results}.json").read_text())
        if old["shapes"] != shapes:
            ap.error(f"--add: docs/results/{a.results}.json was measured with {old['shapes']}, not {shapes}")
        recorded = old["runs"]
    runs = []
    for blocks in [int(b) for b in a.blocks.split(",")]:
        work = a.work / f"b{blocks}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            src = work / f"llama-{blocks}"
            size = write_llama(src, a.hidden, a.intermediate, blocks, a.heads, a.kv_heads, a.vocab)
            r = {"blocks": blocks, "source_bytes": size}
            r.update(convert(src, work / "out", a.rows, a.length, a.measure, work, extra=extra))
            r["peak_over_source"] = round(r["peak_rss_bytes"] / size, 4)
            runs.append(r)
            print(json.dumps(r), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    counts = {r["blocks"] for r in runs}
    runs = sorted([r for r in recorded if r["blocks"] not in counts] + runs, key=lambda r: r["blocks"])
    result = summarize({"machine": _machine(), "shapes": shapes, "runs": runs})
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if not a.no_record:
        record(result, a.results)
    return 0


def summarize(result: dict) -> dict:
    """The figures the docs quote, derived from the runs: sizes in GB, the peak against the
    source, the flatness ratio, the rate of one GPTQ pass and the extrapolation to real models."""
    from exl2.model.options import OPTIONS

    runs = result["runs"]
    for r in runs:
        r.update(source_gb=r["source_bytes"] / 1e9, peak_rss_gb=r["peak_rss_bytes"] / 1e9,
                 estimate_gb=r["estimate_bytes"] / 1e9, peak_over_source_pct=100 * r["peak_rss_bytes"] / r["source_bytes"],
                 minutes=r["seconds"] / 60)
        r["estimate_over_peak_pct"] = 100 * (r["estimate_bytes"] / r["peak_rss_bytes"] - 1)
    first, last = runs[0], runs[-1]
    for r in runs:
        r["peak_change_from_first_pct"] = 100 * (r["peak_rss_bytes"] / first["peak_rss_bytes"] - 1)
    rate = last["seconds_per_weight"]
    if last["blocks"] > first["blocks"]:
        # the source grows by one block's bytes per block, the peak does not: from how many blocks
        # of these shapes the largest peak measured is under a quarter of the source
        per_block = (last["source_bytes"] - first["source_bytes"]) / (last["blocks"] - first["blocks"])
        fixed = first["source_bytes"] - first["blocks"] * per_block
        peak = max(r["peak_rss_bytes"] for r in runs)
        blocks = max(1, math.floor((4 * peak - fixed) / per_block) + 1)
        result.update(blocks_for_quarter=blocks, source_gb_for_quarter=(fixed + blocks * per_block) / 1e9)
    shapes = result["shapes"]
    for name, (hidden, inter, blocks, heads, kv, vocab) in MODELS.items():
        if (shapes["hidden"], shapes["intermediate"], shapes["heads"], shapes["kv_heads"], shapes["vocab"]) == \
                (hidden, inter, heads, kv, vocab):
            # a real model of these shapes has more blocks; the measured peak does not grow with them
            source = extrapolate(rate, len(OPTIONS), shapes["rows"], shapes["length"])[name]["source_gb"] * 1e9
            peak = max(r["peak_rss_bytes"] for r in runs)
            result["full_model"] = {"name": name, "blocks": blocks, "source_gb": source / 1e9,
                                    "peak_over_source_pct": 100 * peak / source}
    result.update(peak_ratio_largest_to_smallest=last["peak_rss_bytes"] / first["peak_rss_bytes"],
                  peak_change_pct=100 * (last["peak_rss_bytes"] / first["peak_rss_bytes"] - 1),
                  microseconds_per_weight=rate * 1e6, options=len(OPTIONS),
                  extrapolated=extrapolate(rate, len(OPTIONS), result["shapes"]["rows"], result["shapes"]["length"]))
    return result


def record(result: dict, name: str = "streaming") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(_table(result["runs"]))


def _machine() -> dict:
    import platform

    import torch

    return {"cpu_threads": child_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__}


def _table(runs: list[dict]) -> str:
    lines = ["| blocks | source (GB) | peak RSS (GB) | estimate (GB) | peak / source | output (GB) | s per block | total (min) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['blocks']} | {r['source_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['estimate_bytes'] / 1e9:.2f} | {100 * r['peak_over_source']:.1f} % | "
                     f"{r['output_bytes'] / 1e9:.2f} | {r['seconds_per_block']} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
