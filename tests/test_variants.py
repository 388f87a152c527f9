"""The ablation's encoder variants (exl2.model.variants, exl2.model.slots)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from exl2.model import slots
from exl2.model.options import EXLLAMAV2_OPTIONS, OPTIONS
from exl2.model.variants import LinearStats, Recipe, batches, decoded, encode
from exl2.qparams import QParams


def _linear_with_offset_inputs(seed=0, k=128, n=64, samples=2048, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, k, generator=g) @ torch.randn(k, k, generator=g) * 0.2
    x += offset * torch.rand(k, generator=g)  # inputs far from zero mean, as after GELU or LayerNorm's bias
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin, x, LinearStats(x.T @ x / samples, x.mean(0))


def _output_error(lin, qm, x):
    y = x @ lin.weight.detach().T + lin.bias.detach()
    y_hat = x @ decoded(qm) + qm.bias.to(torch.float32)
    return float((y_hat - y).square().sum())


@pytest.mark.parametrize("qp", [QParams(32, [3], [1.0]), QParams(128, [4], [1.0])])
def test_centered_gptq_with_bias_correction_lowers_the_output_error(qp):
    lin, x, stats = _linear_with_offset_inputs()
    plain = encode(lin, qp, stats, Recipe())
    centered = encode(lin, qp, stats, Recipe(centered=True))
    # the corrected bias is the best one for these weights: putting the original bias back is worse
    uncorrected = replace(centered, bias=lin.bias.detach().to(torch.float16))
    assert _output_error(lin, centered, x) < _output_error(lin, uncorrected, x)
    # and the whole technique beats GPTQ on the raw second moment here
    assert _output_error(lin, centered, x) < 0.95 * _output_error(lin, plain, x)


def test_centered_changes_nothing_without_a_bias():
    lin, x, stats = _linear_with_offset_inputs()
    lin.bias = None
    qp = QParams(128, [4], [1.0])
    a, b = encode(lin, qp, stats, Recipe()), encode(lin, qp, stats, Recipe(centered=True))
    assert torch.equal(a.q_weight, b.q_weight) and b.bias is None


def test_document_layout_feeds_rows_as_the_model_sees_them():
    from transformers import AutoTokenizer

    from exl2.model import arch

    tok = AutoTokenizer.from_pretrained(str(arch.resolve("example:minilm")))
    text = "First paragraph, short.\n\nSecond one is a little longer than the first.\n" + "word " * 300 + "\n"
    rows = batches(tok, text, 10, 64, "documents")
    ids = [r["input_ids"][0].tolist() for r in rows]
    assert all(r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id for r in ids)
    # the long paragraph is split, not cut: 300 words in rows of 62 and one of the rest
    words = [r for r in ids if r[1] == tok.convert_tokens_to_ids("word")]
    assert [len(r) for r in words[:5]] == [64, 64, 64, 64, 300 - 4 * 62 + 2]
    assert ids[7] == ids[0]  # rows repeat from the first when they outnumber the pieces
    assert all(torch.equal(r["attention_mask"], torch.ones_like(r["input_ids"])) for r in rows)
    stream = batches(tok, text, 2, 16, "stream")
    assert all(tok.cls_token_id not in r["input_ids"][0].tolist() for r in stream)
    with pytest.raises(ValueError):
        batches(tok, text, 2, 16, "sideways")


def test_exllamav2_tables():
    assert len(slots.QPARAMS_ATTN) == 19 and len(slots.QPARAMS_MLP) == 17
    assert all(len(r) == 4 for r in slots.QPARAMS_ATTN) and all(len(r) == 3 for r in slots.QPARAMS_MLP)
    # options.py takes its options from the same tables: two transcriptions that must agree
    entries = {q.desc() for row in slots.QPARAMS_ATTN + slots.QPARAMS_MLP for q in row}
    assert {o.desc() for o in EXLLAMAV2_OPTIONS} <= entries
    assert {o.desc() for o in EXLLAMAV2_OPTIONS} < {o.desc() for o in OPTIONS}  # measured: more (options.py)
    # both tables end with 8 bits everywhere and start at the cheapest row for a square layer
    assert {q.desc() for q in slots.QPARAMS_ATTN[-1] + slots.QPARAMS_MLP[-1]} == {QParams(128, [8], [1.0]).desc()}
    for table in (slots.QPARAMS_ATTN, slots.QPARAMS_MLP):
        cost = [sum(q.total_bits(512, 512) for q in row) for row in table]
        assert cost[0] == min(cost) and cost[-1] == max(cost)


def test_slots_of_a_block():
    llama = [f"l.{n}" for n in ("q", "k", "v", "o", "gate", "up", "down")]
    (a, ak, at), (m, mk, mt) = slots.slots_of_block(llama)
    assert (a, ak, m, mk) == ("attn", llama[:4], "mlp", llama[4:]) and mt is slots.QPARAMS_MLP
    bert = [f"b.{n}" for n in ("query", "key", "value", "attn_out", "intermediate", "output")]
    (_, _, _), (_, mk, mt) = slots.slots_of_block(bert)
    assert mk == bert[4:] and [r[0].desc() for r in mt] == [r[1].desc() for r in slots.QPARAMS_MLP]
    with pytest.raises(ValueError):
        slots.slots_of_block(llama[:5])
