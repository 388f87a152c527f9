"""The allocator against an annealing baseline on synthetic measurements of an 80-layer model
(7 linears per layer, 20 options each), side by side. Run with --benchmark-enable."""

from __future__ import annotations

import numpy as np
import pytest

from exl2.model.allocate import allocate, anneal

BITS = np.linspace(2.1, 8.1, 20)


@pytest.fixture(scope="module")
def measurements():
    rng = np.random.default_rng(0)
    shapes = [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192), (8192, 28672), (8192, 28672), (28672, 8192)] * 80
    numel = np.array([k * n for k, n in shapes])
    sens = rng.lognormal(0, 1, len(shapes))
    costs = [[int(b * m) for b in BITS] for m in numel]
    errors = [[float(s * 2.0 ** (-1.8 * b) * (1 + 0.05 * rng.random())) for b in BITS] for s in sens]
    return costs, errors, int(numel.sum())


RESULTS: dict = {}
#: The moves of one exllamav2 ``sim_anneal`` call: 1000 per temperature, 2 -> 1e-4 by 0.995 (1975 steps).
ANNEAL_MOVES = 1_975_000


@pytest.mark.parametrize("target", [2.5, 4.0, 6.0])
def test_allocate(benchmark, measurements, target):
    costs, errors, numel = measurements
    a = benchmark(allocate, costs, errors, int(numel * target))
    RESULTS[("lagrange", target)] = (a, benchmark.stats.stats.median)
    benchmark.extra_info.update(objective=a.objective, certified_gap=a.gap, relative_gap=a.gap / a.objective)


@pytest.mark.parametrize("target", [2.5, 4.0, 6.0])
def test_anneal(benchmark, measurements, target):
    costs, errors, numel = measurements
    s = benchmark.pedantic(anneal, args=(costs, errors, int(numel * target)), kwargs={"iterations": ANNEAL_MOVES},
                           rounds=1, iterations=1)
    benchmark.extra_info.update(objective=s.objective, moves=ANNEAL_MOVES)
    if ("lagrange", target) in RESULTS:
        a, t = RESULTS[("lagrange", target)]
        ratio = s.objective / a.objective
        benchmark.extra_info.update(annealing_over_lagrange_objective=ratio, time_ratio=benchmark.stats.stats.median / t)
        print(f"\n{target} bpw: lagrange objective {a.objective:.4g} (certified gap {a.gap / a.objective:.2e} rel) "
              f"in {t * 1e3:.1f} ms; annealing {s.objective:.4g} ({ratio:.2f}x worse) in "
              f"{benchmark.stats.stats.median:.2f} s")
