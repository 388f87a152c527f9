"""config.json checks (spec 2.1): ``quantization_config`` and, for llama-family models, tensor
shapes against the dimensions the config gives."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..format import padded_columns
from .findings import Finding, finding


class Calibration(BaseModel):
    model_config = ConfigDict(extra="allow")

    rows: int | None = None
    length: int | None = None
    dataset: str | None = None


class QuantizationConfig(BaseModel):
    """``config.json["quantization_config"]`` as exllamav2's converter writes it."""

    model_config = ConfigDict(extra="allow")

    quant_method: Literal["exl2"]
    version: str | None = None
    bits: float = Field(gt=0.0, le=16.0)  # exllamav2 accepts any target (it warns outside 2-8)
    head_bits: Literal[2, 3, 4, 5, 6, 8] | None = None  # keys of qparams_headoptions
    calibration: Calibration | None = None


class LlamaDims(BaseModel):
    """The llama-family dimensions a config may give."""

    model_config = ConfigDict(extra="ignore")

    hidden_size: int = Field(gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    vocab_size: int | None = Field(default=None, gt=0)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each llama-family linear, by key suffix."""
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        kv = (self.num_key_value_heads or self.num_attention_heads) * head_dim
        q = self.num_attention_heads * head_dim
        out = {"self_attn.q_proj": (self.hidden_size, q), "self_attn.k_proj": (self.hidden_size, kv),
               "self_attn.v_proj": (self.hidden_size, kv), "self_attn.o_proj": (q, self.hidden_size)}
        if self.intermediate_size:
            i = self.intermediate_size
            out |= {"mlp.gate_proj": (self.hidden_size, i), "mlp.up_proj": (self.hidden_size, i),
                    "mlp.down_proj": (i, self.hidden_size)}
        return out


LLAMA_LAYER = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def check_quantization_config(config: dict, file: str) -> tuple[list[Finding], QuantizationConfig | None]:
    """``quantization_config`` against :class:`QuantizationConfig` (spec 2.1): a warning when
    absent, an error for each invalid field; returns the parsed model when valid."""
    qc = config.get("quantization_config")
    if qc is None:
        return [finding("EXL2-K002", file=file, message="no quantization_config (exllamav2 does not need one, "
                                                        "but the converter always writes it)")], None
    try:
        return [], QuantizationConfig.model_validate(qc)
    except ValidationError as e:
        out = []
        for err in e.errors()[:10]:
            where = ".".join(str(p) for p in err["loc"])
            out.append(finding("EXL2-K003", file=file, message=f"quantization_config{'.' if where else ''}{where}: "
                                                              f"{err['msg']}"[:300]))
        return out, None


def llama_dims(config: dict) -> LlamaDims | None:
    try:
        return LlamaDims.model_validate(config)
    except ValidationError:
        return None


def expected_shape(dims: LlamaDims, key: str) -> tuple[int, int] | None:
    """(in_features, out_features) of a llama-family layer key, or None for other keys."""
    m = LLAMA_LAYER.match(key)
    if m:
        return dims.shapes().get(m.group(1))
    if key == "lm_head" and dims.vocab_size:
        return (dims.hidden_size, dims.vocab_size)
    return None


def check_layer_shape(dims: LlamaDims, key: str, in_features: int, cols: int, file: str) -> tuple[list[Finding], int | None]:
    """Compare a quantized layer's header shapes with the config; returns findings and the true
    out_features when the config gives it."""
    exp = expected_shape(dims, key)
    if exp is None:
        return [], None
    k, n = exp
    if in_features != k or cols != padded_columns(n):
        return [finding("EXL2-K004", file=file, tensor=f"{key}.q_weight",
                        message=f"holds a {in_features} x {cols} layer; config.json gives {k} x {n} "
                                f"({padded_columns(n)} padded columns)")], None
    return [], n


def check_float_shape(dims: LlamaDims, name: str, shape: tuple[int, ...], file: str) -> list[Finding]:
    """Embedding and unquantized head shapes."""
    if dims.vocab_size and name in ("model.embed_tokens.weight", "lm_head.weight"):
        if tuple(shape) != (dims.vocab_size, dims.hidden_size):
            return [finding("EXL2-K004", file=file, tensor=name, message=f"has shape {list(shape)}; config.json gives "
                                                                          f"[{dims.vocab_size}, {dims.hidden_size}]")]
    return []
