"""A frozen quantized layer passes the gradient to the layers before it (adapters trained on top
of a quantized model, QLoRA style): the gradient of a loss with respect to the input embeddings is
that of the same model with each quantized layer replaced by ``nn.Linear`` holding its
``dequantize()``. CPU, reference kernels; the GPU kernels' backward is checked in test_gpu_paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from conftest import calib_ids, tiny_llama_model
from lowbit.formats.base import QuantLinear
from lowbit.methods.base import QUANTIZERS

# relative error of the input gradient; LLM.int8 rounds activations in the forward (the values the
# gradient is taken at differ slightly from the dense model's), the weight-only formats do not
CONFIGS = {
    "rtn3": (lowbit.RtnConfig(bits=3, group_size=32), 1e-5),
    "gptq-act-order": (lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True), 1e-5),
    "nf4-double-quant": (lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True), 1e-5),
    "aqlm": (lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=4, in_group_size=8, max_iterations=1), 1e-5),
    "int8": (lowbit.BitsAndBytesConfig(load_in_8bit=True), 5e-2),
    "int8-outliers": (lowbit.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.05), 5e-2),
}


def dense_copy(model: nn.Module) -> nn.Module:
    """``model`` with every quantized linear replaced by an ``nn.Linear`` of its dequantized weight."""
    dense = tiny_llama_model()
    want = dense.state_dict()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in want and v.shape == want[k].shape},
                          strict=False)  # the norms and embeddings
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            lin = dense.get_submodule(name)
            lin.weight.data = mod.dequantize()
            if mod.bias is not None:
                lin.bias.data = mod.bias.float()
    return dense


def input_grad(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.square().mean().backward()
    return emb.grad


@pytest.mark.parametrize("name", list(CONFIGS))
def test_input_gradient_matches_dequantized_model(name):
    config, tol = CONFIGS[name]
    model = lowbit.quantize(tiny_llama_model(), config, calib_ids(4, 32), progress=False)
    ids = calib_ids(1, 8, seed=4)
    got, want = input_grad(model, ids), input_grad(dense_copy(model), ids)
    assert want.abs().sum() > 0
    assert QUANTIZERS.get(config.quant_method).is_trainable
    assert ((got - want).norm() / want.norm()).item() <= tol
