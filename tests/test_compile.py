"""torch.compile(fullgraph=True) traces quantized models without graph breaks (CPU, reference
kernels, the aot_eager backend: no C++ compiler needed) and computes the eager model's logits:
exactly, or for LLM.int8 (whose outlier columns become a mask over a full product) to rounding."""

from __future__ import annotations

import pytest
import torch

import lowbit
from conftest import calib_ids, tiny_llama_model
from lowbit.formats.base import QuantLinear

CONFIGS = {
    "rtn": lowbit.RtnConfig(bits=4, group_size=32),
    "gptq-act-order": lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True),
    "nf4-double-quant": lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True),
    "aqlm": lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=4, in_group_size=8, max_iterations=1),
    "int8": lowbit.BitsAndBytesConfig(load_in_8bit=True),
    "int8-outliers": lowbit.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.05),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_fullgraph_compile_matches_eager(config, monkeypatch):
    if isinstance(config, lowbit.BitsAndBytesConfig) and config.load_in_8bit:
        monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # what a compiled LLM.int8 layer runs (cpu-int8 is eager only)
    model = lowbit.quantize(tiny_llama_model(), config, calib_ids(4, 32), progress=False)
    ids = calib_ids(1, 8, seed=5)
    largest = []
    first = next(m for m in model.modules() if isinstance(m, QuantLinear))
    hook = first.register_forward_pre_hook(lambda _m, args: largest.append(float(args[0].abs().max())))
    with torch.no_grad():
        want = model(ids).logits
        hook.remove()
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    if getattr(config, "llm_int8_threshold", 6.0) < 1:
        assert largest[0] >= config.llm_int8_threshold  # the outlier columns take part
    if isinstance(config, lowbit.BitsAndBytesConfig) and config.load_in_8bit:
        # compiled, LLM.int8's outlier columns are a mask over a full product: the sums round differently
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
