"""Benchmarks: `pytest benchmarks --benchmark-enable` (pytest-benchmark). Ratios are measured side
by side in one run; no test here asserts a time."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
