"""``exl2 inspect PATH [--json]``: the layers of an EXL2 model and a summary."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import Exl2Error
from ..format import WIDTHS
from ..io import Model, open_model
from . import app
from .common import MAX_SHOWN_DEPTH, console, json_text, nested_deeper_than, plain


def describe(model: Model) -> dict:
    """Per-layer facts and a model summary, as a JSON-ready dict."""
    layers = []
    q_bits = q_weights = 0
    for key, qm in model.qmatrices():
        per_width = qm.groups.groups_per_width()
        layers.append({
            "key": key,
            "in_features": qm.in_features,
            "out_features": qm.out_features,
            "out_features_padded": qm.out_features_padded,
            "groups": {str(b): per_width[b] for b in WIDTHS if per_width[b]},
            "rows": {str(b): r for b, r in qm.groups.rows_per_width().items() if r},
            "bias": qm.bias is not None,
            "bpw": qm.bits_per_weight,
        })
        q_bits += qm.storage_bits()
        q_weights += qm.in_features * qm.out_features
    total_bytes = sum(f.stat().st_size for f in model.files)
    layer_names = {n for k in model.layer_keys() for n in model.layer_tensor_names(k)}
    other = [n for n in model.tensors if n not in layer_names]
    return {
        "path": str(model.path),
        "files": [f.name for f in model.files],
        "layers": layers,
        "summary": {
            "quantized_layers": len(layers),
            "quantized_weights": q_weights,
            "bpw": q_bits / q_weights if q_weights else None,
            "other_tensors": len(other),
            "bytes": total_bytes,
            "quantization_config": shown(model.quantization_config),
        },
    }


def shown(value: object) -> object:
    """A JSON value from config.json as inspect shows it: itself, or a note when it nests too
    deep to print (legal JSON, so not an error)."""
    if nested_deeper_than(value):
        return f"(not shown: nested deeper than {MAX_SHOWN_DEPTH} levels)"
    return value


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="EXL2 model folder or .safetensors file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """One row per quantized layer (shape, groups per width, bits per weight) and a model summary."""
    from . import fail

    try:
        with open_model(path) as model:
            info = describe(model)
    except Exl2Error as e:
        raise fail(e) from None
    if as_json:
        print(json_text(info))
        return
    table = Table(title=plain(f"{info['path']} ({len(info['files'])} file(s))"))
    for col in ("layer", "in x out", "groups per width", "bpw"):
        table.add_column(col, justify="right" if col == "bpw" else "left")
    for layer in info["layers"]:
        groups = " ".join(f"{b}b:{n}" for b, n in layer["groups"].items())
        table.add_row(plain(layer["key"]), f"{layer['in_features']} x {layer['out_features']}", groups,
                      f"{layer['bpw']:.3f}")
    console.print(table)
    s = info["summary"]
    bpw = f"{s['bpw']:.4f}" if s["bpw"] is not None else "n/a"
    console.print(f"{s['quantized_layers']} quantized layers, {s['quantized_weights']:,} weights at {bpw} bpw; "
                  f"{s['other_tensors']} other tensors; {s['bytes']:,} bytes")
    if s["quantization_config"] is not None:
        console.print(plain(f"quantization_config: {json.dumps(s['quantization_config'], ensure_ascii=False)}"))
