"""config.json checks (spec 2.1): ``quantization_config``, the rope keys exllamav2 reads, and,
for llama-family models, tensor shapes against the dimensions the config gives.

Everything in config.json is hostile data: any JSON type at any field, huge numbers, lone
surrogates. Every check here gives findings for it and never raises; the values a finding quotes
are ``repr``-escaped and cut short.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..format import padded_columns
from .findings import Finding, finding

#: Keys of exllamav2's ``qparams_headoptions`` (exllamav2/conversion/qparams.py): the values the
#: converter accepts for ``-hb``.
HEAD_OPTIONS = (2, 3, 4, 5, 6, 8)
#: The rope_theta exllamav2 uses when config.json has none (exllamav2/config.py, ``prepare``).
EXLLAMAV2_DEFAULT_ROPE_THETA = 10000.0


def _head_option(v: int) -> int:
    if v not in HEAD_OPTIONS:
        raise ValueError(f"must be one of exllamav2's head options {list(HEAD_OPTIONS)}")
    return v


class Calibration(BaseModel):
    """``quantization_config.calibration``; strict types: JSON integers, a string."""

    model_config = ConfigDict(extra="allow", strict=True)

    rows: int | None = Field(default=None, gt=0)
    length: int | None = Field(default=None, gt=0)
    dataset: str | None = None


class QuantizationConfig(BaseModel):
    """``config.json["quantization_config"]`` as exllamav2's converter writes it (spec 2.1).
    Strict types: ``bits`` a JSON number (not a string, not a boolean), ``head_bits`` a JSON
    integer, strings where the converter writes strings; each violation is EXL2-K003."""

    model_config = ConfigDict(extra="allow", strict=True)

    quant_method: Literal["exl2"]
    version: str | None = None
    bits: float = Field(gt=0.0, le=16.0, allow_inf_nan=False)  # exllamav2 accepts any target (it warns outside 2-8)
    head_bits: Annotated[int, AfterValidator(_head_option)] | None = None
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


def check_rope(config: dict, file: str) -> list[Finding]:
    """EXL2-K006 (spec 2.1): rope parameters that exllamav2 would misread. transformers 5 writes
    ``rope_parameters`` (``rope_theta``, ``rope_type`` and the scaling fields) and neither
    ``rope_theta`` nor ``rope_scaling``; exllamav2 reads only the latter two
    (``ExLlamaV2Config.prepare``), so it silently runs with rope_theta 10000 and no scaling. A
    warning for each value of ``rope_parameters`` that differs from what exllamav2 would use."""
    theta = _exllamav2_rope_theta(config)
    if theta is None:
        return []  # exllamav2 refuses the config outright (rope_theta is not a number)
    scaling = config.get("rope_scaling")
    out = []
    for where, params in _rope_parameter_sets(config):
        t = params.get("rope_theta")
        if _is_number(t) and t != theta:
            out.append(finding("EXL2-K006", file=file, message=f"{where}.rope_theta is {_quote(t)}, but exllamav2 reads "
                                                               f"only rope_theta and would run with {_quote(theta)}"))
        kind = params.get("rope_type", params.get("type"))
        if isinstance(kind, str) and kind != "default" and not (isinstance(scaling, dict) and scaling):
            out.append(finding("EXL2-K006", file=file, message=f"{where} asks for {_quote(kind)} rope scaling, but "
                                                               f"exllamav2 reads only rope_scaling (absent) and would "
                                                               f"run without scaling"))
    return out


def _exllamav2_rope_theta(config: dict) -> float | int | None:
    """The rope_theta exllamav2 would use: the first of rope_theta, attn_config.rope_theta, and
    the same under text_config (exllamav2/config.py, ``read`` with ``opt_subkey``), else 10000;
    None when the value found is not a number (exllamav2 raises)."""
    for path in (("rope_theta",), ("attn_config", "rope_theta"), ("text_config", "rope_theta"),
                 ("text_config", "attn_config", "rope_theta")):
        d: object = config
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        if d is not None:
            return d if _is_number(d) else None
    return EXLLAMAV2_DEFAULT_ROPE_THETA


def _rope_parameter_sets(config: dict) -> list[tuple[str, dict]]:
    """Each dict of rope parameters in ``rope_parameters`` (top level and under text_config):
    the dict itself, or, per layer type, each dict it holds."""
    out = []
    for where, holder in (("rope_parameters", config), ("text_config.rope_parameters", config.get("text_config"))):
        rp = holder.get("rope_parameters") if isinstance(holder, dict) else None
        if not isinstance(rp, dict):
            continue
        if "rope_theta" in rp or "rope_type" in rp or "type" in rp:
            out.append((where, rp))
        else:
            out += [(f"{where}.{_quote(k)}", v) for k, v in rp.items() if isinstance(v, dict)][:8]
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _quote(v: object) -> str:
    """A value from the file, safe to print: repr (which escapes lone surrogates and control
    characters), cut to 40 characters."""
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"an integer of {len(str(abs(v)))} digits"
    return text if len(text) <= 40 else text[:37] + "..."


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
