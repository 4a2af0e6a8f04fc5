"""lowbit's GPTQ and AWQ checkpoints against the contract of serving loaders that read them by
layout (vLLM-style; see docs/usage.md): config keys, tensor names, dtypes and shapes, the shards
such loaders fuse, and the dequantization math they apply, re-implemented here independently of
lowbit's own unpacking.
"""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from conftest import calib_ids
from lowbit.checkpoint.safetensors_io import load_state_dict

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # loaded into one linear each


@pytest.fixture(scope="module", params=[
    lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True),
    lowbit.GPTQConfig(bits=8, group_size=64, sym=False),
    lowbit.GPTQConfig(bits=3, group_size=32),
    lowbit.AwqConfig(bits=4, group_size=32),
], ids=["gptq4-act", "gptq8-asym", "gptq3", "awq4"])
def checkpoint(request, tiny_model_dir_module, tmp_path_factory):
    cfg = request.param
    model = lowbit.from_pretrained(tiny_model_dir_module, quantization_config=cfg, calib=calib_ids(), progress=False)
    folder = lowbit.save_quantized(model, tmp_path_factory.mktemp("ckpt") / cfg.quant_method)
    return cfg, folder, model


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 words [R, C] -> values [rows, C], packed along dim 0 as one little-endian bit stream."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bitstream = ((words.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, packed.shape[1])
    weights = 2 ** torch.arange(bits).view(1, bits, 1)
    return (bitstream[: rows * bits].reshape(rows, bits, -1) * weights).sum(1)


def quantized_linears(model):
    from lowbit.formats import IntGroupedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, IntGroupedLinear)}


def test_config_keys(checkpoint):
    cfg, folder, _ = checkpoint
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    if cfg.quant_method == "gptq":
        assert {"bits", "group_size", "desc_act", "sym"} <= q.keys()
        assert (q["bits"], q["group_size"], q["desc_act"], q["sym"]) == (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym)
        assert q.get("lm_head", False) is False  # the head stays unquantized
        side = json.loads((folder / "quantize_config.json").read_text())  # read by the older loaders
        assert (side["bits"], side["group_size"], side["desc_act"]) == (cfg.bits, cfg.group_size, cfg.desc_act)
    else:
        assert (q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))) == (4, cfg.group_size)
        assert q["zero_point"] is True and q["version"] == "gemm"


def test_tensor_names_dtypes_and_shapes(checkpoint):
    cfg, folder, model = checkpoint
    tensors = load_state_dict(folder)
    bits, g = cfg.bits, cfg.group_size
    for name, m in quantized_linears(model).items():
        k, n = m.in_features, m.out_features
        assert k % g == 0 and n * bits % 32 == 0  # what the loaders require of the model's shapes
        keys = {key[len(name) + 1:] for key in tensors if key.startswith(name + ".")}
        if cfg.quant_method == "gptq":
            assert keys == {"qweight", "qzeros", "scales", "g_idx"}
            want = {"qweight": ((k * bits // 32, n), torch.int32), "qzeros": ((k // g, n * bits // 32), torch.int32),
                    "scales": ((k // g, n), torch.float16), "g_idx": ((k,), torch.int32)}
        else:
            assert keys == {"qweight", "qzeros", "scales"}
            want = {"qweight": ((k, n // 8), torch.int32), "qzeros": ((k // g, n // 8), torch.int32),
                    "scales": ((k // g, n), torch.float16)}
        for key, (shape, dtype) in want.items():
            t = tensors[f"{name}.{key}"]
            assert tuple(t.shape) == shape and t.dtype == dtype, f"{name}.{key}"
    assert "lm_head.qweight" not in tensors and "model.embed_tokens.weight" in tensors


def test_fused_shards_share_g_idx(checkpoint):
    """A loader that fuses q/k/v (and gate/up) into one layer keeps one g_idx for all of them."""
    cfg, folder, _ = checkpoint
    if cfg.quant_method != "gptq":
        pytest.skip("AWQ has no g_idx")
    tensors = load_state_dict(folder)
    for layer in range(2):
        for group in FUSED:
            mod = "self_attn" if "q_proj" in group else "mlp"
            ids = [tensors[f"model.layers.{layer}.{mod}.{p}.g_idx"] for p in group]
            assert all(torch.equal(ids[0], other) for other in ids[1:])


def test_loader_dequantization_math_gives_lowbits_weights(checkpoint):
    """GPTQ v1: ``W = s[g_idx] * (q - (z + 1))``; AWQ: columns interleaved [0,2,4,6,1,3,5,7] per word,
    ``W = s * (q - z)`` per group of input rows."""
    cfg, folder, model = checkpoint
    tensors = load_state_dict(folder)
    for name, m in quantized_linears(model).items():
        k, n, bits = m.in_features, m.out_features, cfg.bits
        qw, qz, s = (tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales"))
        if cfg.quant_method == "gptq":
            q = unpack_rows(qw, bits, k)  # [K, N]
            z = unpack_rows(qz.t().contiguous(), bits, n).t() + 1  # [G, N]: v1 stores zero - 1
            g = tensors[f"{name}.g_idx"].long()
            w = s.float()[g] * (q - z[g]).float()  # [K, N]
        else:
            order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
            inverse = torch.argsort(order)

            def unpack_awq(t):
                v = (t.unsqueeze(-1).to(torch.int64) >> (4 * torch.arange(8))) & 0xF  # [R, N/8, 8] nibbles
                return v[..., inverse].reshape(t.shape[0], -1)  # nibble i holds column order[i]

            q, z = unpack_awq(qw), unpack_awq(qz)  # [K, N], [G, N]
            w = (q - z.repeat_interleave(cfg.group_size, 0)).float() * s.float().repeat_interleave(cfg.group_size, 0)
        assert torch.equal(w.t(), m.dequantize()), name
