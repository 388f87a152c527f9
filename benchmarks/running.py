"""Running an EXL2 model on the CPU, measured: peak RSS of ``exl2.load`` against the size of the
folder's tensors, and tokens per second of greedy generation with the reference against
``decoded_cache``, side by side in one run, on a synthetic llama of at least 1 GB of EXL2 tensors
(benchmarks/synthetic.py: written directly with random codes, not converted).

    flock /tmp/exl2-heavy.lock python benchmarks/running.py          # writes docs/results/running.json
    python benchmarks/running.py --smoke --out /tmp/x.json           # tiny model, for CI

Each measurement runs in a fresh subprocess, so that peak RSS (``ru_maxrss``) is the load's own:
the figure is the peak minus the RSS before ``exl2.load`` (torch, transformers' llama code and the
validator imported: code, not the model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time, torch, transformers
import exl2
from exl2.runtime.load import load
import exl2.conformance.validate, transformers.models.llama.modeling_llama  # code, not the model: loaded first
from transformers import LlamaForCausalLM
torch.set_num_threads(int(sys.argv[3]))
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
model = load(sys.argv[1], decoded_cache=sys.argv[2] == "cache")
load_s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"rss_before": before, "peak_before": peak_before, "peak_after_load": peak, "load_seconds": load_s}
new = int(sys.argv[4])
if new:
    ids = torch.arange(1, 9)[None]
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # prompt, first decode (fills a cache)
        t = time.perf_counter()
        o = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        gen_s = time.perf_counter() - t
    out |= {"new_tokens": int(o.shape[1] - ids.shape[1]), "generate_seconds": gen_s}
print(json.dumps(out))
"""


def child(folder: Path, mode: str, threads: int, new_tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode, str(threads), str(new_tokens)],
                       capture_output=True, text=True, env=env, timeout=3000)
    if r.returncode:
        raise SystemExit(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "running.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny model (seconds), for CI")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=4)
    args = ap.parse_args(argv)
    from benchmarks.synthetic import write_llama

    dims = dict(hidden=128, intermediate=256, layers=2, vocab=512) if args.smoke else {}
    work = Path(tempfile.mkdtemp(prefix="run-bench-"))
    try:
        folder = work / "synthetic-llama"
        tensor_bytes = write_llama(folder, **dims)
        load_only = child(folder, "reference", args.threads, 0)
        reference = child(folder, "reference", args.threads, args.new_tokens)
        cached = child(folder, "cache", args.threads, args.new_tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_peak = load_only["peak_after_load"] - load_only["rss_before"]
    ref_tps = reference["new_tokens"] / reference["generate_seconds"]
    cache_tps = cached["new_tokens"] / cached["generate_seconds"]
    result = {
        "model": {"kind": "synthetic llama, 8-bit EXL2 layers (benchmarks/synthetic.py)", **(dims or {
            "hidden": 2048, "intermediate": 5632, "layers": 20, "vocab": 32000}), "tensor_bytes": tensor_bytes},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "load": {"peak_rss_increase_bytes": load_peak, "ratio_to_tensor_bytes": load_peak / tensor_bytes,
                 "seconds": load_only["load_seconds"]},
        "generate": {"new_tokens": args.new_tokens, "reference_tokens_per_second": ref_tps,
                     "decoded_cache_tokens_per_second": cache_tps, "decoded_cache_speedup": cache_tps / ref_tps},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
