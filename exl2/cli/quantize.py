"""``exl2 quantize SRC -o OUT -b BPW``: a Hugging Face checkpoint to an EXL2 model.

Exit codes (README): 1 when the source breaks a rule (an unsupported or already quantized model),
2 when something cannot be read or written, or the settings cannot work (a target out of reach,
a device that is not there, a calibration file that is not UTF-8, a measurement of another
model). Every such case is one line on stderr, and nothing is left half-written.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import typer

from ..errors import Exl2Error, printable
from . import app

T = TypeVar("T")


def _bar(items: Iterable[T], total: int, phase: str) -> Iterator[T]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .common import err_console

    with Progress(TextColumn(f"{phase} blocks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(phase, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _map_large_allocations() -> None:
    """Have glibc serve every allocation of 1 MB or more with its own mapping, returned to the
    system when freed. Otherwise it raises that threshold to the largest block freed so far and
    serves later tensors from its heap, which fragments as blocks come and go: the process then
    grows a little with every block instead of staying at one block's size."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def _note(message: str) -> None:
    print(f"exl2: {message}", file=sys.stderr, flush=True)


@app.command("quantize")
def quantize_cmd(
    src: str = typer.Argument(..., help="Hugging Face model folder (safetensors), or example:minilm"),
    out: Path = typer.Option(..., "-o", "--output", help="output folder (must not exist)"),
    bpw: float = typer.Option(..., "-b", "--bits", help="target average bits per weight (stored bits, 2.0-8.0)"),
    head_bits: int = typer.Option(6, "--head-bits", help="head option of causal LMs: 2, 3, 4, 5, 6 or 8 (exllamav2's qparams_headoptions)"),
    calibration: Path = typer.Option(None, "--calibration", help="calibration text file, UTF-8 (default: shipped corpus)"),
    measurement: Path = typer.Option(None, "--measurement", help="reuse a measurement.json (skips measuring)"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when there is a GPU), cpu, cuda or cuda:N"),
    rows: int = typer.Option(128, "--rows", help="calibration rows for the measurement's Hessians", min=1),
    error_rows: int = typer.Option(32, "--error-rows", help="the first rows of --rows on which each option's error "
                                   "is measured", min=1),
    quant_rows: int = typer.Option(128, "--quant-rows", help="calibration rows for the quantization pass "
                                   "(never fewer than --rows)", min=1),
    length: int = typer.Option(128, "--length", help="tokens per calibration row", min=8),
    sweeps: int = typer.Option(3, "--sweeps", help="coordinate-descent sweeps after GPTQ (0: GPTQ's codes as they are)",
                               min=0, max=100),
    aim: str = typer.Option("float", "--aim", help="float: the quantization pass aims every layer at the float "
                            "model's outputs; plain: at its own outputs on the quantized model's inputs (GPTQ as usual)"),
    weigh: str = typer.Option("output", "--weigh", help="output: each block's measured errors weighted by how much "
                              "of them reaches the last block's outputs (a probe on 8 rows); block: as measured, as "
                              "exllamav2 allocates"),
    loader: str = typer.Option("stream", "--loader", help="stream: one block at a time from disk; eager: the whole "
                               "model through transformers (for checkpoints whose names the streaming loader cannot map)"),
    activations: str = typer.Option("auto", "--activations", help="where calibration activations are kept between "
                                    "blocks: device, cpu (beside a GPU run), disk (in OUT.partial), or auto (off the "
                                    "device only when the estimated peak would not fit)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists (only once the new one is complete)"),
) -> None:
    """Measure every layer's options, allocate bits within numel x BPW exactly, quantize with GPTQ,
    and write an EXL2 model folder, reading the source one block at a time. Interrupted runs
    continue from OUT.partial."""
    from ..model.pipeline import Settings, quantize_model
    from ..model.progress import log_lines

    def fail(message: str, code: int) -> typer.Exit:
        print(f"exl2: error: {printable(message)}", file=sys.stderr)
        return typer.Exit(code)

    if calibration is not None and not calibration.is_file():
        raise fail(f"{calibration}: calibration file not found", 2)
    if measurement is not None and not measurement.is_file():
        raise fail(f"{measurement}: measurement file not found", 2)
    if loader not in ("stream", "eager"):
        raise fail(f"--loader must be stream or eager, not {loader!r}", 2)
    if aim not in ("float", "plain"):
        raise fail(f"--aim must be float or plain, not {aim!r}", 2)
    if weigh not in ("output", "block"):
        raise fail(f"--weigh must be output or block, not {weigh!r}", 2)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(src=src, out=out, bpw=bpw, head_bits=head_bits, calibration=calibration, rows=rows,
                        quant_rows=quant_rows, error_rows=error_rows, length=length, measurement=measurement, device=device, overwrite=overwrite,
                        streaming=loader == "stream", refine=sweeps, input_error=aim == "float",
                        sensitivity=weigh == "output", activations=activations)
    progress = _bar if sys.stderr.isatty() else log_lines(_note)
    _map_large_allocations()
    try:
        summary = quantize_model(settings, progress=progress, log=_note)
    except Exl2Error as e:  # 1: the source breaks a rule; 2: cannot be read or written, or misuse
        raise fail(e.one_line(), e.exit_status) from None
    except MemoryError:
        raise fail("out of memory (the estimate printed at the start says how much is needed)", 2) from None
    print(f"wrote {printable(summary['out'])}: {summary['layers']} layers at {summary['bpw']:.4f} bpw "
          f"(target {summary['target_bpw']}), {summary['bytes']:,} bytes of weights")
