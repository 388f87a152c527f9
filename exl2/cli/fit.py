"""``exl2 fit --model CONFIG_OR_DIR --vram 24GB``: the largest bpw that fits a GPU."""

from __future__ import annotations


import typer
from rich.table import Table

from ..errors import Exl2Error
from . import app
from .common import console, json_text, plain


@app.command("fit")
def fit_cmd(
    model: str = typer.Option(..., "--model", help="config.json, a model folder, or a preset: llama-2-7b, "
                                                  "llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b"),
    vram: str = typer.Option(..., "--vram", help="GPU memory, e.g. 24GB (GB = GiB), 8GiB, 24000MB"),
    context: int = typer.Option(8192, "--context", help="tokens of KV cache", min=1, max=1 << 31),
    cache_bits: int = typer.Option(16, "--cache-bits", help="16, 8 or 4"),
    head_bits: int = typer.Option(6, "--head-bits", help="bits of the output head"),
    overhead: str = typer.Option("0.5GiB", "--overhead", help="fixed overhead (CUDA context, allocator slack); "
                                                            "exllamav2's scratch for one forward chunk is added to it"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The largest bits per weight at which weights + KV cache + overhead fit, from the format's exact
    bit accounting (docs/fit.md), with a table around the answer."""
    from ..errors import UsageError
    from ..model.fit import CHUNK, GIB, largest_bpw, load, parse_size, table
    from . import fail

    try:
        if cache_bits not in (16, 8, 4):
            raise UsageError(f"--cache-bits must be 16, 8 or 4, not {cache_bits}")
        m = load(model)
        size = parse_size(vram)
        fixed = parse_size(overhead)
        if head_bits not in (2, 3, 4, 5, 6, 8):
            raise UsageError(f"--head-bits must be one of 2, 3, 4, 5, 6, 8, not {head_bits}")
        kw = dict(context=context, cache_bits=cache_bits, head_bits=head_bits, overhead_fixed=fixed)
        answer = largest_bpw(m, size, **kw)
        rows = table(m, size, answer, **kw)
    except Exl2Error as e:
        raise fail(e) from None
    if as_json:
        print(json_text({"model": model, "vram_bytes": size, "context": context, "cache_bits": cache_bits,
                          "head_bits": head_bits, "overhead_fixed_bytes": fixed, "bpw": answer, "table": rows}))
    else:
        t = Table(title=plain(f"{model} on {size / GIB:.1f} GiB, context {context}, {cache_bits}-bit cache"))
        for col in ("bpw", "weights GiB", "head+float GiB", "cache GiB", "overhead GiB", "total GiB", "fits"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(f"{r['bpw']:.2f}", f"{r['weights'] / GIB:.2f}", f"{(r['head'] + r['unquantized']) / GIB:.2f}",
                      f"{r['cache'] / GIB:.2f}", f"{r['overhead'] / GIB:.2f}", f"{r['total'] / GIB:.2f}",
                      "yes" if r["fits"] else "no")
        console.print(t)
        console.print(f"overhead: {fixed / GIB:.2f} GiB fixed + {(rows[0]['overhead'] - fixed) / GIB:.2f} GiB scratch "
                      f"({min(context, CHUNK)} tokens)")
        if answer is None:
            console.print("[red]Even 2.00 bpw does not fit[/]: shorten the context or quantize the cache.")
        else:
            console.print(f"Largest bpw that fits: [bold]{answer:.2f}[/]")
    raise typer.Exit(0 if answer is not None else 1)
