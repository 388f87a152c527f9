"""``exl2 generate MODEL "prompt" [--max-new-tokens N]``: text from an EXL2 causal LM, streamed."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import Exl2Error, printable
from . import app
from .run_options import device_of, dtype_of, quiet_transformers


@app.command("generate")
def generate_cmd(
    model: Path = typer.Argument(None, help="EXL2 model folder (a causal LM)"),
    prompt: str = typer.Argument(None, help="the text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above 0: sampled"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="nucleus sampling (with --temperature)"),
    seed: int = typer.Option(None, "--seed", help="random seed of sampling"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16 or float32 (activations)"),
    decoded_cache: bool = typer.Option(False, "--decoded-cache", help="CPU: decode each layer once and keep it (faster, ~16/bpw x the memory)"),
) -> None:
    """Continue PROMPT with an EXL2 causal LM (validated first), printing the text as it comes;
    tokens per second on stderr."""
    from ..runtime.evaluate import is_causal, tokenizer
    from ..runtime.generate import generate
    from ..runtime.load import load
    from . import fail

    quiet_transformers()

    if model is None or prompt is None:
        print("exl2: error: usage: exl2 generate MODEL PROMPT", file=sys.stderr)
        raise typer.Exit(2)
    try:
        if not is_causal(model):
            print(printable(f"exl2: error: {model}: config.json names no causal LM (…ForCausalLM); generate needs one"),
                  file=sys.stderr)
            raise typer.Exit(2)
        m = load(model, device=device_of(device), dtype=dtype_of(dtype), decoded_cache=decoded_cache)
        tok = tokenizer(model)
        sys.stdout.write(prompt)
        out = generate(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       emit=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    except Exl2Error as e:
        raise fail(e) from None
    sys.stdout.write("\n")
    print(f"{out.new_tokens} tokens in {out.seconds:.2f} s ({out.tokens_per_second:.2f} tokens/s)", file=sys.stderr)
