"""lowbit through transformers' own from_pretrained / save_pretrained (tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from conftest import calib_ids
from lowbit.checkpoint.safetensors_io import load_state_dict
from lowbit.formats import Blockwise4Linear, IntGroupedLinear
from lowbit.integrations.transformers import LowbitHfConfig, LowbitHfQuantizer

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])


def hf_quantize(folder, cfg, calib=None):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=lowbit.hf_config(cfg, calib),
                                                dtype=torch.float32)


@pytest.mark.parametrize("cfg,calib", [
    (lowbit.RtnConfig(bits=4, group_size=32), None),
    (lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True), "ids"),
    (lowbit.AwqConfig(bits=4, group_size=32), "ids"),
    (lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True), None),
], ids=["rtn", "gptq-act", "awq", "nf4-dq"])
def test_transformers_quantizes_and_saves_lowbits_checkpoint(tiny_model_dir, tmp_path, cfg, calib):
    calib = calib_ids() if calib == "ids" else None
    model = hf_quantize(tiny_model_dir, cfg, calib)
    assert isinstance(model.model.layers[0].mlp.up_proj, (IntGroupedLinear, Blockwise4Linear))
    assert lowbit.quantized_config(model) == cfg

    # the same quantization through lowbit's own entry point gives the same logits
    ours = lowbit.from_pretrained(tiny_model_dir, quantization_config=cfg, calib=calib, progress=False)
    logits = model(IDS).logits
    assert torch.equal(logits, ours(IDS).logits)

    # save_pretrained writes what lowbit.save_quantized writes
    model.save_pretrained(tmp_path / "hf")
    lowbit.save_quantized(ours, tmp_path / "lb")
    hf, lb = load_state_dict(tmp_path / "hf"), load_state_dict(tmp_path / "lb")
    assert hf.keys() == lb.keys()
    assert all(torch.equal(hf[k], lb[k]) and hf[k].dtype == lb[k].dtype for k in hf)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert hf_cfg == cfg.to_dict() == json.loads((tmp_path / "lb" / "config.json").read_text())["quantization_config"]

    # and lowbit loads it back with identical logits
    assert torch.equal(lowbit.from_pretrained(tmp_path / "hf")(IDS).logits, logits)


def test_rtn_checkpoint_round_trips_through_transformers(tiny_model_dir, tmp_path):
    model = hf_quantize(tiny_model_dir, lowbit.RtnConfig(bits=3, group_size=16, sym=False))
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # "rtn" is registered: lowbit modules
    assert isinstance(again.model.layers[1].self_attn.o_proj, IntGroupedLinear)
    assert again.model.layers[1].self_attn.o_proj.scales.dtype == torch.float16
    assert torch.equal(again(IDS).logits, logits)
    again.save_pretrained(tmp_path / "b")
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_after_transformers_quantization(tiny_model_dir):
    model = hf_quantize(tiny_model_dir, lowbit.RtnConfig(bits=4, group_size=32))
    out = model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 5)


def test_calibration_defaults_to_the_folders_tokenizer(tiny_model_dir):
    cfg = lowbit.GPTQConfig(bits=4, group_size=32, nsamples=2, model_seqlen=32)
    model = hf_quantize(tiny_model_dir, cfg)
    assert isinstance(model.model.layers[0].self_attn.q_proj, IntGroupedLinear)


def test_calibration_without_text_or_tokenizer_is_a_clear_error(tmp_path):
    from conftest import tiny_llama_model

    tiny_llama_model().save_pretrained(tmp_path / "m")  # no tokenizer beside it
    with pytest.raises(ValueError, match="needs calibration text"):
        hf_quantize(tmp_path / "m", lowbit.GPTQConfig(bits=4, group_size=32))


def test_config_wrapper():
    cfg = lowbit.hf_config(lowbit.GPTQConfig(bits=3, group_size=64))
    assert cfg.quant_method == "lowbit_gptq"
    assert cfg.to_dict()["quant_method"] == "gptq"  # config.json keeps the ecosystem name
    back = LowbitHfConfig.from_dict({**cfg.to_dict(), "quant_method": "lowbit_gptq"})
    assert back.config == cfg.config
    with pytest.raises(TypeError, match="wraps a lowbit QuantConfig"):
        LowbitHfConfig(object())


def test_registration_is_idempotent_and_names_lowbit_methods():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    lowbit.register_with_transformers()
    lowbit.register_with_transformers()
    for method in ("gptq", "awq", "bitsandbytes", "aqlm", "rtn"):
        assert AUTO_QUANTIZER_MAPPING[f"lowbit_{method}"] is LowbitHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["rtn"] is LowbitHfConfig
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["gptq"] is not LowbitHfConfig  # transformers' own stays


def test_transformers_quantizes_with_aqlm(tiny_model_dir, tmp_path):
    from lowbit.formats.codebook import AqlmLinear

    cfg = lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=6, nsamples=4, max_iterations=2,
                            kmeans_iterations=2, codebook_steps=4)
    model = hf_quantize(tiny_model_dir, cfg, calib_ids())
    assert isinstance(model.model.layers[0].mlp.up_proj, AqlmLinear)
    recorded = lowbit.quantized_config(model)
    assert recorded.replace(linear_weights_not_to_quantize=None) == cfg
    assert recorded.linear_weights_not_to_quantize == ("lm_head.weight", "lm_head")
    ours = lowbit.from_pretrained(tiny_model_dir, quantization_config=cfg, calib=calib_ids(), progress=False)
    assert torch.equal(model(IDS).logits, ours(IDS).logits)
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(lowbit.from_pretrained(tmp_path / "hf")(IDS).logits, ours(IDS).logits)


def test_multi_device_map_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="one device"):
        AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=lowbit.hf_config(lowbit.RtnConfig()),
            device_map={"model.embed_tokens": "cpu", "model.layers": "meta", "model.norm": "cpu", "lm_head": "cpu"})


def test_pre_quantized_non_canonical_layout_is_refused():
    """Only lowbit's own rtn layout loads through its transformers quantizer; GPTQ folders go elsewhere."""
    q = LowbitHfQuantizer(lowbit.hf_config(lowbit.GPTQConfig(bits=4)), pre_quantized=True)
    with pytest.raises(ValueError, match="'gptq' checkpoint loads through transformers' own quantizer"):
        q.validate_environment(device_map=None)
