"""exllamav2's measurement unit, the slot: a block's attention linears, or its MLP linears.

exllamav2 measures and allocates per slot (``exllamav2/conversion/measure.py``, ``measure_attn``
and ``measure_mlp``; ``conversion/optimize.py``): a slot's options are the rows of its table
(``qparams_attn``: one QParams each for q, k, v, o; ``qparams_mlp``: gate, up, down; without a
gate the first column is ignored, ``get_qparams_reduced(..., ignore_gate)``), and every row is
measured with all of the slot's linears quantized together. Its cost is the sum of the linears'
``total_bits`` (bias included).

Here a row's error is measured on the *block's* output (the pipeline's unit, so that per-slot and
per-linear measurements compare), both as exllamav2's ``1 - accuracy`` (the mean relative
Frobenius error over rows, ``test_error``), which its annealing uses, and as the relative squared
error the pipeline's measurement uses, which the exact allocator minimises in sum. exllamav2
measures the attention slot on the attention module's output (residual included) instead.
"""

from __future__ import annotations

from ..qparams import QParams
from . import calibration
from .variants import Recipe, _model_kwargs, _restore, block_linears, encode, input_stats, output_errors, put


def _q(group_size, bits, prop) -> QParams:
    return QParams(group_size, bits, prop)


#: ``qparams_attn`` (``exllamav2/conversion/qparams.py``): per row, QParams of q, k, v, o.
QPARAMS_ATTN: tuple[tuple[QParams, ...], ...] = tuple(tuple(_q(*a) for a in row) for row in (
    ((64, [3, 2], [0.05, 0.95]),) * 4,
    ((64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.25, 0.75]), (64, [3, 2], [0.1, 0.9])),
    ((64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.1, 0.9]), (128, [4, 3], [0.1, 0.9]), (64, [3, 2], [0.1, 0.9])),
    ((64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.1, 0.9]), (128, [4, 3], [0.1, 0.9]), (128, [4, 3], [0.1, 0.9])),
    ((128, [4, 3], [0.1, 0.9]),) * 4,
    ((128, [4, 3], [0.1, 0.9]), (128, [4, 3], [0.1, 0.9]), (64, [4, 3], [0.1, 0.9]), (128, [4, 3], [0.1, 0.9])),
    ((128, [4], [1]),) * 4,
    ((128, [4], [1]), (128, [4], [1]), (64, [4], [1]), (128, [4], [1])),
    ((64, [4], [1]), (64, [4], [1]), (32, [4], [1]), (64, [4], [1])),
    ((32, [4], [1]),) * 4,
    ((128, [5, 4], [0.1, 0.9]), (128, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9]), (128, [5, 4], [0.1, 0.9])),
    ((64, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9]), (32, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9])),
    ((64, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9]), (64, [5], [1]), (64, [5, 4], [0.1, 0.9])),
    ((32, [5, 4], [0.1, 0.9]), (32, [5, 4], [0.1, 0.9]), (32, [5], [1]), (32, [5, 4], [0.1, 0.9])),
    ((128, [6, 5], [0.1, 0.9]), (128, [6, 5], [0.1, 0.9]), (128, [6], [1]), (128, [6, 5], [0.1, 0.9])),
    ((32, [6, 5], [0.1, 0.9]), (32, [6, 5], [0.1, 0.9]), (32, [6], [1]), (32, [6, 5], [0.1, 0.9])),
    ((128, [6], [1]),) * 4,
    ((32, [6], [1]), (32, [6], [1]), (32, [8], [1]), (32, [6], [1])),
    ((128, [8], [1]),) * 4,
))

#: ``qparams_mlp``: per row, QParams of gate, up, down.
QPARAMS_MLP: tuple[tuple[QParams, ...], ...] = tuple(tuple(_q(*a) for a in row) for row in (
    ((64, [3, 2], [0.05, 0.95]), (64, [3, 2], [0.05, 0.95]), ([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    ((64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.25, 0.75]), ([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    ((64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.3, 0.7]), (32, [5, 3], [0.05, 0.95])),
    ((64, [3, 2], [0.1, 0.9]), (64, [3, 2], [0.3, 0.7]), (32, [5, 4], [0.05, 0.95])),
    ((128, [4, 3], [0.1, 0.9]), (128, [4, 3], [0.25, 0.75]), ([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])),
    ((32, [4, 3], [0.1, 0.9]), (32, [4, 3], [0.25, 0.75]), ([32, 32, 32], [8, 4, 3], [0.05, 0.1, 0.85])),
    ((32, [4, 3], [0.1, 0.9]), (32, [4, 3], [0.25, 0.75]), ([32, 128], [8, 4], [0.05, 0.95])),
    ((128, [4], [1]), (32, [4], [1]), ([32, 128], [8, 4], [0.05, 0.95])),
    ((32, [4], [1]), (32, [4], [1]), ([32, 32], [8, 4], [0.05, 0.95])),
    ((128, [5, 4], [0.1, 0.9]), (128, [5, 4], [0.25, 0.75]), ([32, 128, 128], [8, 5, 4], [0.05, 0.1, 0.85])),
    ((32, [5, 4], [0.1, 0.9]), (32, [5, 4], [0.25, 0.75]), ([32, 32, 32], [8, 5, 4], [0.05, 0.1, 0.85])),
    ((128, [6, 5], [0.1, 0.9]), (128, [6, 5], [0.25, 0.75]), ([32, 128, 128], [8, 6, 5], [0.05, 0.1, 0.85])),
    ((32, [6, 5], [0.1, 0.9]), (32, [6, 5], [0.25, 0.75]), ([32, 32, 32], [8, 6, 5], [0.05, 0.1, 0.85])),
    ((128, [6], [1]), (128, [6], [1]), ([32, 128], [8, 6], [0.05, 0.95])),
    ((128, [8, 6], [0.1, 0.9]), (128, [8, 6], [0.1, 0.9]), (128, [8, 6], [0.15, 0.85])),
    ((128, [8, 6], [0.1, 0.9]), (128, [8, 6], [0.1, 0.9]), (128, [8], [1])),
    ((128, [8], [1]),) * 3,
))


def slots_of_block(keys: list[str]) -> list[tuple[str, list[str], tuple[tuple[QParams, ...], ...]]]:
    """The block's two slots as ``(name, linear keys, table rows)``: the first four linears (in
    module order: q, k, v, o, or BERT's query, key, value, attention output) are the attention
    slot; the rest (gate, up, down, or BERT's intermediate and output) the MLP slot, whose table
    drops the gate column when there are two."""
    if len(keys) not in (6, 7):
        raise ValueError(f"exllamav2's slots need 4 attention and 2 or 3 MLP linears per block, found {len(keys)}")
    mlp = QPARAMS_MLP if len(keys) == 7 else tuple(row[1:] for row in QPARAMS_MLP)
    return [("attn", keys[:4], QPARAMS_ATTN), ("mlp", keys[4:], mlp)]


def measure_slots(src, data, recipe: Recipe) -> dict:
    """Per slot and table row: cost (bits), exllamav2's error and the relative squared error of
    the block output, every linear of the slot quantized with its column's QParams."""
    slots = []
    inputs = calibration.first_block_inputs(src.model, src.blocks[0][1], data, **_model_kwargs(src))
    for (prefix, block), linears in zip(src.blocks, block_linears(src)):
        modules = dict(linears)
        stats = input_stats(block, modules, inputs)
        reference = calibration.run_block(block, inputs).args
        for name, keys, table in slots_of_block([k for k, _ in linears]):
            # Each distinct QParams of a column is encoded once (``get_qparams_reduced``).
            encoded = {(k, q.desc()): None for row in table for k, q in zip(keys, row)}
            for k, desc in encoded:
                q = next(q for row in table for kk, q in zip(keys, row) if kk == k and q.desc() == desc)
                encoded[(k, desc)] = encode(modules[k], q, stats[k], recipe)
            saved = {k: (modules[k].weight.detach().clone(),
                         None if modules[k].bias is None else modules[k].bias.detach().clone()) for k in keys}
            rows = []
            for row in table:
                for k, q in zip(keys, row):
                    put(modules[k], encoded[(k, q.desc())])
                rse, rfn = output_errors(block, inputs, reference)
                cost = sum(q.total_bits(modules[k].in_features, modules[k].out_features, modules[k].bias is not None)
                           for k, q in zip(keys, row))
                rows.append({"cost": cost, "error": rfn, "rse": rse, "qparams": {k: q.desc() for k, q in zip(keys, row)}})
            for k in keys:
                _restore(modules[k], saved[k])
            slots.append({"name": f"{prefix}.{name}", "keys": keys, "rows": rows,
                          "table": [[q for q in row] for row in table]})
        inputs = calibration.run_block(block, inputs)
    return {"slots": slots}


def _choice(m: dict, picks: list[int]) -> dict[str, QParams]:
    return {k: q for s, j in zip(m["slots"], picks) for k, q in zip(s["keys"], s["table"][j])}


def costs(m: dict) -> list[list[int]]:
    return [[r["cost"] for r in s["rows"]] for s in m["slots"]]


def exact_plans(m: dict, budgets: list[int]) -> list[dict[str, QParams]]:
    """One table row per slot for each budget, by the exact allocator on the sum of relative
    squared errors (the pipeline's objective)."""
    from .allocate import allocate

    errors = [[r["rse"] for r in s["rows"]] for s in m["slots"]]
    return [_choice(m, allocate(costs(m), errors, b).choice) for b in budgets]


def anneal_plans(measurements: list[tuple[dict, list[int]]], seed: int = 0,
                 **kw) -> list[list[tuple[dict[str, QParams], dict]]]:
    """exllamav2's ``optimize`` on ``1 - accuracy`` for every (measurement, budgets) pair, all
    calls of a stage in one vectorized batch; per measurement, per budget: the choice and
    ``{"norm", "max_error"}``. ``kw`` (``samples``, ``iterations``) shortens the schedule, for checks only."""
    from .baseline_exllamav2 import Problem, optimize_many

    problems = [Problem(costs(m), [[r["error"] for r in s["rows"]] for s in m["slots"]], b)
                for m, budgets in measurements for b in budgets]
    results = iter(optimize_many(problems, seed, **kw))
    out = []
    for m, budgets in measurements:
        row = []
        for _ in budgets:
            o = next(results)
            row.append((_choice(m, o.choice), {"norm": o.norm, "max_error": o.max_error}))
        out.append(row)
    return out
