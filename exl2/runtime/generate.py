"""``exl2 generate``: text from an EXL2 causal LM, streamed as it is produced, through
transformers' ``generate`` (greedy, or sampled with a temperature and top-p)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def _streamer(tokenizer, emit: Callable[[str], None]):
    """A transformers streamer that decodes the new tokens so far and emits what was not yet shown
    (decoding the whole tail keeps multi-token characters whole)."""
    from transformers.generation.streamers import BaseStreamer

    class Stream(BaseStreamer):
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.shown = 0
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first passes the prompt
                self.prompt_seen = True
                return
            self.ids += value.reshape(-1).tolist()
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a split character
                emit(text[self.shown:])
                self.shown = len(text)

        def end(self) -> None:
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            emit(text[self.shown:])

    return Stream()


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, emit: Callable[[str], None] | None = None,
             min_new_tokens: int = 0) -> Generated:
    """Continue ``prompt``; greedy when ``temperature`` is 0. ``emit`` receives the text as it grows."""
    batch = tokenizer(prompt, return_tensors="pt").to(model.device)
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kw |= dict(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw |= dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if emit is not None:
        kw["streamer"] = _streamer(tokenizer, emit)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, **kw)
    seconds = time.perf_counter() - start
    n_prompt = batch["input_ids"].shape[1]
    new = out[0, n_prompt:]
    return Generated(tokenizer.decode(new, skip_special_tokens=True), n_prompt, len(new), seconds)
