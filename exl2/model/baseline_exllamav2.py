"""exllamav2's bit allocation, re-implemented in our own code as a baseline (docs/allocation.md).

What exllamav2 v0.2.7 does with a measurement, step by step, each step with its source:

1. **Slots** (``exllamav2/conversion/optimize.py``, ``optimize``): one slot per attention module
   and one per MLP module of every layer, in layer order. A slot's options are the measured
   combinations of ``qparams_attn`` / ``qparams_mlp`` (``conversion/measure.py``,
   ``measure_attn`` / ``measure_mlp``), each as ``(total_bits, 1 - accuracy)``, ``accuracy``
   being one minus the mean relative Frobenius error of the module's output (``test_error``).
2. **Budget** (``optimize``): ``int(numel * target_bpw)``, numel the weights of those modules.
3. **One annealing call** (``exllamav2_ext/ext_quant.cpp``, ``sim_anneal``): start from every
   slot's first option; ``int(log(t_min / t_max) / log(cooling))`` temperature steps
   (1975 for 2 → 1e-4 by 0.995) of ``iterations`` (1000) moves each; a move picks a slot and one
   of its options uniformly; it is rejected when the total bits would exceed the budget, else
   accepted when it lowers ``Σ err^norm`` or with probability ``exp(-Δ / T)``; float32 sums.
   The call returns its *final* state (not the best seen), its ``Σ err^norm``, its bits and
   its largest error.
4. **The p sweep** (``optimize``): 240 calls in three stages of 80. Stage 1 sweeps ``norm``
   linearly over 1.5..3.5; stage 2 over ``bestnorm ± 0.075`` (with exllamav2's own
   ``t = i / 79 - 1``, so slightly past both ends); in both, ``bestnorm`` is the norm of the
   call with the smallest largest error so far (strictly smaller wins). Stage 3 repeats
   ``bestnorm`` and keeps the call with the smallest ``Σ err^norm``.

Differences, all deliberate: the random generator (exllamav2 seeds ``mt19937`` from
``random_device``, so its runs are not reproducible; here a seeded numpy generator), and the
calls of one stage run side by side as vectorized chains (they are independent given their
norms, so the order of their results is kept and the selection is the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import Exl2Error

ANNEAL_TEMP_MAX = 2.0
ANNEAL_TEMP_MIN = 0.0001
ANNEAL_COOLING_FACTOR = 0.995
ANNEAL_ITER = 1000
ANNEAL_SAMPLES = 80
ANNEAL_STAGES = 3
NORM_INTERVAL = (1.5, 3.5)
NORM_2NDSTAGE = 0.15


def temperature_steps(temp_max: float = ANNEAL_TEMP_MAX, temp_min: float = ANNEAL_TEMP_MIN,
                      cooling: float = ANNEAL_COOLING_FACTOR) -> int:
    """Outer loop count of ``sim_anneal``: ``int(log(min / max) / log(cooling))`` (1975 by default)."""
    return int(math.log(temp_min / temp_max) / math.log(cooling))


@dataclass(frozen=True)
class AnnealResult:
    """One ``sim_anneal`` call: the final choice per slot, its ``Σ err^norm`` (float32, as the
    call accumulates it), total bits and largest error."""

    choice: list[int]
    sum_pow: float
    total_bits: int
    max_error: float


def sim_anneal(costs: np.ndarray, errors: np.ndarray, budgets: np.ndarray, norms: np.ndarray,
               rng: np.random.Generator, *, iterations: int = ANNEAL_ITER,
               temp_max: float = ANNEAL_TEMP_MAX, temp_min: float = ANNEAL_TEMP_MIN,
               cooling: float = ANNEAL_COOLING_FACTOR) -> list[AnnealResult]:
    """``sim_anneal`` (``ext_quant.cpp``) for C independent calls at once, each on its own problem.

    ``costs`` int64 ``[C, S, O]`` and ``errors`` ``[C, S, O]``: a slot with fewer options (or a
    call with fewer slots) pads with error ``inf``; padded options and slots are never drawn.
    ``budgets`` and ``norms`` are ``[C]``. The draws of a temperature step are made up front.
    ``U < exp(-Δ/T)`` is evaluated as ``Δ < T · (-log U)``, the same event without an ``exp`` per
    move (a move with Δ < 0 is accepted either way, as in the C++ code).
    """
    costs = np.asarray(costs, dtype=np.int64)
    errors = np.asarray(errors, dtype=np.float32)
    budgets = np.asarray(budgets, dtype=np.int64)
    norms = np.asarray(norms, dtype=np.float32)
    chains, slots, width = costs.shape
    real = np.isfinite(errors)
    option_counts = real.sum(axis=2)  # [C, S]
    slot_counts = (option_counts > 0).sum(axis=1)  # [C]: real slots come first
    # err^norm per call, in float32 as powf computes it.
    powered = np.where(real, np.power(np.where(real, errors, 0), norms[:, None, None]), 0).astype(np.float32)
    cost_flat, power_flat = costs.reshape(-1), powered.reshape(-1)
    choice = np.zeros(chains * slots, dtype=np.int64)  # flat [C, S]: every slot starts at option 0
    spent = costs[:, :, 0].sum(axis=1)
    current = np.zeros(chains, dtype=np.float32)
    for s in range(slots):  # float32 accumulation in slot order, as the C++ loop does
        current += powered[:, s, 0]
    slot_base = np.arange(chains) * slots
    temp = np.float32(temp_max)
    for _ in range(temperature_steps(temp_max, temp_min, cooling)):
        slot = (rng.random((iterations, chains)) * slot_counts).astype(np.int64)
        cell = slot_base + slot  # flat [C, S] index of the drawn slot
        option = (rng.random((iterations, chains)) * option_counts.reshape(-1)[cell]).astype(np.int64)
        new_index = cell * width + option
        threshold = (-np.log1p(-rng.random((iterations, chains)))).astype(np.float32) * temp
        for k in range(iterations):
            c = cell[k]
            old = choice[c]
            old_index = c * width + old
            d_cost = cost_flat[new_index[k]] - cost_flat[old_index]
            d_err = power_flat[new_index[k]] - power_flat[old_index]
            ok = (spent + d_cost <= budgets) & (d_err < threshold[k])
            choice[c] = np.where(ok, option[k], old)
            spent += d_cost * ok
            current += d_err * ok
        temp = np.float32(temp * np.float32(cooling))
    choice = choice.reshape(chains, slots)
    out = []
    for c in range(chains):
        n = int(slot_counts[c])
        picked = errors[c, np.arange(n), choice[c, :n]]
        out.append(AnnealResult([int(x) for x in choice[c, :n]], float(current[c]), int(spent[c]), float(picked.max())))
    return out


@dataclass(frozen=True)
class Optimized:
    """What ``optimize`` settles on: the choice per slot, the chosen ``norm`` (``bestnorm``),
    the largest error of the choice, its ``Σ err^norm`` and total bits."""

    choice: list[int]
    norm: float
    max_error: float
    sum_pow: float
    total_bits: int


def _padded(costs: list[list[int]], errors: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must give the same non-empty option lists per slot")
    width = max(len(c) for c in costs)
    c = np.zeros((len(costs), width), dtype=np.int64)
    e = np.full((len(costs), width), np.inf, dtype=np.float32)
    for s, (cs, es) in enumerate(zip(costs, errors)):
        if not all(math.isfinite(x) and x >= 0 for x in es) or any(x < 0 for x in cs):
            raise Exl2Error("errors must be finite numbers >= 0 and costs >= 0")
        c[s, : len(cs)] = cs
        e[s, : len(es)] = es
    return c, e


def stage_norms(stage: int, bestnorm: float | None = None, samples: int = ANNEAL_SAMPLES) -> list[float]:
    """The ``norm`` of each call of a stage, with ``optimize``'s own arithmetic."""
    out = []
    for i in range(samples * stage, samples * (stage + 1)):
        if i < samples:
            t = i / (samples - 1)
            out.append((1 - t) * NORM_INTERVAL[0] + t * NORM_INTERVAL[1])
        elif i < samples * 2:
            a, b = bestnorm - NORM_2NDSTAGE / 2, bestnorm + NORM_2NDSTAGE / 2
            t = i / (samples - 1) - 1
            out.append((1 - t) * a + t * b)
        else:
            out.append(bestnorm)
    return out


@dataclass(frozen=True)
class Problem:
    """One measurement to allocate: ``costs[s][o]`` bits and ``errors[s][o]`` (``1 - accuracy``)
    per slot and option, and the budget ``int(numel * target_bpw)``."""

    costs: list[list[int]]
    errors: list[list[float]]
    budget_bits: int


def optimize(problem: Problem, seed: int = 0, **kw) -> Optimized:
    """exllamav2's ``optimize`` on one problem (see :func:`optimize_many`)."""
    return optimize_many([problem], seed, **kw)[0]


def optimize_many(problems: list[Problem], seed: int = 0, *, samples: int = ANNEAL_SAMPLES,
                  iterations: int = ANNEAL_ITER) -> list[Optimized]:
    """exllamav2's ``optimize`` on each problem; the calls of one stage of every problem run as
    one vectorized batch (they are independent). ``samples`` (80 calls per stage) and
    ``iterations`` (1000 moves per temperature) may be lowered for tests only."""
    padded = [_padded(p.costs, p.errors) for p in problems]
    for p, (c, _) in zip(problems, padded):
        start = int(c[:, 0].sum())
        if start > p.budget_bits:
            # sim_anneal starts from the first options and accepts only moves that end within the
            # budget, so an over-budget start would come back unchanged: not an allocation.
            raise Exl2Error(f"the first options of the slots need {start:,} bits, over the budget of {p.budget_bits:,}")
    slots = max(c.shape[0] for c, _ in padded)
    width = max(c.shape[1] for c, _ in padded)
    costs = np.zeros((len(problems), slots, width), dtype=np.int64)
    errors = np.full((len(problems), slots, width), np.inf, dtype=np.float32)
    for t, (c, e) in enumerate(padded):
        costs[t, : c.shape[0], : c.shape[1]] = c
        errors[t, : e.shape[0], : e.shape[1]] = e
    budgets = np.array([p.budget_bits for p in problems], dtype=np.int64)
    rng = np.random.default_rng(seed)
    state = [{"m": math.inf, "p": math.inf, "bestnorm": None, "result": None} for _ in problems]
    for stage in range(ANNEAL_STAGES):
        norms = [stage_norms(stage, st["bestnorm"], samples) for st in state]
        results = sim_anneal(np.repeat(costs, samples, axis=0), np.repeat(errors, samples, axis=0),
                             np.repeat(budgets, samples), np.array([n for ns in norms for n in ns]), rng,
                             iterations=iterations)
        for t, st in enumerate(state):
            for j in range(samples):  # in call order, as optimize's loop compares them
                r, norm = results[t * samples + j], norms[t][j]
                if stage < 2:
                    if r.max_error < st["m"]:
                        st["m"], st["bestnorm"] = r.max_error, norm
                elif r.sum_pow < st["p"]:
                    st["p"], st["result"] = r.sum_pow, r
    return [Optimized(st["result"].choice, float(st["bestnorm"]), st["result"].max_error, st["result"].sum_pow,
                      st["result"].total_bits) for st in state]
