"""Strided perplexity of a causal LM over a fixed token budget (deterministic).

The text is tokenized once and cut to ``max_tokens`` tokens. Windows of ``seqlen`` tokens start
every ``stride`` tokens. With ``stride = seqlen`` (the default) the windows are disjoint and each
scores its tokens after the first, as the GPTQ paper evaluates; with a smaller stride each window
scores only the tokens no earlier window scored, with ``seqlen - stride`` tokens of extra context
(the sliding-window recipe of transformers' perplexity guide). The result is
``exp(total negative log-likelihood / tokens scored)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def windows(n_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window over ``n_tokens`` tokens.

    Windows start every ``stride`` tokens; tokens ``[begin, end)`` are fed and targets
    ``first_scored .. end-1`` are scored (a target at position t is predicted from the tokens
    of its window before t). No target is scored twice; a window's first token has no context
    in it and is only scored by an earlier, overlapping window.
    """
    if seqlen < 2:
        raise ValueError(f"perplexity window seqlen={seqlen} must be >= 2")
    if not 1 <= stride <= seqlen:
        raise ValueError(f"stride={stride} must be between 1 and seqlen={seqlen}")
    out = []
    scored_to = 0  # targets before this position are scored
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seqlen, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
        scored_to = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def token_perplexity(model: nn.Module, ids: torch.Tensor, *, seqlen: int, stride: int | None = None,
                     progress: bool = False) -> float:
    """Perplexity of ``model`` on int64 token ids ``[T]`` (see the module docstring)."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"perplexity needs a 1-D tensor of at least 2 tokens, got shape {tuple(ids.shape)}")
    device = next(model.parameters()).device
    spans = windows(ids.numel(), seqlen, stride or seqlen)
    nll = 0.0
    count = 0
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress):
        chunk = ids[begin:end].to(device)[None]  # [1, L]
        logits = model(chunk, use_cache=False).logits[0].float()  # [L, V]
        targets = chunk[0, first - begin :]  # tokens first .. end-1
        preds = logits[first - begin - 1 : end - begin - 1]  # logits at positions first-1 .. end-2
        nll += F.cross_entropy(preds, targets, reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count)


def text_perplexity(model: nn.Module, tokenizer, text: str, *, seqlen: int, max_tokens: int | None = None,
                    stride: int | None = None, progress: bool = False) -> float:
    """Perplexity on ``text`` tokenized by ``tokenizer``, cut to its first ``max_tokens`` tokens."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens} must be >= 2")
        ids = ids[:max_tokens]
    return token_perplexity(model, ids, seqlen=seqlen, stride=stride, progress=progress)
