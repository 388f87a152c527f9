"""``exl2 eval MODEL [--source SRC] [--text FILE] [--json]``: perplexity of an EXL2 causal LM on a
text; with ``--source`` (the float model it came from) also the KL divergence of next-token
distributions and top-1 agreement, or for an encoder the cosine of sentence embeddings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from ..errors import Exl2Error, printable
from . import app
from .common import json_text
from .run_options import device_of, dtype_of, quiet_transformers, steps


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(None, help="EXL2 model folder"),
    source: Path = typer.Option(None, "--source", help="the float model it was quantized from"),
    text: Path = typer.Option(None, "--text", help="UTF-8 text file (default: exl2/data/eval.txt, not the calibration corpus)"),
    length: int = typer.Option(256, "--length", min=2, help="tokens per window"),
    max_windows: int = typer.Option(None, "--max-windows", min=1, help="evaluate at most this many windows"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float16, bfloat16 or float32 (activations)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    json_schema: bool = typer.Option(False, "--json-schema", help="print the JSON schema of the report and exit"),
) -> None:
    """Evaluate an EXL2 model (validated first) on a text, alone or against its float source."""
    from ..runtime.evaluate import EvalReport, evaluate
    from . import fail

    quiet_transformers()

    if json_schema:
        print(json.dumps(EvalReport.model_json_schema(), indent=2))
        return
    if model is None:
        print("exl2: error: missing MODEL (an EXL2 model folder)", file=sys.stderr)
        raise typer.Exit(2)
    content = None
    if text is not None:
        try:
            content = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            print(printable(f"exl2: error: {text}: cannot be read as UTF-8 text ({type(e).__name__})"), file=sys.stderr)
            raise typer.Exit(2) from None
    try:
        report = evaluate(model, source=source, text=content, length=length, max_windows=max_windows,
                          dtype=dtype_of(dtype), device=device_of(device), progress=steps)
    except Exl2Error as e:
        raise fail(e) from None
    if text is not None:
        report.text = str(text)
    if as_json:
        print(json_text(report.model_dump(mode="json")))
        return
    lines = [f"{report.kind} {report.model}: {report.tokens} tokens in {report.windows} window(s) of {report.text}"]
    if report.perplexity is not None:
        lines.append(f"perplexity {report.perplexity:.4f}")
    if report.kl_mean is not None:
        lines.append(f"source perplexity {report.source_perplexity:.4f}; KL(source || quantized) mean "
                     f"{report.kl_mean:.6f}, max {report.kl_max:.6f}; top-1 agreement {report.top1_agreement:.4f}")
    if report.cosine_mean is not None:
        lines.append(f"embedding cosine mean {report.cosine_mean:.4f}, min {report.cosine_min:.4f}")
    print("\n".join(printable(line) for line in lines))
