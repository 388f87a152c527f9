"""Small Hugging Face checkpoints written to disk for the converter's tests: a llama family
model from a config (random weights, a character tokenizer), in the dtype asked for."""

from __future__ import annotations

from pathlib import Path

import torch

#: A small option set keeps the tests fast; the default set is exercised by the MiniLM test.
def small_options():
    from exl2.qparams import QParams

    return (QParams(32, [3, 2], [0.25, 0.75]), QParams(32, [4], [1.0]), QParams(32, [6], [1.0]), QParams(32, [8], [1.0]))


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i + 32): i for i in range(95)} | {"<unk>": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def write_model(folder: Path, family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
                **config) -> Path:
    """A ``family`` (llama, qwen2, mistral) checkpoint with ``config`` over small defaults."""
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(config)
    torch.manual_seed(seed)
    model = getattr(transformers, cls[1])(getattr(transformers, cls[0])(**base))
    with torch.no_grad():  # non-zero biases, so that a wrong bias would show in the outputs
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder
