"""Benchmarks: `pytest benchmarks --benchmark-enable` (pytest-benchmark). Ratios are measured side
by side in one run; no test here asserts a time.

Benchmarks that compare two things put ``name -> (ratio, {what: rate})`` into :data:`RATIOS`;
the ratios are printed at the end of the run.
"""

from __future__ import annotations

import torch

if not torch.cuda.is_available():  # the fast path's cases run interpreted (their times mean nothing then)
    from exl2.fast import use_interpreter

    use_interpreter()

#: Side-by-side comparisons measured in this run: name -> (ratio, {what: weights per second}).
RATIOS: dict[str, tuple[float, dict[str, float]]] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if not RATIOS:
        return
    terminalreporter.section("side-by-side ratios")
    for name, (ratio, rates) in RATIOS.items():
        detail = ", ".join(f"{what} {rate / 1e6:.0f} M/s" for what, rate in rates.items())
        terminalreporter.write_line(f"{name}: {ratio:.2f} ({detail})")
