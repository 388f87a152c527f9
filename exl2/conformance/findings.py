"""Validator findings and their catalogue (spec/findings.md).

Every rule the validator checks has a stable code. The catalogue below is the single source of
each code's severity, title and the spec section it enforces; ``spec/findings.md`` documents the
same codes for people (a test keeps the two in sync).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning", "info"]


class CodeInfo(BaseModel):
    """One entry of the catalogue."""

    model_config = ConfigDict(frozen=True)

    code: str
    severity: Severity
    title: str
    section: str


class Finding(BaseModel):
    """One thing the validator found: where (file, tensor), what (code, message), how bad."""

    model_config = ConfigDict(frozen=True)

    code: str
    severity: Severity
    file: str | None = None
    tensor: str | None = None
    message: str
    section: str


def _entries(*rows: tuple[str, Severity, str, str]) -> dict[str, CodeInfo]:
    return {c: CodeInfo(code=c, severity=s, title=t, section=sec) for c, s, t, sec in rows}


CATALOGUE: dict[str, CodeInfo] = _entries(
    # container (safetensors) — checked on header bytes before any tensor byte is read
    ("EXL2-C001", "error", "header length missing or out of bounds", "2.2"),
    ("EXL2-C002", "error", "header is not a JSON object (or has duplicate names)", "2.2"),
    ("EXL2-C003", "error", "malformed tensor entry (dtype, shape, offsets, metadata)", "2.2"),
    ("EXL2-C004", "error", "tensor bytes outside the file or not dtype x shape long", "2.2"),
    ("EXL2-C005", "error", "tensor byte ranges overlap or leave gaps", "2.2"),
    ("EXL2-C006", "error", "tensor name present in two files", "2.2"),
    ("EXL2-C007", "warning", "model.safetensors.index.json does not match the shards", "2.3"),
    ("EXL2-C008", "info", "shard not named as exllamav2 names it", "2.2"),
    ("EXL2-C009", "error", "tensor data cannot be read", "2.2"),
    # config.json
    ("EXL2-K001", "error", "config.json is not a JSON object", "2.1"),
    ("EXL2-K002", "warning", "no quantization_config in config.json", "2.1"),
    ("EXL2-K003", "error", "quantization_config field invalid", "2.1"),
    ("EXL2-K004", "error", "tensor shape disagrees with config.json", "2.1"),
    ("EXL2-K005", "warning", "achieved bits per weight far from quantization_config.bits", "7.5"),
    # tensors of a layer
    ("EXL2-T001", "error", "required layer tensor missing", "3.1"),
    ("EXL2-T002", "error", "layer tensor has the wrong dtype", "3.1"),
    ("EXL2-T003", "error", "layer tensor has the wrong rank or an inconsistent shape", "3.1"),
    ("EXL2-T004", "error", "q_weight columns not a positive multiple of 32", "3.2"),
    ("EXL2-T005", "error", "bias has the wrong dtype or length", "3.3"),
    # group table
    ("EXL2-G001", "error", "group width not one of 8, 6, 5, 4, 3, 2", "4.2"),
    ("EXL2-G002", "error", "group widths not non-increasing", "4.2"),
    ("EXL2-G003", "error", "qrow offsets not starting at 0, increasing, inside q_weight", "4.1"),
    ("EXL2-G004", "error", "group not a whole number of blocks", "4.3"),
    ("EXL2-G005", "error", "group rows not a multiple of 32 (16 for 2-bit)", "4.4"),
    ("EXL2-G006", "error", "group rows do not sum to in_features (last-group rules disagree)", "4.6"),
    ("EXL2-G007", "error", "16-bit limit exceeded", "4.5"),
    # permutation
    ("EXL2-P001", "error", "q_invperm is not a permutation", "6.4"),
    ("EXL2-P002", "error", "q_perm is not the inverse of q_invperm", "3.3"),
    # scales and padding
    ("EXL2-S001", "error", "q_scale_max not finite and positive", "6.1"),
    ("EXL2-S002", "info", "q_scale_max / 256 is a float16 subnormal", "6.1"),
    ("EXL2-S003", "error", "padded column does not decode to zero", "3.2"),
    ("EXL2-S004", "warning", "padded column scale nibble is not 0xF", "3.2"),
    # deep decode
    ("EXL2-D001", "error", "decoded weights hold NaN or Inf", "6.3"),
)


def finding(code: str, *, message: str, file: str | None = None, tensor: str | None = None) -> Finding:
    """A finding of ``code``, with severity and section from the catalogue."""
    info = CATALOGUE[code]
    return Finding(code=code, severity=info.severity, file=file, tensor=tensor, message=message, section=info.section)
