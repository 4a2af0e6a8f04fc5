"""The GPTQ checkpoint layout: v1/v2 zero points, exact round trips, format detection, errors."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit import GPTQConfig
from lowbit.checkpoint.layouts.gptq import (
    QUANTIZE_CONFIG_FILE,
    written_by_gptqmodel,
    zeros_from_checkpoint,
    zeros_to_checkpoint,
)
from lowbit.checkpoint.safetensors_io import SINGLE_FILE
from lowbit.formats.packing import pack_int, unpack_int

from conftest import tiny_llama_model

BITS = [2, 3, 4, 8]


def _zeros(bits, g=5, n=40, low=0, seed=0):
    z = torch.randint(low, 2**bits, (g, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    return pack_int(z, bits, dim=1), z


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_v1_stores_zero_minus_one_and_round_trips(bits):
    packed, z = _zeros(bits, low=1)
    stored = zeros_to_checkpoint(packed, bits, 40, "gptq")
    assert torch.equal(unpack_int(stored, bits, 40, dim=1), z - 1)
    assert torch.equal(zeros_from_checkpoint(stored, bits, 40, "gptq", sym=False), packed)  # exact


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_v2_stores_true_zeros(bits):
    packed, _ = _zeros(bits)
    assert torch.equal(zeros_to_checkpoint(packed, bits, 40, "gptq_v2"), packed)
    assert torch.equal(zeros_from_checkpoint(packed, bits, 40, "gptq_v2", sym=False), packed)


def test_v1_4bit_sym_word_is_0x77777777():
    """The constant FORMATS.md quotes: v1 symmetric 4-bit zeros are 7 in every nibble."""
    packed = pack_int(torch.full((1, 8), 8, dtype=torch.int32), 4, dim=1)
    assert zeros_to_checkpoint(packed, 4, 8, "gptq").item() == 0x77777777
    assert (packed.item() & 0xFFFFFFFF) - 0x77777777 == 0x11111111  # v1 -> v2 adds 0x11111111 per word


def test_v1_cannot_store_a_zero_point_of_zero():
    packed, _ = _zeros(4, low=0)
    with pytest.raises(ValueError, match="zero point of 0 cannot be stored in the GPTQ v1 layout"):
        zeros_to_checkpoint(packed, 4, 40, "gptq")


def test_overflowed_v1_zero_is_refused():
    stored = pack_int(torch.full((2, 8), 15, dtype=torch.int32), 4, dim=1)  # "z - 1" written for z = 0
    with pytest.raises(ValueError, match="overflowed v1 zero"):
        zeros_from_checkpoint(stored, 4, 8, "gptq", sym=False)


def _gptqmodel_v1(z: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel's v1 writing of true zeros ``z [G, N]``, from its documented arithmetic: each
    int32 word minus 1-in-every-field (2/4/8 bits), or each field minus 1 modulo 8 (3 bits)."""
    if bits == 3:
        return pack_int((z - 1) & 7, 3, dim=1)
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    words = (pack_int(z, bits, dim=1).to(torch.int64) - ones) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_gptqmodel_wrapped_v1_zeros_are_read_exactly(bits):
    packed, z = _zeros(bits, low=0, seed=bits)
    z[0, :3] = 0  # zero points of 0, which v1 cannot hold
    packed = pack_int(z, bits, dim=1)
    stored = _gptqmodel_v1(z, bits)
    assert torch.equal(zeros_from_checkpoint(stored, bits, 40, "gptq", sym=False, wrapped_v1=True), packed)
    with pytest.raises(ValueError, match="overflowed v1 zero"):  # never misread without the writer's word
        zeros_from_checkpoint(stored, bits, 40, "gptq", sym=False)
    # with no zero of 0 GPTQModel's v1 is the plain one, and both readings agree
    plain, zp = _zeros(bits, low=1, seed=bits)
    assert torch.equal(zeros_from_checkpoint(_gptqmodel_v1(zp, bits), bits, 40, "gptq", sym=False), plain)


def test_gptqmodel_is_recognised_by_its_meta():
    assert written_by_gptqmodel(GPTQConfig(bits=4, meta={"quantizer": ["gptqmodel:7.7.0"]}))
    assert not written_by_gptqmodel(GPTQConfig(bits=4, meta={"quantizer": ["lowbit:0.1.0"]}))
    assert not written_by_gptqmodel(GPTQConfig(bits=4))


@pytest.mark.parametrize("declared,stored_value,actual", [("gptq", 8, "gptq_v2"), ("gptq_v2", 7, "gptq")])
def test_mislabelled_sym_zeros_are_detected_and_read_right(caplog, declared, stored_value, actual):
    stored = pack_int(torch.full((3, 8), stored_value, dtype=torch.int32), 4, dim=1)
    with caplog.at_level(logging.WARNING):
        true = zeros_from_checkpoint(stored, 4, 8, declared, sym=True)
    assert torch.equal(unpack_int(true, 4, 8, dim=1), torch.full((3, 8), 8, dtype=torch.int32))
    assert f"reading them as '{actual}'" in caplog.text


def test_sym_zeros_that_fit_neither_format_raise():
    stored = pack_int(torch.tensor([[7, 8, 3, 7]], dtype=torch.int32), 4, dim=1)
    with pytest.raises(ValueError, match=r"stores zero points 7 \(v1\) or 8 \(gptq_v2\), but this one stores"):
        zeros_from_checkpoint(stored, 4, 4, "gptq", sym=True)


# --- whole checkpoints ------------------------------------------------------------------------

def _ids(n=4, t=24):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[("gptq", True), ("gptq", False), ("gptq_v2", False)],
                ids=["v1-sym", "v1-asym", "v2-asym"])
def gptq_ckpt(request, tmp_path_factory):
    fmt, sym = request.param
    cfg = GPTQConfig(bits=4, group_size=32, sym=sym, format=fmt, desc_act=True)
    model = lowbit.quantize(tiny_llama_model(), cfg, _ids(), progress=False)
    out = tmp_path_factory.mktemp("gptq") / "q"
    lowbit.save_quantized(model, out)
    return model, out, cfg


def test_checkpoint_files_and_keys(gptq_ckpt):
    _, out, cfg = gptq_ckpt
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == qc["format"] == cfg.format
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (4, 32, True, cfg.sym)
    side = json.loads((out / QUANTIZE_CONFIG_FILE).read_text())
    assert side["checkpoint_format"] == cfg.format and side["bits"] == 4 and side["quant_method"] == "gptq"
    assert GPTQConfig.from_dict(side).format == cfg.format  # the side file parses back
    t = load_file(out / SINGLE_FILE)
    prefix = "model.layers.0.mlp.down_proj"
    assert t[f"{prefix}.qweight"].dtype == torch.int32 and t[f"{prefix}.qweight"].shape == (128 * 4 // 32, 64)
    assert t[f"{prefix}.qzeros"].shape == (4, 64 * 4 // 32)
    assert t[f"{prefix}.scales"].dtype == torch.float16 and t[f"{prefix}.scales"].shape == (4, 64)
    assert t[f"{prefix}.g_idx"].dtype == torch.int32 and t[f"{prefix}.g_idx"].shape == (128,)


def test_stored_zeros_follow_the_format(gptq_ckpt):
    model, out, cfg = gptq_ckpt
    t = load_file(out / SINGLE_FILE)
    name = "model.layers.1.self_attn.o_proj"
    true = unpack_int(model.get_submodule(name).qzeros, 4, 64, dim=1)
    stored = unpack_int(t[f"{name}.qzeros"], 4, 64, dim=1)
    assert torch.equal(stored, true - (1 if cfg.format == "gptq" else 0))
    if cfg.sym:
        assert bool((stored == 7).all())


def test_save_load_exact(gptq_ckpt):
    model, out, _ = gptq_ckpt
    loaded = lowbit.from_pretrained(out)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    ids = _ids(2, 11)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_qweight_shape_that_disagrees_with_bits_is_named(gptq_ckpt, tmp_path):
    _, out, _ = gptq_ckpt
    import shutil

    shutil.copytree(out, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8  # the tensors are 4-bit
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"q_proj.qweight has shape \(8, 64\), but 8-bit packing of a 64->64 layer .* needs \(16, 64\)"):
        lowbit.from_pretrained(tmp_path / "c")


def test_asym_v1_quantizer_never_writes_zero_point_zero():
    model = tiny_llama_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.abs_()  # all weights >= 0: plain asym picks zero 0
    lowbit.quantize(model, GPTQConfig(bits=4, group_size=32, sym=False), _ids(), progress=False)
    z = unpack_int(model.model.layers[0].mlp.up_proj.qzeros, 4, 128, dim=1)
    assert int(z.min()) >= 1


def test_tensor_edit_then_save_to_v1_refuses_zero(tmp_path):
    """A canonical module holding zero point 0 cannot be written as v1; the error names the tensor."""
    model = lowbit.quantize(tiny_llama_model(), GPTQConfig(bits=4, group_size=32, format="gptq_v2", sym=False),
                            _ids(), progress=False)
    m = model.model.layers[0].self_attn.q_proj
    z = unpack_int(m.qzeros, 4, 64, dim=1)
    z[0, 0] = 0
    m.qzeros = pack_int(z, 4, dim=1)
    model.lowbit_quant_config = GPTQConfig(bits=4, group_size=32, format="gptq", sym=False)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.qzeros: a zero point of 0"):
        lowbit.save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
