"""Batch-1 decode speed on a GPU: an EXL2 model through ``exl2.load`` (Exl2Linear on the fast path)
against the same model in float16 (every layer decoded into a plain transformers model), side by
side in one run, on a synthetic llama (benchmarks/synthetic.py).

    python benchmarks/gpu_generate.py --out OUT.md [--layers 8] [--new-tokens 64]
    python benchmarks/gpu_generate.py --cpu-smoke --out OUT.md   # tiny model on the CPU, for CI
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def float16_twin(exl2_model, device: str):
    """The same network with plain nn.Linear layers holding the decoded float16 weights."""
    import transformers

    from exl2.nn import Exl2Linear
    from exl2.reference import dequantize

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in exl2_model.config.to_dict().items()
                                               if k != "quantization_config"})
    twin = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    twin.load_state_dict({k: v for k, v in exl2_model.state_dict().items() if not k.rsplit(".", 1)[1].startswith("q_")},
                         strict=False)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in exl2_model.named_modules():
            if isinstance(m, Exl2Linear):
                qm = m.qmatrix.to("cpu")
                modules[name].weight.copy_(dequantize(qm)[:, : m.out_features].T)
    return twin.to(device).eval()


def decode_rate(model, device: str, new_tokens: int) -> float:
    ids = torch.arange(1, 9, device=device)[None]
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up (compiles kernels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (reference path)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    import exl2
    from benchmarks.synthetic import write_llama

    if args.cpu_smoke:
        device, dims, new = "cpu", dict(hidden=128, intermediate=256, layers=2, vocab=512), 3
    else:
        if not torch.cuda.is_available():
            print("gpu_generate.py: no GPU (use --cpu-smoke to exercise the script)", file=sys.stderr)
            return 2
        device, dims, new = "cuda", dict(layers=args.layers), args.new_tokens
    with tempfile.TemporaryDirectory(prefix="run-gpu-gen-") as tmp:
        folder = Path(tmp) / "synthetic"
        tensor_bytes = write_llama(folder, **dims)
        model = exl2.load(folder, device=device)
        twin = float16_twin(model, device)
        rates = {"exl2": decode_rate(model, device, new), "float16": decode_rate(twin, device, new)}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    lines = [f"# Batch-1 decode, EXL2 against float16 ({name})", "",
             f"synthetic llama {json.dumps(dims)}, {tensor_bytes:,} bytes of EXL2 tensors, {new} new tokens", "",
             "| model | tokens/s |", "|---|---:|",
             f"| exl2.load (Exl2Linear) | {rates['exl2']:.2f} |", f"| float16 (nn.Linear) | {rates['float16']:.2f} |", "",
             f"ratio exl2 / float16: {rates['exl2'] / rates['float16']:.3f}", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
