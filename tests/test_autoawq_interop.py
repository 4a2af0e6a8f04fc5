"""AutoAWQ and lowbit read each other's AWQ GEMM checkpoints: the same dequantized weights and logits.

AutoAWQ (deprecated, and not in CI) runs in a side environment (``docs/usage.md``, "Interop with
AutoAWQ"); these tests are skipped where it is not installed.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from conftest import byte_tokenizer, calib_ids, rel_err, tiny_llama_model
from lowbit.formats.int_grouped import IntGroupedLinear

awq = pytest.importorskip("awq")


pytestmark = pytest.mark.usefixtures("reference_kernels")  # conftest: lowbit through the reference


def awq_sized_llama(folder):
    """A tiny random Llama that AutoAWQ's clip search accepts: its k/v projections have 64 outputs
    (AutoAWQ clips in batches of 64 output rows, and the default tiny model's k/v have 32)."""
    tiny_llama_model(hidden=128, intermediate=256).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def peer_load(folder):
    """AutoAWQ's own loader, on its plain-PyTorch GEMM path (fp16: the only dtype that path takes)."""
    import awq.models.base as awq_base
    from awq import AutoAWQForCausalLM

    # on a CPU AutoAWQ insists on Intel's extension; any other device name keeps its plain path
    best_device, awq_base.get_best_device = awq_base.get_best_device, lambda: "cpu:0"
    try:
        return AutoAWQForCausalLM.from_quantized(str(folder), device_map={"": "cpu"}, torch_dtype=torch.float16,
                                                 fuse_layers=False)
    finally:
        awq_base.get_best_device = best_device


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return awq_sized_llama(tmp_path_factory.mktemp("awq") / "plain")


@pytest.fixture(scope="module")
def peer_checkpoint(plain_dir, tmp_path_factory):
    """The tiny Llama quantized and saved by AutoAWQ (4-bit, g32, zero point: its GEMM format)."""
    from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(plain_dir), torch_dtype=torch.float32, device_map="cpu")
    model.quantize(None, quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
                   calib_data=[row.tolist() for row in calib_ids(16, 32)], max_calib_seq_len=32)
    out = tmp_path_factory.mktemp("awq") / "peer"
    model.save_quantized(str(out))
    return out


def test_peer_checkpoint_loads_in_lowbit_with_the_same_weights(peer_checkpoint):
    from awq.utils.packing_utils import dequantize_gemm

    ours = lowbit.from_pretrained(peer_checkpoint)
    peer = peer_load(peer_checkpoint)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, IntGroupedLinear)}
    assert len(layers) == 14
    for name, mod in layers.items():
        pm = peer.model.get_submodule(name)
        # AutoAWQ computes (q - z) * s in fp16: rounded once, as ours is when cast to fp16
        theirs = dequantize_gemm(pm.qweight, pm.qzeros, pm.scales, pm.w_bit, pm.group_size)  # [K, N] fp16
        assert torch.equal(mod.dequantize().half(), theirs.t()), name
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        # fp32 activations here, fp16 in the peer: the difference is the peer's activation rounding
        assert rel_err(ours(ids).logits, peer.model(input_ids=ids).logits) < 3e-3


@pytest.mark.parametrize("zero_point", [True, False], ids=["zero-point", "sym"])
def test_lowbit_checkpoint_loads_in_peer(zero_point, plain_dir, tmp_path):
    config = lowbit.AwqConfig(bits=4, group_size=32, zero_point=zero_point, nsamples=8)
    model = lowbit.quantize(lowbit.from_pretrained(plain_dir), config, calib_ids(8, 32), progress=False)
    lowbit.save_quantized(model, tmp_path / "ours")
    peer = peer_load(tmp_path / "ours")
    from awq.utils.packing_utils import dequantize_gemm

    for name, mod in model.named_modules():
        if isinstance(mod, IntGroupedLinear):
            pm = peer.model.get_submodule(name)
            theirs = dequantize_gemm(pm.qweight, pm.qzeros, pm.scales, pm.w_bit, pm.group_size)
            assert torch.equal(mod.dequantize().half(), theirs.t()), name
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert rel_err(peer.model(input_ids=ids).logits, model(ids).logits) < 3e-3
