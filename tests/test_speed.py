"""Prefill/decode timing: what is measured, and bad settings."""

from __future__ import annotations

import pytest

from conftest import tiny_llama_model
from lowbit.eval.speed import Timing, measure_speed, time_call


def test_timing_median_and_spread():
    t = Timing((0.3, 0.1, 0.2))
    assert t.median == 0.2 and t.spread == pytest.approx(0.2)


def test_measure_speed_on_a_tiny_model():
    rep = measure_speed(tiny_llama_model(), prompt_len=16, new_tokens=4, batch_sizes=(1, 3), repeats=2)
    assert len(rep.prefill.samples) == 2 and rep.prefill.median > 0
    assert set(rep.decode) == {1, 3}
    d = rep.as_dict()
    assert d["decode_tokens_per_s"]["3"] == pytest.approx(3 * 4 / rep.decode[3].median)
    assert d["prompt_len"] == 16 and d["new_tokens"] == 4


def test_generate_produces_exactly_new_tokens():
    """The decode timing's premise: generate returns prompt + new_tokens for every sequence."""
    import torch

    model = tiny_llama_model()
    ids = torch.randint(0, 256, (2, 8))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)


@pytest.mark.parametrize("kw", [dict(prompt_len=0), dict(new_tokens=0), dict(batch_sizes=()), dict(batch_sizes=(0,))])
def test_bad_settings(kw):
    with pytest.raises(ValueError, match="must be >= 1"):
        measure_speed(tiny_llama_model(), **kw)
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_call(lambda: None, __import__("torch").device("cpu"), 0, 0)
