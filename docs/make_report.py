"""Reproduce docs/quantizing.md and its pictures: all-MiniLM-L6-v2 at 2.5, 3.0, 4.0, 5.0 and 6.0 bpw.

    python docs/make_report.py            (about 5 minutes on 2 CPU cores)

One measurement pass is shared by every target (``--measurement``), as a user would do.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from exl2 import QParams
from exl2.model import arch
from exl2.model.evaluate import compare, default_sentences, sentence_embeddings
from exl2.model.options import OPTIONS
from exl2.model.pipeline import Settings, quantize_model
from exl2.reference import dequantize, quantize

TARGETS = [2.5, 3.0, 4.0, 5.0, 6.0]
DOCS = Path(__file__).resolve().parent


def rtn_baseline() -> dict:
    """Uniform 4-bit round-to-nearest, groups of 128, every block linear (no Hessian)."""
    src = arch.load("example:minilm")
    sentences = default_sentences()
    base = sentence_embeddings(src.model, src.tokenizer, sentences)
    bits = numel = 0
    for prefix, block in src.blocks:
        for _, m in arch.linears(block, prefix).items():
            qm = quantize(m.weight.detach(), QParams(128, [4], [1.0]), bias=m.bias)
            bits += qm.storage_bits() - (16 * qm.bias.numel() if qm.bias is not None else 0)
            numel += m.weight.numel()
            with torch.no_grad():
                m.weight.copy_(dequantize(qm)[:, : m.out_features].T.float())
                m.bias.copy_(qm.output_bias.float())
    q = sentence_embeddings(src.model, src.tokenizer, sentences)
    cos = (base * q).sum(-1)
    return {"bpw": bits / numel, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = Path(tempfile.mkdtemp())
    rows, per_layer, measurement = [], {}, None
    for bpw in TARGETS:
        out = work / f"minilm-{bpw}"
        t0 = time.perf_counter()
        s = quantize_model(Settings(src="example:minilm", out=out, bpw=bpw, measurement=measurement))
        seconds = time.perf_counter() - t0
        if measurement is None:
            measurement = work / "measurement.json"
            shutil.copy(out / "measurement.json", measurement)
        r = compare("example:minilm", out)
        choice = s["allocation"]["choice"]
        shapes = {k: v["shape"] for k, v in json.loads((out / "measurement.json").read_text())["layers"].items()}
        descs = [o.desc() for o in OPTIONS]
        per_layer[bpw] = {k: OPTIONS[descs.index(v)].bpw(*shapes[k]) for k, v in choice.items()}
        rows.append({"target": bpw, "bpw": s["bpw"], "bytes": s["bytes"], "cosine_mean": r["cosine_mean"],
                     "cosine_min": r["cosine_min"], "seconds": seconds, "layer_errors": r["layer_errors"]})
        print(rows[-1]["target"], rows[-1]["bpw"], rows[-1]["cosine_mean"], flush=True)
    rtn = rtn_baseline()
    (DOCS / "quantizing-results.json").write_text(json.dumps({"targets": rows, "rtn_4bit_g128": rtn}, indent=1))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["bpw"] for r in rows], [r["cosine_mean"] for r in rows], "o-", label="exl2 quantize (GPTQ + allocator)")
    ax.plot([rtn["bpw"]], [rtn["cosine_mean"]], "s", color="C3", label="uniform 4-bit RTN, groups of 128")
    ax.set_xlabel("bits per weight (stored)")
    ax.set_ylabel("mean cosine similarity to float32")
    ax.set_title("all-MiniLM-L6-v2 sentence embeddings")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "quality-vs-bpw.png", dpi=120)

    keys = list(per_layer[TARGETS[0]])
    grid = [[per_layer[t][k] for t in TARGETS] for k in keys]
    fig, ax = plt.subplots(figsize=(6, 9))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(TARGETS)), [str(t) for t in TARGETS])
    ax.set_yticks(range(len(keys)), [k.replace("encoder.layer.", "L").replace("attention.", "attn.") for k in keys],
                  fontsize=6)
    ax.set_xlabel("target bpw")
    ax.set_title("bits per weight chosen per layer")
    fig.colorbar(im, ax=ax, label="bpw of the chosen option")
    fig.tight_layout()
    fig.savefig(DOCS / "bits-per-layer.png", dpi=120)

    lines = ["| target bpw | achieved bpw | output.safetensors bytes | cosine mean | cosine min | mean layer rel. Frobenius error | time (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = sum(r["layer_errors"].values()) / len(r["layer_errors"])
        lines.append(f"| {r['target']} | {r['bpw']:.3f} | {r['bytes']:,} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                     f"{err:.4f} | {r['seconds']:.0f} |")
    lines.append(f"| RTN 4-bit g128 | {rtn['bpw']:.3f} | | {rtn['cosine_mean']:.4f} | {rtn['cosine_min']:.4f} | | |")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
