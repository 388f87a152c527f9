"""``exl2 validate PATH [--json] [--deep] [--run]``: check an EXL2 model against every rule of the spec.

Exit status: 0 valid (warnings allowed), 1 invalid, 2 could not run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import Exl2Error, UsageError
from . import app
from .common import console, json_text, plain, progress


@app.command("validate")
def validate_cmd(
    path: Path = typer.Argument(None, help="EXL2 model folder or .safetensors file"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    deep: bool = typer.Option(False, "--deep", help="also decode every layer and report NaN/Inf and statistics"),
    run: bool = typer.Option(False, "--run", help="also run the model on a few tokens (float16) and report NaN/Inf outputs (needs transformers)"),
    json_schema: bool = typer.Option(False, "--json-schema", help="print the JSON schema of the report and exit"),
) -> None:
    """Check a model folder or .safetensors file(s) on the CPU: container, config, and every layer rule.
    Findings carry stable codes (spec/findings.md)."""
    from ..conformance.validate import Report, validate_path
    from . import fail

    if json_schema:
        print(json.dumps(Report.model_json_schema(), indent=2))
        return
    if path is None:
        raise fail(UsageError("missing PATH (a model folder or .safetensors file)"))
    try:
        report = validate_path(path, deep=deep, progress=progress, run=run)
    except Exl2Error as e:
        raise fail(e) from None
    if as_json:
        print(json_text(report.model_dump(mode="json")))
    else:
        _print(report)
    raise typer.Exit(0 if report.ok else 1)


def _print(report) -> None:
    if report.findings:
        table = Table(title=plain(f"exl2 validate {report.path}"))
        for col in ("severity", "code", "file", "tensor", "message"):
            table.add_column(col, overflow="fold")
        style = {"error": "red", "warning": "yellow", "info": "cyan"}
        for f in report.findings:
            table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.code, plain(Path(f.file).name if f.file else ""),
                          plain(f.tensor or ""), plain(f.message))
        console.print(table)
    s = report.summary
    verdict = "[green]VALID[/]" if report.ok else "[red]INVALID[/]"
    bpw = f", {s.bpw:.3f} bpw" if s.bpw is not None else ""
    target = f" (target {s.target_bpw})" if s.target_bpw is not None else ""
    console.print(f"{verdict}: {s.errors} error(s), {s.warnings} warning(s), {s.infos} info; {s.layers} layer(s) in "
                  f"{s.files} file(s){bpw}{target}; {s.seconds:.2f} s, {s.layers_per_second:.1f} layers/s, "
                  f"{s.megabytes_per_second:.1f} MB/s")
