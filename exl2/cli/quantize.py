"""``exl2 quantize SRC -o OUT -b BPW``: a Hugging Face checkpoint to an EXL2 model."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import Exl2Error
from . import app
from .common import console, progress


@app.command("quantize")
def quantize_cmd(
    src: str = typer.Argument(..., help="Hugging Face model folder (safetensors), or example:minilm"),
    out: Path = typer.Option(..., "-o", "--output", help="output folder (must not exist)"),
    bpw: float = typer.Option(..., "-b", "--bits", help="target average bits per weight (stored bits, 2.0-8.0)"),
    head_bits: int = typer.Option(6, "--head-bits", help="head option of causal LMs: 2, 3, 4, 5, 6 or 8 (exllamav2's qparams_headoptions)"),
    calibration: Path = typer.Option(None, "--calibration", help="calibration text file (default: shipped corpus)"),
    measurement: Path = typer.Option(None, "--measurement", help="reuse a measurement.json (skips measuring)"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when there is a GPU), cpu or cuda"),
    rows: int = typer.Option(32, "--rows", help="calibration rows for the measurement", min=1),
    length: int = typer.Option(128, "--length", help="tokens per calibration row", min=8),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists (only once the new one is complete)"),
) -> None:
    """Measure every layer's options, allocate bits within numel x BPW exactly, quantize with GPTQ,
    and write an EXL2 model folder. Interrupted runs continue from OUT.partial."""
    from ..model.pipeline import Settings, quantize_model
    from . import fail

    if calibration is not None and not calibration.is_file():
        print(f"exl2: error: {calibration}: calibration file not found", file=sys.stderr)
        raise typer.Exit(2)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(src=src, out=out, bpw=bpw, head_bits=head_bits, calibration=calibration, rows=rows,
                        length=length, measurement=measurement, device=device, overwrite=overwrite)
    try:
        summary = quantize_model(settings, progress=progress, log=lambda m: console.print(m, style="dim"))
    except Exl2Error as e:
        raise fail(e) from None
    console.print(f"wrote {summary['out']}: {summary['layers']} layers at {summary['bpw']:.4f} bpw "
                  f"(target {summary['target_bpw']}), {summary['bytes']:,} bytes of weights")
