"""Bit allocation: one option per layer, total bits within the budget, total error smallest.

This is a multiple-choice knapsack. exllamav2 searches it with simulated annealing
(``exllamav2/conversion/optimize.py``). Here it is solved by Lagrangian relaxation, which also
proves a lower bound on the optimum, so the gap of the answer is certified:

1. For a multiplier ``λ ≥ 0`` each layer independently picks ``argmin_j e_ij + λ c_ij``. The total
   cost falls as λ grows; bisection finds the smallest λ whose choice fits the budget.
2. ``L(λ) = Σ_i min_j (e_ij + λ c_ij) - λ B`` is a lower bound on the optimal total error for
   every λ ≥ 0 (weak duality); the best one seen is reported as ``bound``.
3. The feasible choice leaves budget unspent; a greedy repair upgrades, one layer at a time, the
   option with the largest error decrease per extra bit that still fits, until nothing fits.

When the costs, divided by their greatest common divisor, make a small table, an exact dynamic
program over the budget is used instead (``bound`` = objective, gap 0).
Deterministic: ties go to the lower index.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..errors import Exl2Error

#: Largest DP table (layers x budget units) solved exactly.
EXACT_CELLS = 20_000_000


@dataclass(frozen=True)
class Allocation:
    choice: list[int]
    total_bits: int
    objective: float
    bound: float | None

    @property
    def gap(self) -> float | None:
        return None if self.bound is None else self.objective - self.bound


def _arrays(costs: list[list[int]], errors: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must give the same non-empty option lists per layer")
    width = max(len(c) for c in costs)
    c = np.full((len(costs), width), np.iinfo(np.int64).max // (4 * max(1, len(costs))), dtype=np.int64)
    e = np.full((len(costs), width), np.inf)
    valid = np.zeros((len(costs), width), dtype=bool)
    for i, (ci, ei) in enumerate(zip(costs, errors)):
        c[i, : len(ci)] = ci
        e[i, : len(ei)] = ei
        valid[i, : len(ci)] = True
    return c, e, valid


def allocate(costs: list[list[int]], errors: list[list[float]], budget_bits: int, *, exact: bool | None = None) -> Allocation:
    """Choose one option per layer (``costs[i][j]`` bits, ``errors[i][j]`` error) so that total
    bits stay within ``budget_bits`` and the sum of errors is smallest (or certifiably close)."""
    c, e, valid = _arrays(costs, errors)
    n = len(costs)
    cheapest = int(np.where(valid, c, np.iinfo(np.int64).max).min(axis=1).sum())
    if cheapest > budget_bits:
        raise Exl2Error(f"even the cheapest options need {cheapest:,} bits, over the budget of {budget_bits:,}")
    unit = reduce(math.gcd, (int(x) for ci in costs for x in ci), 0) or 1
    cells = n * (budget_bits // unit + 1)
    if exact or (exact is None and cells <= EXACT_CELLS):
        return _exact(c, e, valid, budget_bits, unit)
    return _lagrangian(c, e, valid, budget_bits)


def _pick(c: np.ndarray, e: np.ndarray, lam: float) -> np.ndarray:
    return np.argmin(e + lam * c, axis=1)  # first index on ties


def _lagrangian(c: np.ndarray, e: np.ndarray, valid: np.ndarray, budget: int) -> Allocation:
    rows = np.arange(len(c))
    lo, hi = 0.0, 1.0
    while c[rows, _pick(c, e, hi)].sum() > budget:
        hi *= 2.0
        if hi > 1e300:  # pragma: no cover - budget admits the cheapest choice, so this ends
            break
    bound = -math.inf
    for lam in (lo, hi):
        bound = max(bound, float((e + lam * c).min(axis=1).sum() - lam * budget))
    if c[rows, _pick(c, e, lo)].sum() <= budget:
        hi = lo
    for _ in range(200):
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        j = _pick(c, e, mid)
        bound = max(bound, float((e + mid * c).min(axis=1).sum() - mid * budget))
        if c[rows, j].sum() <= budget:
            hi = mid
        else:
            lo = mid
    choice = _pick(c, e, hi)
    choice = _repair(c, e, choice, budget)
    total = int(c[rows, choice].sum())
    obj = float(e[rows, choice].sum())
    return Allocation([int(x) for x in choice], total, obj, min(bound, obj))


def _repair(c: np.ndarray, e: np.ndarray, choice: np.ndarray, budget: int) -> np.ndarray:
    """Spend the leftover budget: repeatedly take the single-layer change with the largest error
    decrease per extra bit that still fits."""
    choice = choice.copy()
    rows = np.arange(len(c))
    spent = int(c[rows, choice].sum())
    while True:
        dc = c - c[rows, choice][:, None]
        de = e[rows, choice][:, None] - e  # error decrease
        ok = (de > 0) & (dc <= budget - spent) & np.isfinite(e)
        if not ok.any():
            return choice
        score = np.where(ok, de / np.maximum(dc, 1), -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        spent += int(dc[i, j])
        choice[i] = j


def _exact(c: np.ndarray, e: np.ndarray, valid: np.ndarray, budget: int, unit: int) -> Allocation:
    """Dynamic program over the budget in units of the costs' gcd: best[b] = least error with b units."""
    cap = budget // unit
    cu = np.where(valid, c // unit, cap + 1)
    n, width = c.shape
    best = np.zeros(cap + 1)
    picks = np.zeros((n, cap + 1), dtype=np.int32)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for j in range(width):
            if not valid[i, j] or cu[i, j] > cap:
                continue
            k = int(cu[i, j])
            cand = np.full(cap + 1, np.inf)
            cand[k:] = best[: cap + 1 - k] + e[i, j]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    b = int(np.argmin(best))  # first (cheapest) budget reaching the least error
    obj = float(best[b])
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        j = int(picks[i, b])
        choice[i] = j
        b -= int(cu[i, j])
    rows = np.arange(n)
    total = int(c[rows, choice].sum())
    return Allocation(choice, total, float(e[rows, choice].sum()), obj)


def anneal(costs: list[list[int]], errors: list[list[float]], budget_bits: int, *, seed: int = 0,
           iterations: int = 20_000) -> Allocation:
    """A simulated-annealing baseline in the manner of exllamav2's optimizer: start from the
    cheapest options, propose one layer's option at random, accept improvements and, with a
    temperature falling geometrically, some worsening moves; infeasible moves are rejected."""
    c, e, valid = _arrays(costs, errors)
    n = len(costs)
    rng = random.Random(seed)
    rows = np.arange(n)
    choice = np.where(valid, c, np.iinfo(np.int64).max).argmin(axis=1)
    if int(c[rows, choice].sum()) > budget_bits:
        raise Exl2Error("even the cheapest options exceed the budget")
    spent = int(c[rows, choice].sum())
    obj = float(e[rows, choice].sum())
    best, best_obj = choice.copy(), obj
    t0 = max(1e-12, float(np.nanstd(np.where(valid, e, np.nan))))
    for step in range(iterations):
        temp = t0 * (1e-4 ** (step / iterations))
        i = rng.randrange(n)
        j = rng.randrange(len(costs[i]))
        d_cost = int(c[i, j] - c[i, choice[i]])
        if spent + d_cost > budget_bits:
            continue
        d_err = float(e[i, j] - e[i, choice[i]])
        if d_err <= 0 or rng.random() < math.exp(-d_err / temp):
            choice[i] = j
            spent += d_cost
            obj += d_err
            if obj < best_obj:
                best, best_obj = choice.copy(), obj
    return Allocation([int(x) for x in best], int(c[rows, best].sum()), float(e[rows, best].sum()), None)
