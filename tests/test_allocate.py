"""The bit allocator against brute force, its certificate, the annealing baseline."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exl2.errors import Exl2Error
from exl2.model.allocate import allocate, anneal


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 5))
    costs, errors = [], []
    for _ in range(layers):
        k = draw(st.integers(1, 4))
        costs.append(draw(st.lists(st.integers(1, 60), min_size=k, max_size=k)))
        errors.append(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k)))
    cheapest = sum(min(c) for c in costs)
    budget = draw(st.integers(cheapest, cheapest + 150))
    return costs, errors, budget


def brute_force(costs, errors, budget, combine=sum):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, choice)) <= budget:
            obj = combine(e[j] for e, j in zip(errors, choice))
            best = obj if best is None else min(best, obj)
    return best


@given(problems(), st.booleans())
def test_feasible_and_certified(problem, exact):
    costs, errors, budget = problem
    a = allocate(costs, errors, budget, exact=exact)
    assert a.total_bits == sum(c[j] for c, j in zip(costs, a.choice)) <= budget
    assert a.objective == pytest.approx(sum(e[j] for e, j in zip(errors, a.choice)))
    opt = brute_force(costs, errors, budget)
    assert a.bound <= opt + 1e-9 <= a.objective + 2e-9  # bound <= optimum <= objective
    if exact:
        assert a.objective == pytest.approx(opt, abs=1e-9) and a.gap == pytest.approx(0, abs=1e-9)


@given(problems(), st.booleans())
def test_minimax_is_exact(problem, exact):
    costs, errors, budget = problem
    a = allocate(costs, errors, budget, objective="max", exact=exact)
    assert a.total_bits == sum(c[j] for c, j in zip(costs, a.choice)) <= budget
    assert a.objective == max(e[j] for e, j in zip(errors, a.choice))
    assert a.objective == a.bound == brute_force(costs, errors, budget, combine=max)


def test_never_worse_than_annealing():
    import random

    rng = random.Random(1)
    for case in range(10):
        n = 40
        costs = [[b * 1000 + rng.randrange(100) for b in (2, 3, 4, 5, 6, 8)] for _ in range(n)]
        errors = [[rng.uniform(0.5, 2) * 2.0 ** (-b) for b in (2, 3, 4, 5, 6, 8)] for _ in range(n)]
        budget = int(n * 1000 * rng.uniform(2.5, 7))
        a = allocate(costs, errors, budget, exact=False)
        s = anneal(costs, errors, budget, seed=case)
        assert s.total_bits <= budget
        assert a.objective <= s.objective + 1e-12


@pytest.mark.parametrize("objective", ["sum", "max"])
def test_infeasible_budget_raises(objective):
    with pytest.raises(Exl2Error, match="cheapest"):
        allocate([[10, 20], [5]], [[1.0, 0.5], [0.0]], 14, objective)


@pytest.mark.parametrize("errors, objective", [([[1.0, -0.5]], "sum"), ([[1.0, float("nan")]], "sum"),
                                               ([[1.0, 0.5]], "mean")])
def test_bad_input_raises(errors, objective):
    with pytest.raises(Exl2Error):
        allocate([[1, 2]], errors, 5, objective)


def test_deterministic():
    costs = [[1, 2, 3]] * 6
    errors = [[3.0, 2.0, 1.0]] * 6  # many equal optima
    runs = {tuple(allocate(costs, errors, 12, exact=x).choice) for x in (True, False) for _ in range(3)}
    assert all(sum(c) <= 12 for c in runs)
    assert len({tuple(allocate(costs, errors, 12, exact=False).choice) for _ in range(3)}) == 1
