"""Prefill latency and decode throughput of a causal LM, with warm-up, repeats, median and spread.

Prompts are random token ids (the speed of a forward does not depend on which tokens), the
same for every model compared. Decode is greedy generation through transformers' ``generate``
with its KV cache, forced to produce exactly ``new_tokens`` tokens per sequence; tokens/s counts
every generated token of every sequence in the batch. On a GPU the clock reads after a device
synchronize.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Timing:
    """Seconds of each repeat (after warm-up); ``median`` and ``spread`` (max - min)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        return max(self.samples) - min(self.samples)


@dataclass(frozen=True)
class SpeedReport:
    """``prefill``: one forward over ``prompt_len`` tokens at batch 1. ``decode``: per batch size,
    the time to generate ``new_tokens`` tokens per sequence after the prompt's prefill."""

    prompt_len: int
    new_tokens: int
    prefill: Timing
    decode: dict[int, Timing]

    def decode_tokens_per_s(self, batch: int) -> float:
        return batch * self.new_tokens / self.decode[batch].median

    def as_dict(self) -> dict:
        return {
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "prefill_s": self.prefill.median,
            "prefill_spread_s": self.prefill.spread,
            "decode_tokens_per_s": {str(b): self.decode_tokens_per_s(b) for b in self.decode},
            "decode_spread_s": {str(b): t.spread for b, t in self.decode.items()},
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> Timing:
    """Wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))


@torch.inference_mode()
def measure_speed(model: nn.Module, *, prompt_len: int = 128, new_tokens: int = 32,
                  batch_sizes: Sequence[int] = (1, 8), repeats: int = 3, warmup: int = 1,
                  seed: int = 0) -> SpeedReport:
    """Prefill and decode timings of ``model`` (a transformers causal LM) on its device."""
    if prompt_len < 1 or new_tokens < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("prompt_len, new_tokens and every batch size must be >= 1")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = {b: torch.randint(0, vocab, (b, prompt_len), generator=gen).to(device) for b in (1, *batch_sizes)}
    prefill = time_call(lambda: model(input_ids=prompts[1], use_cache=False), device, repeats, warmup)

    def generate(b: int, tokens: int):
        ids = prompts[b]
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    decode = {}
    for b in batch_sizes:
        for _ in range(warmup):  # a prefill and a decode step at this batch size warm the same code paths
            generate(b, min(2, new_tokens))
        full = time_call(lambda b=b: generate(b, new_tokens), device, repeats, warmup=0)
        pre = time_call(lambda b=b: model(input_ids=prompts[b], use_cache=True), device, repeats, warmup=0)
        # generation time minus its prompt prefill: the decode steps alone
        decode[b] = Timing(tuple(max(f - pre.median, 1e-9) for f in full.samples))
    return SpeedReport(prompt_len, new_tokens, prefill, decode)
