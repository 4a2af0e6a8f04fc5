"""Whole models on a GPU: what ``kernel="auto"`` picks there gives the CPU reference's logits.

A tiny Llama is quantized on the CPU with each method, then run on the CPU (reference kernels,
fp32) and on the GPU in fp16 (Triton kernels; for LLM.int8 above
``int8_outlier.TRITON_MAX_ROWS`` rows, ``torch._int_mm``). The logits agree to fp16 rounding of activations through the model. Skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calib_ids, tiny_llama_model

import lowbit
from lowbit.config import AqlmConfig, BitsAndBytesConfig, GPTQConfig, RtnConfig
from lowbit.formats import int8_outlier
from lowbit.formats.base import QuantLinear
from lowbit.kernels import select_kernel

pytestmark = pytest.mark.gpu

CONFIGS = {
    "rtn4-g32": RtnConfig(bits=4, group_size=32),
    "gptq4-act": GPTQConfig(bits=4, group_size=32, desc_act=True),
    "gptq3": GPTQConfig(bits=3, group_size=32),
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "aqlm-2x6": AqlmConfig(num_codebooks=2, nbits_per_codebook=6, nsamples=4, max_iterations=2,
                           kmeans_iterations=2, codebook_steps=4),
}
WANT_KERNEL = {"rtn4-g32": "triton", "gptq4-act": "triton", "gptq3": "triton", "nf4-dq": "triton",
               "int8": "triton", "aqlm-2x6": "triton"}


def _fp16_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the float parameters outside the quantized layers to fp16 (the quantized layers keep
    their stored scales), so activations flow in fp16 as in a model loaded with ``dtype=float16``."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.half()
    return model


def _cpu_and_gpu(name: str, ids: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Method ``name`` on the tiny Llama: the CPU reference's logits for ``ids``, the fp16 GPU
    model's, and the kernel ``kernel="auto"`` picks for its first quantized layer at that shape."""
    model = lowbit.quantize(tiny_llama_model(), CONFIGS[name], calib_ids(), progress=False)
    with torch.no_grad():
        monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # not cpu-int4's bf16 products
        want = model(ids).logits
        monkeypatch.delenv("LOWBIT_KERNEL")
        gpu = _fp16_activations(copy.deepcopy(model).cuda())
        got = gpu(ids.cuda()).logits.float().cpu()
    layer = next(m for m in gpu.modules() if isinstance(m, QuantLinear))
    x = torch.randn(*ids.shape, layer.in_features, device="cuda", dtype=torch.float16)
    return want, got, select_kernel(layer, x).name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_model_on_gpu_matches_cpu_reference(name, monkeypatch):
    want, got, kernel = _cpu_and_gpu(name, calib_ids(2, 24, seed=3), monkeypatch)  # 48 rows
    assert kernel == WANT_KERNEL[name]
    rel = ((got - want).norm() / want.norm()).item()
    # fp16 activations through two blocks; LLM.int8 also rounds activations to int8 per row, so a
    # small input difference can move a code by one step (~1% of the row's largest value)
    assert rel < (3e-2 if name == "int8" else 1e-2), rel


@pytest.mark.parametrize("batch,seq,kernel", [(1, 1, "triton"), (int8_outlier.TRITON_MAX_ROWS // 256 + 1, 256, "int_mm")],
                         ids=["one-token", "above-triton-rows"])
def test_int8_kernel_by_rows(batch, seq, kernel, monkeypatch):
    """LLM.int8 on the GPU: one token (decode) takes the Triton kernel (``torch._int_mm`` needs more
    than 16 rows), more than :data:`~lowbit.formats.int8_outlier.TRITON_MAX_ROWS` rows
    ``torch._int_mm``; each gives the CPU reference's logits."""
    want, got, picked = _cpu_and_gpu("int8", calib_ids(batch, seq, seed=4), monkeypatch)
    assert picked == kernel
    assert ((got - want).norm() / want.norm()).item() < 3e-2


def _input_grad(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.float().square().mean().backward()
    return emb.grad.float().cpu()


@pytest.mark.parametrize("name", ["gptq4-act", "nf4-dq", "aqlm-2x6", "int8"])
def test_compiled_graphs_on_gpu_match_eager(name):
    """Moved to the GPU and compiled before any eager call (the layouts are built by the move),
    ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (inductor, CUDA graphs) replays the
    eager model's logits; the gradient through the frozen quantized layers (the ops' backward) is
    the CPU reference's."""
    model = lowbit.quantize(tiny_llama_model(), CONFIGS[name], calib_ids(), progress=False)
    ids = calib_ids(1, 24, seed=3)
    want_grad = _input_grad(model, ids)
    gpu = _fp16_activations(copy.deepcopy(model).cuda())
    ids = ids.cuda()
    torch._dynamo.reset()
    compiled = torch.compile(gpu, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        got = [compiled(ids).logits.float().clone() for _ in range(3)]  # recorded, then replayed
        want = gpu(ids).logits.float()
    assert torch.equal(got[1], got[2])  # recorded and replayed: the same kernels on the same input
    for g in got:
        # inductor rounds the fp16 work between the layers differently from eager; LLM.int8 rounds
        # activations to int8 per row, where that moves a code by a step (as in the test above)
        assert ((g - want).norm() / want.norm()).item() < (3e-2 if name == "int8" else 1e-2)
    grad = _input_grad(gpu, ids)
    assert ((grad - want_grad).norm() / want_grad.norm()).item() < 5e-2
