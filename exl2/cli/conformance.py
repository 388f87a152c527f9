"""``exl2 conformance export DIR`` and ``exl2 conformance run [--backend ...]`` (docs/porting.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import Exl2Error
from . import app
from .common import console, plain

conformance = typer.Typer(help="Test vectors for ports, and a harness for kernels.", no_args_is_help=True)
app.add_typer(conformance, name="conformance")


@conformance.command("export")
def export_cmd(directory: Path = typer.Argument(..., help="folder to write: new, empty, or an earlier export (replaced)")) -> None:
    """Write the language-neutral test vectors (the same bytes on every run)."""
    from ..conformance.vectors import export
    from . import fail

    try:
        manifest = export(directory)
    except Exl2Error as e:
        raise fail(e) from None
    kinds = [v["kind"] for v in manifest["vectors"]]
    console.print(plain(f"wrote {kinds.count('positive')} positive, {kinds.count('negative')} negative layer and "
                        f"{kinds.count('negative-folder')} negative folder vectors to {directory}"))


@conformance.command("run")
def run_cmd(
    backend: str = typer.Option("reference", help="reference, fast, MODULE (with dequantize, optional matmul, load, "
                                                  "DEVICE) or MODULE:NAME (a backend object or a dequantize function)"),
    vectors: Path = typer.Option(None, help="an exported vector folder (default: export to a temporary folder)"),
    examples: int = typer.Option(25, min=0, help="hypothesis-generated layers to try"),
    seed: int = typer.Option(0, help="seed of the generated layers"),
    device: str = typer.Option(None, help="device for layers and activations (default: the backend's; fast: cuda "
                                          "when there is a GPU)"),
) -> None:
    """Check an implementation against the vectors and random layers; a pass/fail table per feature.
    Exit 0 when all pass, 1 when any fails, 2 when the suite could not run."""
    from rich.table import Table

    from ..conformance.harness import all_passed, load_backend, run
    from . import fail

    try:
        if backend == "fast":
            from .dequantize import prepare_fast_backend

            prepare_fast_backend()
        impl = load_backend(backend, device)
        results = run(impl, vectors, examples, seed)
    except Exl2Error as e:
        raise fail(e) from None
    table = Table(title=plain(f"exl2 conformance run --backend {backend} (device {impl.device})"))
    for col in ("feature", "result", "passed", "failed", "first failure"):
        table.add_column(col, overflow="fold")
    for name in sorted(results):
        r = results[name]
        table.add_row(plain(name), "[red]FAIL[/]" if r.failed else "[green]pass[/]", str(r.passed), str(r.failed),
                      plain(r.failures[0] if r.failures else ""))
    console.print(table)
    ok = all_passed(results)
    failed = sorted(n for n, r in results.items() if r.failed)
    console.print("[green]PASS[/]: every feature passed" if ok else f"[red]FAIL[/]: {plain(', '.join(failed)).markup}")
    raise typer.Exit(0 if ok else 1)
