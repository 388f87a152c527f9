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

``objective="max"`` minimises the largest layer error instead (the figure exllamav2's optimizer
tunes its error norm for): solved exactly by bisection over the distinct error values, the
cheapest allowed option per layer deciding feasibility; among the choices that reach that
maximum, the sum of errors is then minimised as above.
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
    """``choice[i]``: the option taken for layer i; ``total_bits``: their summed cost (<= budget);
    ``objective``: their summed (or largest) error; ``bound``: a proven lower bound on the optimal
    objective, so ``objective - bound`` is a certified gap (None when nothing is proven)."""

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


def allocate(costs: list[list[int]], errors: list[list[float]], budget_bits: int, objective: str = "sum", *,
             exact: bool | None = None) -> Allocation:
    """Choose one option per layer (``costs[i][j]`` bits, ``errors[i][j]`` error) so that total
    bits stay within ``budget_bits`` and the sum of errors (``objective="sum"``) or the largest
    error (``"max"``, exact) is smallest. ``exact`` forces (True) or forbids (False) the dynamic
    program of the sum; by default it runs when its table is small."""
    if objective not in ("sum", "max"):
        raise Exl2Error(f"unknown allocation objective {objective!r} (sum or max)")
    c, e, valid = _arrays(costs, errors)
    if np.any(valid & ~(np.isfinite(e) & (e >= 0))) or np.any(valid & (c < 0)):
        raise Exl2Error("errors must be finite numbers >= 0 and costs >= 0")
    cheapest = int(np.where(valid, c, np.iinfo(np.int64).max).min(axis=1).sum())
    if cheapest > budget_bits:
        raise Exl2Error(f"even the cheapest options need {cheapest:,} bits, over the budget of {budget_bits:,}")
    if objective == "max":
        return _minimax(c, e, valid, budget_bits, exact)
    return _sum(c, e, valid, budget_bits, exact)


def _sum(c: np.ndarray, e: np.ndarray, valid: np.ndarray, budget: int, exact: bool | None) -> Allocation:
    unit = reduce(math.gcd, (int(x) for x in c[valid]), 0) or 1
    cells = len(c) * (budget // unit + 1)
    if exact or (exact is None and cells <= EXACT_CELLS):
        return _exact(c, e, valid, budget, unit)
    return _lagrangian(c, e, valid, budget)


def _minimax(c: np.ndarray, e: np.ndarray, valid: np.ndarray, budget: int, exact: bool | None) -> Allocation:
    """Least possible largest error: the smallest threshold t at which taking, per layer, the
    cheapest option with error <= t fits. That cost only falls as t grows, so bisect over the
    sorted distinct error values; the largest one admits every option, which fits."""
    big = np.iinfo(np.int64).max // (4 * max(1, len(c)))

    def fits(t: float) -> bool:
        allowed = valid & (e <= t)
        if not allowed.any(axis=1).all():
            return False
        return int(np.where(allowed, c, big).min(axis=1).sum()) <= budget

    levels = np.unique(e[valid])
    lo, hi = 0, len(levels) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(float(levels[mid])):
            hi = mid
        else:
            lo = mid + 1
    worst = float(levels[lo])
    allowed = valid & (e <= worst)
    inner = _sum(np.where(allowed, c, big), np.where(allowed, e, np.inf), allowed, budget, exact)
    rows = np.arange(len(c))
    choice = np.array(inner.choice)
    return Allocation(inner.choice, int(c[rows, choice].sum()), float(e[rows, choice].max()), worst)


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


def anneal(costs: list[list[int]], errors: list[list[float]], budget_bits: int, seed: int = 0,
           iterations: int = 20_000) -> Allocation:
    """A simulated-annealing baseline in the manner of exllamav2's optimizer (``sim_anneal`` in its
    extension, called from ``conversion/optimize.py``), for comparison only: start from the
    cheapest options, propose one layer and one of its options uniformly at random, reject moves
    over the budget, accept improvements always and worsening moves with probability
    ``exp(-Δ/T)``, the temperature falling geometrically (exllamav2: from 2 to 1e-4 by 0.995 per
    1000 moves; here over ``iterations`` moves, from the spread of the errors to 1e-4 of it,
    because exllamav2's absolute temperatures assume its own error scale). Returns the best
    choice seen; ``bound`` is None (annealing proves nothing)."""
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
