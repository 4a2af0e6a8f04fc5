"""lowbit convert: exact layout conversions round trip bit for bit; lossy ones need requantize."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from conftest import calib_ids
from lowbit.checkpoint.safetensors_io import load_state_dict
from lowbit.cli import main
from lowbit.convert import convert

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])


def quantized(folder, tmp_path, cfg, name="src"):
    calib = calib_ids() if cfg.quant_method in ("gptq", "awq") else None
    model = lowbit.from_pretrained(folder, quantization_config=cfg, calib=calib, progress=False)
    return lowbit.save_quantized(model, tmp_path / name), model(IDS).logits


def method_of(folder):
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    return q["quant_method"], q


def same_tensors(a, b):
    ta, tb = load_state_dict(a), load_state_dict(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)


@pytest.mark.parametrize("cfg,path", [
    (lowbit.RtnConfig(bits=4, group_size=32, sym=False), ["gptq", "awq", "gptq_v2", "rtn"]),
    (lowbit.GPTQConfig(bits=4, group_size=32, sym=True), ["awq", "rtn", "gptq"]),
    (lowbit.AwqConfig(bits=4, group_size=32), ["gptq_v2", "gptq", "awq"]),
    (lowbit.GPTQConfig(bits=3, group_size=16, desc_act=True), ["gptq_v2", "rtn", "gptq"]),
], ids=["rtn-asym", "gptq-sym", "awq", "gptq3-act"])
def test_exact_conversion_chain_returns_the_same_checkpoint(tiny_model_dir_module, tmp_path, cfg, path):
    src, logits = quantized(tiny_model_dir_module, tmp_path, cfg)
    cur = src
    for i, target in enumerate(path):
        nxt = tmp_path / f"{i}-{target}"
        written = convert(cur, nxt, target)
        assert method_of(nxt)[0] == target.removesuffix("_v2")
        assert written.quant_method == target.removesuffix("_v2")
        # every layout holds the same weights: identical logits at each step
        assert torch.equal(lowbit.from_pretrained(nxt)(IDS).logits, logits)
        cur = nxt
    assert same_tensors(src, cur)  # back in the source layout: bit for bit


def test_sym_and_desc_act_read_off_the_weights(tiny_model_dir_module, tmp_path):
    src, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.RtnConfig(bits=4, group_size=32, sym=True))
    assert convert(src, tmp_path / "g", "gptq").sym is True
    assert convert(src, tmp_path / "a", "awq").zero_point is False
    src2, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.AwqConfig(bits=4, group_size=32), "awq")
    cfg = convert(src2, tmp_path / "g2", "gptq")
    assert cfg.sym is False and cfg.desc_act is False
    src3, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True), "act")
    assert convert(src3, tmp_path / "g3", "gptq_v2").desc_act is True


def test_act_order_to_awq_needs_requantize(tiny_model_dir_module, tmp_path):
    src, logits = quantized(tiny_model_dir_module, tmp_path, lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True))
    with pytest.raises(ValueError, match="no g_idx: requantize to allow it"):
        convert(src, tmp_path / "awq", "awq")
    assert not (tmp_path / "awq").exists()
    cfg = convert(src, tmp_path / "awq", "awq", requantize=True, calib=calib_ids(),
                  requantize_config=lowbit.AwqConfig(bits=4, group_size=32), progress=False)
    assert method_of(tmp_path / "awq")[0] == "awq" and cfg.group_size == 32
    got = lowbit.from_pretrained(tmp_path / "awq")(IDS).logits
    assert not torch.equal(got, logits)  # requantized: close, not the same
    assert torch.nn.functional.cosine_similarity(got.flatten(), logits.flatten(), dim=0) > 0.9


def test_nf4_and_grouped_cross_only_with_requantize(tiny_model_dir_module, tmp_path):
    nf4, logits = quantized(tiny_model_dir_module, tmp_path, lowbit.BitsAndBytesConfig(load_in_4bit=True), "nf4")
    with pytest.raises(ValueError, match="not grouped integers.*--requantize"):
        convert(nf4, tmp_path / "g", "gptq")
    rtn, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.RtnConfig(bits=4, group_size=32), "rtn")
    with pytest.raises(ValueError, match="bitsandbytes changes the weights"):
        convert(rtn, tmp_path / "b", "bnb")
    cfg = convert(nf4, tmp_path / "g", "gptq", requantize=True,
                  requantize_config=lowbit.GPTQConfig(bits=8, group_size=32), calib=calib_ids(), progress=False)
    assert cfg.bits == 8 and method_of(tmp_path / "g")[0] == "gptq"
    got = lowbit.from_pretrained(tmp_path / "g")(IDS).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), logits.flatten(), dim=0) > 0.99


def test_bad_inputs(tiny_model_dir_module, tmp_path):
    rtn, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.RtnConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="unknown conversion target 'exl2'"):
        convert(rtn, tmp_path / "x", "exl2")
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        convert(tiny_model_dir_module, tmp_path / "x", "gptq")
    with pytest.raises(ValueError, match="must differ"):
        convert(rtn, rtn, "gptq")
    with pytest.raises(ValueError, match="cannot write the awq layout"):
        convert(rtn, tmp_path / "x", "awq", requantize=True, requantize_config=lowbit.RtnConfig())
    r3, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.RtnConfig(bits=3, group_size=32), "r3")
    with pytest.raises(ValueError, match="holds 4-bit weights only, not 3-bit"):
        convert(r3, tmp_path / "x", "awq")  # AutoAWQ's GEMM layout holds 4 bits
    assert not (tmp_path / "x").exists()


def test_cli_convert(tiny_model_dir_module, tmp_path, capsys):
    rtn, _ = quantized(tiny_model_dir_module, tmp_path, lowbit.RtnConfig(bits=4, group_size=32))
    assert main(["convert", str(rtn), str(tmp_path / "g"), "--to", "gptq-v2"]) == 0
    assert "converted exactly" in capsys.readouterr().out
    assert method_of(tmp_path / "g")[1]["format"] == "gptq_v2"
    assert main(["convert", str(rtn), str(tmp_path / "b"), "--to", "bnb"]) == 2
    assert "--requantize" in capsys.readouterr().err
    assert main(["convert", str(rtn), str(tmp_path / "b"), "--to", "bnb", "--bits", "4"]) == 2
    assert "only with --requantize" in capsys.readouterr().err
    assert main(["convert", str(rtn), str(tmp_path / "b"), "--to", "bnb", "--requantize", "--double-quant"]) == 0
    q = method_of(tmp_path / "b")[1]
    assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"] is True
