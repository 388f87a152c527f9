"""exllamav2's allocation as re-implemented in exl2.model.baseline_exllamav2: its documented
schedule, its selection rules, and that it never beats the exact optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exl2.errors import Exl2Error
from exl2.model import baseline_exllamav2 as bx
from exl2.model.allocate import allocate


def test_schedule_is_exllamav2s():
    # 2 -> 1e-4 by x0.995: 1975 steps keep the temperature above 1e-4, a 1976th would not
    assert bx.temperature_steps() == 1975
    assert 2 * 0.995 ** 1975 >= 1e-4 > 2 * 0.995 ** 1976
    assert bx.ANNEAL_ITER * bx.temperature_steps() == 1_975_000  # moves per call (docs/allocation.md)
    assert bx.ANNEAL_SAMPLES * bx.ANNEAL_STAGES == 240  # calls per optimize


def test_norm_sweep_stages():
    first = bx.stage_norms(0)
    assert len(first) == 80 and first[0] == 1.5 and first[-1] == pytest.approx(3.5)
    assert all(b > a for a, b in zip(first, first[1:]))
    second = bx.stage_norms(1, 2.0)
    step = 0.15 / 79
    # optimize.py's t = i / 79 - 1 starts one step into the interval and ends one step past it
    assert second[0] == pytest.approx(2.0 - 0.075 + step) and second[-1] == pytest.approx(2.0 + 0.075 + step)
    assert bx.stage_norms(2, 2.25) == [2.25] * 80


def _problems(seeds, slots=6, options=5):
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        bits = np.sort(rng.uniform(2, 8, (slots, options)), axis=1)
        costs = (bits * 1000).astype(int)
        errors = np.exp(-bits) * rng.uniform(0.3, 3, (slots, 1)) + rng.uniform(0, 0.002, (slots, options))
        errors = errors.astype(np.float32).astype(np.float64)  # the float32 values sim_anneal computes with
        budget = int(costs[:, 0].sum() + rng.uniform(0.2, 0.8) * (costs[:, -1] - costs[:, 0]).sum())
        out.append(bx.Problem(costs.tolist(), errors.tolist(), budget))
    return out


def test_never_beats_the_exact_optimum_and_stays_within_budget():
    problems = _problems(range(8))
    results = bx.optimize_many(problems, seed=1, samples=4, iterations=20)
    for p, r in zip(problems, results):
        c, e = np.array(p.costs), np.array(p.errors)
        picked = e[np.arange(len(c)), r.choice]
        assert r.total_bits == c[np.arange(len(c)), r.choice].sum() <= p.budget_bits
        assert r.max_error == pytest.approx(picked.max())
        true_sum = float((picked ** r.norm).sum())
        # sim_anneal keeps its sum in float32 by adding each accepted move's change: it drifts
        assert r.sum_pow == pytest.approx(true_sum, rel=1e-2)
        # the least largest error, and the least sum of err^norm at the norm it chose: exact
        assert allocate(p.costs, p.errors, p.budget_bits, "max").objective <= r.max_error
        exact = allocate(p.costs, (e ** r.norm).tolist(), p.budget_bits, exact=True)
        assert exact.objective <= true_sum * (1 + 1e-9)


def test_anneals_to_the_optimum_of_an_easy_problem():
    # two slots, the budget admits one upgrade: the better upgrade is the unique optimum
    p = bx.Problem([[10, 20], [10, 20]], [[0.5, 0.1], [0.3, 0.2]], 30)
    r = bx.optimize(p, seed=0, samples=3, iterations=50)
    assert r.choice == [1, 0] and r.total_bits == 30


def test_selection_rules(monkeypatch):
    """Stages 1-2 keep the norm of the call with the smallest largest error (strictly smaller
    wins); stage 3 keeps the call with the smallest sum, whatever its largest error."""
    calls = []

    def fake(costs, errors, budgets, norms, rng, **kw):
        out = []
        for n in norms:
            calls.append(float(n))
            stage3 = len(calls) > 2 * 5
            max_error = abs(float(n) - 2.3) if not stage3 else 0.5 - len(calls) / 100
            sum_pow = 1.0 + (len(calls) == 13) * -0.5 if stage3 else 9.0
            out.append(bx.AnnealResult([len(calls) % 2], sum_pow, 10, max_error))
        return out

    monkeypatch.setattr(bx, "sim_anneal", fake)
    r = bx.optimize(bx.Problem([[10, 20]], [[0.2, 0.1]], 20), samples=5)
    sweep = bx.stage_norms(0, samples=5)
    best1 = min(sweep, key=lambda n: abs(n - 2.3))
    second = bx.stage_norms(1, best1, samples=5)
    assert calls[:5] == pytest.approx(sweep) and calls[5:10] == pytest.approx(second)
    assert r.norm == pytest.approx(min(sweep + second, key=lambda n: abs(n - 2.3)))
    assert calls[10:] == pytest.approx([r.norm] * 5)
    assert r.sum_pow == 0.5 and r.choice == [13 % 2]  # the 13th call had the least sum


def test_seeded_runs_repeat():
    p = _problems([3])[0]
    assert bx.optimize(p, seed=5, samples=2, iterations=10) == bx.optimize(p, seed=5, samples=2, iterations=10)


def test_over_budget_start_and_bad_errors_raise():
    with pytest.raises(Exl2Error, match="first options"):
        bx.optimize(bx.Problem([[30, 10]], [[0.1, 0.2]], 20), samples=1, iterations=1)
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(Exl2Error):
            bx.optimize(bx.Problem([[10, 20]], [[bad, 0.1]], 20), samples=1, iterations=1)
