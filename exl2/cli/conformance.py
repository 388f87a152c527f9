"""``exl2 conformance export DIR`` and ``exl2 conformance run [--backend ...]``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import Exl2Error
from . import app
from .common import console

conformance = typer.Typer(help="Test vectors for ports, and a harness for kernels.", no_args_is_help=True)
app.add_typer(conformance, name="conformance")


@conformance.command("export")
def export_cmd(directory: Path = typer.Argument(..., help="folder to write (replaced if it exists)")) -> None:
    """Write the language-neutral test vectors (the same bytes on every run)."""
    from ..conformance.vectors import export

    manifest = export(directory)
    pos = sum(v["kind"] == "positive" for v in manifest["vectors"])
    console.print(f"wrote {pos} positive and {len(manifest['vectors']) - pos} negative vectors to {directory}")


@conformance.command("run")
def run_cmd(
    backend: str = typer.Option("reference", help="reference, fast, MODULE or MODULE:FUNCTION"),
    vectors: Path = typer.Option(None, help="an exported vector folder (default: export to a temp folder)"),
    examples: int = typer.Option(25, help="hypothesis-generated layers to try"),
) -> None:
    """Check an implementation against the vectors and random layers; a pass/fail table per feature."""
    from ..conformance.harness import all_passed, load_backend, run
    from . import fail

    try:
        impl = load_backend(backend)
        if backend == "fast":
            from .dequantize import note_fast_backend

            note_fast_backend()
        results = run(impl, vectors, examples)
    except Exl2Error as e:
        raise fail(e) from None
    table = Table(title=f"exl2 conformance run --backend {backend}")
    for col in ("feature", "passed", "failed", "first failure"):
        table.add_column(col, overflow="fold")
    for name in sorted(results):
        r = results[name]
        table.add_row(name, str(r.passed), f"[red]{r.failed}[/]" if r.failed else "0", r.failures[0] if r.failures else "")
    console.print(table)
    ok = all_passed(results)
    console.print("[green]PASS[/]" if ok else "[red]FAIL[/]")
    raise typer.Exit(0 if ok else 1)
