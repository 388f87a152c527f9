"""Validator findings and their catalogue (spec/findings.md).

Every rule the validator checks has a stable code ``EXL2-<letter><number>``: C container
(safetensors header and shards), K config.json, T tensors of a layer, G group table,
P permutation, S scales and padding, D deep decode, R running the model (``--run``). Codes are never renumbered or reused.
The catalogue below is the single source of each code's severity, title, the spec section it
enforces and what triggers it; ``spec/findings.md`` documents the same codes for people
(``tests/test_validate.py`` keeps the two identical).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning", "info"]


class CodeInfo(BaseModel):
    """One entry of the catalogue: what the code means (``description``: what triggers it and
    how to fix it)."""

    model_config = ConfigDict(frozen=True)

    code: str
    severity: Severity
    title: str
    section: str
    description: str


class Finding(BaseModel):
    """One thing the validator found: where (file, tensor), what (code, message), how bad, and
    the spec section (spec/exl2.md) of the rule."""

    model_config = ConfigDict(frozen=True)

    code: str
    severity: Severity
    file: str | None = None
    tensor: str | None = None
    message: str
    section: str


def _entries(*rows: tuple[str, Severity, str, str, str]) -> dict[str, CodeInfo]:
    return {c: CodeInfo(code=c, severity=s, title=t, section=sec, description=d) for c, s, t, sec, d in rows}


CATALOGUE: dict[str, CodeInfo] = _entries(
    # container (safetensors) — checked on header bytes before any tensor byte is read
    ("EXL2-C001", "error", "header length missing or out of bounds", "2.2",
     "The file has fewer than 8 bytes, or its header length runs past the end of the file or beyond "
     "100 MB. The file is truncated or not safetensors: download it again."),
    ("EXL2-C002", "error", "header is not a JSON object (or has duplicate names)", "2.2",
     "The header is not UTF-8 JSON, is not an object, or names a tensor twice; or it holds what strict "
     "JSON parsers refuse: NaN or Infinity, a lone surrogate, nesting deeper than JSON parsing allows, a "
     "name given twice inside an entry. The file is damaged or was not written by a safetensors writer."),
    ("EXL2-C003", "error", "malformed tensor entry (dtype, shape, offsets, metadata)", "2.2",
     "An entry lacks dtype, shape or data_offsets or has other keys, has an unknown dtype, a shape that is "
     "not a list of at most 8 non-negative integers, offsets that are not two integers 0 <= begin <= end, "
     "a __metadata__ that is not string to string (or more than 100,000 pairs), a name holding a control "
     "character (U+0000-U+001F, U+007F-U+009F), an entry longer than 4096 characters, or the header "
     "declares more than 1,000,000 tensors. Rewrite the file with a safetensors writer."),
    ("EXL2-C004", "error", "tensor bytes outside the file or not dtype x shape long", "2.2",
     "A tensor's byte range ends beyond the file, or its length is not the dtype size times the product "
     "of its shape. Usually a truncated download."),
    ("EXL2-C005", "error", "tensor byte ranges overlap or leave gaps", "2.2",
     "Two byte ranges overlap, a gap lies between them, or bytes follow the last tensor; safetensors "
     "readers refuse such files. Rewrite the file with a safetensors writer."),
    ("EXL2-C006", "error", "tensor name present in two files", "2.2",
     "The same tensor name is in two shards; exllamav2 would keep one silently. The later shard is not "
     "read. Remove the stray shard (often a leftover of an earlier conversion)."),
    ("EXL2-C007", "warning", "model.safetensors.index.json does not match the shards", "2.3",
     "model.safetensors.index.json is invalid, names files that do not exist, or lists other tensors than "
     "the shards hold. Very common: exllamav2's converter copies the source model's index. Readers ignore "
     "it; delete it."),
    ("EXL2-C008", "info", "shard not named as exllamav2 names it", "2.2",
     "A .safetensors file in the folder is not named output.safetensors or "
     "output-NNNNN-of-NNNNN.safetensors. Legal; readers index every .safetensors file."),
    ("EXL2-C009", "error", "tensor data cannot be read", "2.2",
     "A tensor's bytes cannot be read (an I/O error, or safetensors refuses the file). Check the disk "
     "and download the file again. Also used, with a message starting \"internal error\", if a check itself "
     "fails: a bug of the validator, please report it."),
    ("EXL2-C010", "error", "shard set incomplete", "2.2",
     "Files named NAME-NNNNN-of-MMMMM.safetensors do not make up the whole set NAME-00001 .. NAME-MMMMM "
     "(a shard is missing, or two files of one name disagree on MMMMM). The tensors of a missing shard are "
     "missing from the model. Download the missing shard; remove a stray one left by another conversion."),
    # config.json
    ("EXL2-K001", "error", "config.json is not a JSON object", "2.1",
     "config.json is not valid UTF-8 JSON or not an object. Fix or restore it from the source model."),
    ("EXL2-K002", "warning", "no quantization_config in config.json", "2.1",
     "The folder has no config.json, or it has no quantization_config. exllamav2 does not need it, but "
     "its converter always writes it (with -cf); add it to say how the model was quantized."),
    ("EXL2-K003", "error", "quantization_config field invalid", "2.1",
     "quantization_config is not an object, quant_method is not \"exl2\", bits is not a JSON number in (0, 16] "
     "(a string or a boolean is not a number), head_bits is not a JSON integer among exllamav2's head options "
     "2, 3, 4, 5, 6, 8, version or calibration.dataset is not a string, or calibration.rows or length is not a "
     "positive JSON integer."),
    ("EXL2-K004", "error", "tensor shape disagrees with config.json", "2.1",
     "A llama-family layer (model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, lm_head) or "
     "model.embed_tokens.weight / lm_head.weight has another shape than hidden_size, intermediate_size, "
     "num_attention_heads, num_key_value_heads, head_dim and vocab_size give. For a quantized layer "
     "in_features is the length of q_invperm and out_features the q_weight columns padded to 32. The "
     "config or the weights belong to another model."),
    ("EXL2-K005", "warning", "achieved bits per weight far from quantization_config.bits", "7.5",
     "The stored bits per weight of the quantized layers differ from quantization_config.bits by more than "
     "0.3. The average is weighted by layer size: all stored bits over all in_features x padded out_features, "
     "the quantity exllamav2's optimizer budgets against bits; lm_head excluded, as exllamav2's target "
     "excludes it. It counts every layer whose q_weight and q_invperm headers give its size, whatever rules "
     "it breaks (the message says how many layers could not be counted). With check_layer(bits_target=...), "
     "one layer's bits per weight (over in_features x out_features) differ from the given target by more "
     "than 0.3. The config does not describe these weights."),
    ("EXL2-K006", "warning", "rope parameters exllamav2 would misread", "2.1",
     "config.json gives rope_parameters (as transformers 5 writes it) whose rope_theta or rope_type exllamav2 "
     "does not see: it reads only rope_theta (default 10000) and rope_scaling, so it would run the model with "
     "another rope base or without its scaling, silently. Add rope_theta and rope_scaling as the source "
     "model's transformers 4 config had them."),
    # tensors of a layer
    ("EXL2-T001", "error", "required layer tensor missing", "3.1",
     "A layer KEY (any name with one of KEY.q_weight, q_scale, q_scale_max, q_groups, q_invperm, q_perm) lacks "
     "one of q_weight, q_scale, q_scale_max, q_groups, q_invperm. A layer without its q_weight is still "
     "reported: exllamav2 finds no weights for it (module.py, load_weight) and leaves the layer unloaded."),
    ("EXL2-T002", "error", "layer tensor has the wrong dtype", "3.1",
     "q_weight, q_scale, q_invperm are not int32, q_scale_max is not float16, or q_groups is not int16."),
    ("EXL2-T003", "error", "layer tensor has the wrong rank or an inconsistent shape", "3.1",
     "A tensor has the wrong rank, q_groups is empty or of odd length, q_scale is not [G, N'/8] or "
     "q_scale_max not [G] for the G groups of q_groups."),
    ("EXL2-T004", "error", "q_weight columns not a positive multiple of 32", "3.2",
     "q_weight has no columns or a column count that is not a multiple of 32 (out_features must be padded)."),
    ("EXL2-T005", "error", "bias has the wrong dtype or length", "3.3",
     "The bias is not a float16 vector, or its length L is not an out_features that pads to q_weight's N' "
     "columns (N' - 32 < L <= N')."),
    ("EXL2-T006", "error", "bias shorter than q_weight's padded columns", "3.3",
     "The bias has N entries for N' > N padded columns. exllamav2's loader requires exactly N' "
     "(make_q_matrix: \"q_weight and bias have incompatible shapes\") and refuses the model. Pad the bias "
     "with zeros to N'."),
    ("EXL2-T007", "error", "bias holds NaN or Inf", "3.3",
     "A bias entry is NaN or infinite, so every output of that column is. The bias is corrupt."),
    # group table
    ("EXL2-G001", "error", "group width not one of 8, 6, 5, 4, 3, 2", "4.2",
     "A q_groups entry has a width outside {8, 6, 5, 4, 3, 2}."),
    ("EXL2-G002", "error", "group widths not non-increasing", "4.2",
     "A wider group follows a narrower one; exllamav2's kernels walk 8-bit rows first, then 6, 5, 4, 3, 2, "
     "and would decode the layer wrongly without an error."),
    ("EXL2-G003", "error", "qrow offsets not starting at 0, increasing, inside q_weight", "4.1",
     "The first qrow offset is not 0, the offsets do not increase strictly, or one is at or past the end "
     "of q_weight (an empty group)."),
    ("EXL2-G004", "error", "group not a whole number of blocks", "4.3",
     "A group's qrows are not a whole number of blocks of its width (3 words for 3- and 6-bit, 5 for 5-bit)."),
    ("EXL2-G005", "error", "group rows not a multiple of 32 (16 for 2-bit)", "4.4",
     "A group's row count is not a multiple of 32 (16 for a 2-bit group); the kernels step 32 rows at a "
     "time and would miss the group boundary."),
    ("EXL2-G006", "error", "group rows do not sum to in_features (last-group rules disagree)", "4.6",
     "The groups' rows do not add up to in_features (the length of q_invperm), so exllamav2's two ways of "
     "sizing the last group (in_features minus the rows before it; its qrows * 32 / bits) disagree."),
    ("EXL2-G007", "error", "16-bit limit exceeded", "4.5",
     "More than 32767 groups, a qrow offset negative as int16, a group of more than 32767 rows, or "
     "in_features outside 1..65536."),
    # permutation
    ("EXL2-P001", "error", "q_invperm is not a permutation", "6.4",
     "q_invperm is not a permutation of 0..K-1 (an entry out of range or repeated)."),
    ("EXL2-P002", "error", "q_perm is not the inverse of q_invperm", "3.3",
     "A stored q_perm is not int32 [K] or not the inverse of q_invperm. Loaders recompute it; remove it or "
     "fix it."),
    # scales and padding
    ("EXL2-S001", "error", "q_scale_max not finite and non-negative", "6.1",
     "A q_scale_max entry is NaN, infinite or negative (zero is legal: the converter writes it for a group "
     "whose maximum underflows in float16, e.g. all-zero rows; so is -0, which is not below zero)."),
    ("EXL2-S002", "info", "q_scale_max / 256 is a float16 subnormal", "6.1",
     "A q_scale_max entry divided by 256 rounds to a non-zero float16 subnormal (2^-17 < q_scale_max <= "
     "0x23FE, just below 2^-6; at or below 2^-17 it rounds to 0), so exllamav2's group maximum loses bits. "
     "Legal and common for 8-bit groups; decoders must not flush it to zero."),
    ("EXL2-S003", "error", "padded column does not decode to zero", "3.2",
     "A padded column (beyond out_features, known from config.json) holds codes other than "
     "its group's zero point 2^(b-1), so it decodes to non-zero values."),
    ("EXL2-S004", "warning", "padded column scale nibble is not 0x0 or 0xF", "3.2",
     "A padded column's 4-bit scale code is neither 0x0 (what exllamav2's converter writes: it quantizes the "
     "zero columns it padded the weight with) nor 0xF (what its pack() writes for a layer padded there). "
     "Harmless when the codes are zero points; decoders must not depend on it."),
    # deep decode
    ("EXL2-D001", "error", "decoded weights hold NaN or Inf", "6.3",
     "With --deep, decoding a layer gives NaN or Inf: (q - 2^(b-1)) * scale overflows float16. The scales "
     "are corrupt."),
    # running the model
    ("EXL2-R001", "error", "forward pass yields NaN or Inf", "8.4",
     "With --run, the model built from the folder (its config.json architecture, every layer decoded as "
     "specified) gives NaN or Inf on a float16 forward pass over a few tokens, although every layer passes "
     "its rules: a float tensor (norm, embedding) or the scale of the weights overflows float16. The "
     "message names the first module whose output is not finite."),
)


def finding(code: str, *, message: str, file: str | None = None, tensor: str | None = None) -> Finding:
    """A finding of ``code``, with severity and section from the catalogue."""
    info = CATALOGUE[code]
    return Finding(code=code, severity=info.severity, file=file, tensor=tensor, message=message, section=info.section)


def errors_of(findings: list[Finding]) -> list[Finding]:
    """The findings of severity ``error``."""
    return [f for f in findings if f.severity == "error"]
