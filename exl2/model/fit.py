"""``exl2 fit``: the largest bits per weight at which a model fits a GPU.

Memory = quantized linears + head + unquantized tensors + KV cache + overhead, each counted from
the format (spec 7.5) rather than a rule of thumb:

- **Quantized linears** (q, k, v, o, gate, up, down of every layer): ``numel x bpw / 8`` bytes.
  ``bpw`` is the converter's target, which counts *stored* bits (codes, scales, group table,
  permutation) per weight, so this is exact for a file that meets its target; padding of
  out_features to 32 is added.
- **Head** (``lm_head``) at ``head_bits``: the exact stored bits of exllamav2's head option for it
  (``qparams_headoptions``, :data:`exl2.model.options.HEAD_OPTIONS`)
  (``QParams.total_bits``), unless the embeddings are tied and there is no separate head.
- **Unquantized** tensors in float16: embeddings, and the norms (2 per layer and a final one).
- **KV cache**: ``2 x layers x kv_heads x head_dim x context x bits / 8`` (batch 1); 8- and 4-bit
  caches add one float16 scale per 32 values, as exllamav2's quantized caches store them
  (``exllamav2/cache.py``, ``shape_s``), and one layer's float16 K and V, the buffers they are
  dequantized into (``temp_tensors``, ``shape_basic``).
- **Overhead**: a fixed 0.5 GiB (CUDA context, cuBLAS workspace, allocator slack; ``--overhead``
  changes it) plus the scratch exllamav2 itself reserves for a forward pass of ``min(context, 2048)``
  tokens (its ``max_input_len``), see :func:`scratch_bytes`.

VRAM sizes: ``24GB``, ``24GiB`` and ``24G`` all mean 24 x 2^30 bytes (cards sold as "24 GB" have
24 GiB); ``MB``/``MiB`` mean 2^20.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ContainerError, UsageError
from ..format import padded_columns
from .options import head_option

GIB = 1 << 30
#: Largest model dimension, VRAM and overhead read: far beyond any model or GPU, small enough that
#: every figure stays an exact float.
MAX_DIM = 1 << 31
MAX_BYTES = 1 << 50  # 1 PiB
OVERHEAD_FIXED = GIB // 2
#: exllamav2's defaults: tokens per forward chunk (``max_input_len``), largest dequantized matrix
#: (``max_dq_size``, elements), attention-weights budget (``max_attention_size``).
CHUNK = 2048
MAX_DQ = 512 * 2**20
MAX_ATTENTION = 2048**2

#: Public facts about well-known llama-family models (config.json values).
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}


@dataclass(frozen=True)
class Llama:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: dict, source: str) -> "Llama":
        """The dimensions of a llama-family config.json; raises :class:`ContainerError` naming the
        file when a field it needs is absent or not a whole number in 1 .. 2^31 (a JSON value of
        any other type, a bool, a huge number)."""
        def dim(key: str, default: int | None = None) -> int:
            v = cfg.get(key)
            if v is None and default is not None:
                return default
            if type(v) is not int or not 0 < v <= MAX_DIM:
                raise ContainerError(f"is not a llama-family config: {key} must be a whole number in 1..{MAX_DIM}, "
                                     f"not {json.dumps(v)[:40]}", file=source)
            return v

        hidden, heads = dim("hidden_size"), dim("num_attention_heads")
        need = ("intermediate_size", "num_hidden_layers", "vocab_size")
        return cls(hidden_size=hidden, num_attention_heads=heads, **{k: dim(k) for k in need},
                   num_key_value_heads=dim("num_key_value_heads", heads), head_dim=dim("head_dim", max(1, hidden // heads)),
                   tie_word_embeddings=cfg.get("tie_word_embeddings") is True)

    def linears(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of the quantized linears of one layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


@dataclass(frozen=True)
class Budget:
    bpw: float
    weights: int
    head: int
    unquantized: int
    cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.head + self.unquantized + self.cache + self.overhead


def load(model: str) -> Llama:
    """A preset name, a config.json, or a model folder holding one."""
    if model in PRESETS:
        return Llama.from_config(PRESETS[model], model)
    p = Path(model)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise ContainerError(f"is not a config.json, a model folder or a preset ({', '.join(PRESETS)})", file=model)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise ContainerError("is not valid JSON", file=str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise ContainerError("is not a JSON object", file=str(cfg_path))
    return Llama.from_config(cfg, str(cfg_path))


def parse_size(text: str) -> int:
    """Bytes of a size such as ``24GB``, ``8GiB``, ``24000MB`` (a decimal number and a unit; GB =
    GiB). Raises :class:`UsageError` for anything else, or a size above :data:`MAX_BYTES`."""
    m = re.fullmatch(r"\s*([0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})\s*([KMGT]?)(i?B)?\s*", text, flags=re.I)
    if not m:
        raise UsageError(f"cannot read {text!r} as a size (e.g. 24GB, 8GiB, 24000MB)")
    size = int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))
    if size > MAX_BYTES:
        raise UsageError(f"{text!r} is more than {MAX_BYTES // 2**50} PiB; no GPU has that much memory")
    return size


def quantized_numel(m: Llama) -> int:
    return m.num_hidden_layers * sum(k * padded_columns(n) for k, n in m.linears())


def cache_bytes(m: Llama, context: int, cache_bits: int) -> int:
    """KV cache of batch 1 (see the module docstring)."""
    values = 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * context
    if cache_bits >= 16:
        return values * 2
    scales = values // 32 * 2
    dequantized = 2 * context * m.num_key_value_heads * m.head_dim * 2
    return values * cache_bits // 8 + scales + dequantized


def scratch_bytes(m: Llama, context: int) -> int:
    """Working memory of one forward chunk, the way exllamav2 sizes it (``scratch_space`` and
    ``temp_*_size`` of ``attn.py``/``mlp.py``/``linear.py``, ``temp_attn_size``): modules share one
    scratch area, so it is the larger of the attention's and the MLP's needs, plus the attention
    weights (flash-attention's smaller share) and the float32 logits of the chunk."""
    tokens = min(context, CHUNK)
    h, i = m.hidden_size, m.intermediate_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim

    def dq(shapes: list[tuple[int, int]]) -> int:  # one dequantized weight matrix, float16
        return max(2 * min(k * n, MAX_DQ) for k, n in shapes)

    lin = m.linears()
    attn = tokens * 2 * (max(q, h) + q + 2 * kv) + 4 * 128 + dq(lin[:4])
    if kv != q:  # K and V expanded to every query head for grouped-query attention
        attn += 2 * context * q * 2 + 128
    mlp = tokens * 2 * (h + 2 * max(h, i)) + 3 * 128 + dq(lin[4:])
    att_max = min(MAX_ATTENTION, context**2) // (MAX_ATTENTION**0.5 / 190)
    attn_weights = int(2 * att_max * m.num_attention_heads * 2 + 128)
    logits = tokens * m.vocab_size * 4
    return max(attn, mlp) + attn_weights + logits


def budget(m: Llama, bpw: float, *, head_bits: int = 6, context: int = 2048, cache_bits: int = 16,
           overhead_fixed: int = OVERHEAD_FIXED) -> Budget:
    weights = math.ceil(quantized_numel(m) * bpw / 8 - 1e-6)  # whole bytes; the epsilon absorbs float error
    head = 0 if m.tie_word_embeddings else head_option(head_bits).total_bits(m.hidden_size, m.vocab_size) // 8
    norms = (2 * m.num_hidden_layers + 1) * m.hidden_size
    unquantized = 2 * (m.vocab_size * m.hidden_size + norms)
    cache = cache_bytes(m, context, cache_bits)
    return Budget(bpw, weights, head, unquantized, cache, overhead_fixed + scratch_bytes(m, context))


def largest_bpw(m: Llama, vram: int, *, lo: float = 2.0, hi: float = 8.0, **kw) -> float | None:
    """The largest bpw (two decimals) in [lo, hi] whose budget fits ``vram``; None if lo does not."""
    best = None
    for hundredths in range(int(round(lo * 100)), int(round(hi * 100)) + 1):
        if budget(m, hundredths / 100, **kw).total <= vram:
            best = hundredths / 100
        else:
            break
    return best


def table(m: Llama, vram: int, answer: float | None, **kw) -> list[dict]:
    center = answer if answer is not None else 2.0
    points = sorted({round(min(8.0, max(2.0, center + d)), 2) for d in (-0.5, -0.25, 0.0, 0.25, 0.5)})
    rows = []
    for b in points:
        r = budget(m, b, **kw)
        rows.append(asdict(r) | {"total": r.total, "fits": r.total <= vram})
    return rows
