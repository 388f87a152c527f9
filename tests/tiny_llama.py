"""The tiny llama the model tests quantize (and docs/make_ablation.py measures): 2 layers, width
64, random weights (seed 0), a character-level tokenizer (:func:`tests.tiny_models.write_model`)."""

from __future__ import annotations

from pathlib import Path

from .tiny_models import write_model


def build(folder: Path) -> Path:
    return write_model(folder)
