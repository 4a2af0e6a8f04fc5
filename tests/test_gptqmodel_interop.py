"""GPTQModel and lowbit read each other's GPTQ checkpoints: the same dequantized weights and logits.
lowbit's GPTQ and AWQ checkpoints also load through transformers' own ``from_pretrained`` (its
quantizers need GPTQModel, and optimum for GPTQ) with lowbit's logits.

GPTQModel needs a newer torch than CI pins (7.7 wants torch >= 2.14.1), so these tests run in a
side environment (``docs/usage.md``, "Interop with GPTQModel") and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from conftest import calib_ids, rel_err
from lowbit.formats.int_grouped import IntGroupedLinear

gptqmodel = pytest.importorskip("gptqmodel")
if (getattr(gptqmodel, "_DEVICE_THREAD_POOL", True) is None and hasattr(gptqmodel, "_default_cpu_workers")
        and gptqmodel._default_cpu_workers() < 2):
    # GPTQModel 7.7 asks for two model-loader threads but grants a 2-core machine one CPU worker
    # and then refuses its own pool; give it the two it asks for
    gptqmodel._default_cpu_workers = lambda: 2


pytestmark = pytest.mark.usefixtures("reference_kernels")  # conftest: lowbit through the reference


CASES = {
    "4bit-g32": dict(bits=4, group_size=32, desc_act=False, sym=True),
    "4bit-act-order": dict(bits=4, group_size=32, desc_act=True, sym=True),
    "3bit-g32": dict(bits=3, group_size=32, desc_act=False, sym=True),
    "4bit-asym": dict(bits=4, group_size=32, desc_act=False, sym=False),
}


def peer_load(folder, **kw):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16, **kw)  # its CPU kernel: fp16/bf16


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def peer_checkpoint(request, tiny_model_dir_module, tmp_path_factory):
    """A tiny Llama quantized and saved by GPTQModel."""
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(**CASES[request.param])
    model = GPTQModel.load(str(tiny_model_dir_module), cfg, device="cpu", dtype=torch.float32)
    ids = calib_ids(16, 32)
    model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids], batch_size=1)
    out = tmp_path_factory.mktemp("peer") / request.param
    model.save(str(out))
    return out


def test_peer_checkpoint_loads_in_lowbit_with_the_same_weights(peer_checkpoint):
    ours = lowbit.from_pretrained(peer_checkpoint)
    peer = peer_load(peer_checkpoint)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, IntGroupedLinear)}
    assert len(layers) == 14
    for name, mod in layers.items():
        theirs = peer.model.get_submodule(name).dequantize_weight().float()  # [K, N]
        torch.testing.assert_close(mod.dequantize(), theirs.t(), rtol=0, atol=1e-3 * theirs.abs().max().item(),
                                   msg=name)
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, peer.model(input_ids=ids).logits) < 1e-3


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_lowbit_checkpoint_loads_in_peer(case, tiny_model_dir_module, tmp_path):
    spec = CASES[case]
    # GPTQModel reads an asymmetric v1 ("gptq") checkpoint only if it wrote it itself (a v1 zero
    # point of 0 is stored as -1): asymmetric checkpoints for it are written as gptq_v2
    config = lowbit.GPTQConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"],
                               sym=spec["sym"], format="gptq" if spec["sym"] else "gptq_v2")
    model = lowbit.quantize(lowbit.from_pretrained(tiny_model_dir_module), config, calib_ids(8, 32), progress=False)
    lowbit.save_quantized(model, tmp_path / "ours")
    peer = peer_load(tmp_path / "ours")
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert rel_err(peer.model(input_ids=ids).logits, model(ids).logits) < 1e-3


TRANSFORMERS_CASES = {
    "awq-zero-point": lowbit.AwqConfig(bits=4, group_size=32),
    "awq-sym": lowbit.AwqConfig(bits=4, group_size=32, zero_point=False),
    "gptq-sym": lowbit.GPTQConfig(bits=4, group_size=32, sym=True),
    "gptq-act-order": lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True),
    "gptq-3bit": lowbit.GPTQConfig(bits=3, group_size=32),
    "gptq-asym": lowbit.GPTQConfig(bits=4, group_size=32, sym=False),
    "gptq-asym-v2": lowbit.GPTQConfig(bits=4, group_size=32, sym=False, format="gptq_v2"),
}


@pytest.mark.parametrize("case", list(TRANSFORMERS_CASES), ids=list(TRANSFORMERS_CASES))
def test_lowbit_checkpoint_loads_in_transformers(case, tiny_model_dir_module, tmp_path):
    """transformers' ``AutoModelForCausalLM.from_pretrained`` reads the checkpoint with its own AWQ or
    GPTQ quantizer (GPTQModel's CPU kernels underneath, fp16) and gives lowbit's logits (fp32)
    within fp16 rounding."""
    from transformers import AutoModelForCausalLM

    config = TRANSFORMERS_CASES[case]
    if isinstance(config, lowbit.GPTQConfig):
        pytest.importorskip("optimum", reason="transformers loads GPTQ checkpoints only with optimum installed")
    model = lowbit.quantize(lowbit.from_pretrained(tiny_model_dir_module), config, calib_ids(8, 32), progress=False)
    lowbit.save_quantized(model, tmp_path / "ours")
    peer = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float16, device_map="cpu")
    assert "lowbit" not in type(peer.model.layers[0].self_attn.q_proj).__module__  # transformers' own path
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert rel_err(peer(input_ids=ids).logits.float(), model(ids).logits) < 2e-3
