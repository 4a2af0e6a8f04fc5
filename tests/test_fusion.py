"""Fused projections: joining quantized linears along N is exact and reversible, a fused model
computes the unfused model's logits (eager and under torch.compile), saves the unfused checkpoint,
and bad groups are clear errors."""

from __future__ import annotations

import operator

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowbit
from conftest import calib_ids, tiny_llama_model
from lowbit.formats.base import QuantLinear
from lowbit.formats.concat import Part, concat_outputs, split_outputs
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.fusion import FusedLinears, FusedPart, awq_groups, fuse, unfuse, unfused
from test_group_order import random_module as random_int_grouped
from test_triton_blockwise4 import random_module as random_nf4
from test_triton_codebook import random_module as random_aqlm

NAMES = ["a", "b", "c"]


def buffers(m: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: getattr(m, k) for k in m._buffers}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_module(got: QuantLinear, want: QuantLinear) -> None:
    assert type(got) is type(want) and (got.in_features, got.out_features) == (want.in_features, want.out_features)
    gb, wb = buffers(got), buffers(want)
    assert gb.keys() == wb.keys()
    for k in wb:
        if wb[k] is None:
            assert gb[k] is None, k
        else:
            assert gb[k].dtype == wb[k].dtype and gb[k].shape == wb[k].shape, k
            assert torch.equal(as_bytes(gb[k]), as_bytes(wb[k])), k  # bits: packed codes may be NaN in a float dtype


def round_trip(mods):
    fused = concat_outputs(mods, NAMES[: len(mods)])
    x = torch.randn(5, mods[0].in_features, generator=torch.Generator().manual_seed(3))
    want = torch.cat([m(x) for m in mods], dim=-1)
    torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
    parts = [Part(n, m.out_features, m.bias is not None) for n, m in zip(NAMES, mods)]
    for got, m in zip(split_outputs(fused, parts), mods):
        assert_same_module(got, m)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_int_grouped_join_is_exact_and_reversible(bits, act_order):
    # widths that are not whole zero-point words (33 * 3 bits), one part without a bias
    mods = [random_int_grouped(n, 96, bits, 32, act_order, seed=1) for n in (33, 16, 24)]
    for m, b in zip(mods, (True, False, True)):
        m.bias = torch.randn(m.out_features).half() if b else None
        m.g_idx = mods[0].g_idx.clone()  # layers reading one input share the column order
    round_trip(mods)


def test_int8_join_is_exact_and_reversible():
    gen = torch.Generator().manual_seed(0)
    mods = [Int8Linear.from_linear(torch.randn(n, 64, generator=gen), torch.randn(n, generator=gen) if i else None,
                                   threshold=1.5) for i, n in enumerate((24, 40))]
    round_trip(mods)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_nf4_join_is_exact_and_reversible(storage):
    mods = [random_nf4(n, 128, 64, "nf4", False, seed=n, storage=storage, bias=n != 8).to("cpu") for n in (24, 8, 13)]
    round_trip(mods)


def test_double_quantized_nf4_joins_only_with_one_offset_and_whole_runs():
    mods = [random_nf4(128, 128, 64, "nf4", True, seed=s).to("cpu") for s in (1, 2)]
    with pytest.raises(ValueError, match="cannot fuse a, b: .*different absmax offsets"):
        concat_outputs(mods, ["a", "b"])
    mods[1].nested_offset = mods[0].nested_offset.clone()  # 128*128 values: one run of 256 blocks of 64
    round_trip(mods)


class _OtherLinear(QuantLinear):
    format = "other"


@pytest.mark.parametrize("case,msg", [
    ("bits", "their bits differ"),
    ("g_idx", "their g_idx differ"),
    ("aqlm", "each AQLM layer has its own codebooks"),
    ("formats", "different formats"),
    ("one", "two or more"),
    ("straddle", "not whole runs of 64"),
    ("in_features", "their in_features differ"),
    ("scales", "their scales have different dtypes"),
    ("bias", "their biases have different dtypes"),
    ("storage", "their quant_storage dtypes differ"),
    ("unknown", "the _OtherLinear format has no joined layout"),
])
def test_modules_that_cannot_join_are_named(case, msg):
    a = random_int_grouped(16, 64, 4, 32, True, seed=1)
    mods = {
        "bits": [a, random_int_grouped(16, 64, 3, 32, True, seed=1)],
        "g_idx": [a, random_int_grouped(16, 64, 4, 32, True, seed=2)],
        "aqlm": [random_aqlm(16, 64, 8, 1, 8, seed=s).to("cpu") for s in (1, 2)],
        "formats": [a, random_nf4(16, 64, 64, "nf4", False, seed=1).to("cpu")],
        "one": [a],
        "straddle": [random_nf4(3, 48, 64, "nf4", False, seed=1).to("cpu"),
                     random_nf4(5, 48, 64, "nf4", False, seed=2).to("cpu")],
        "in_features": [random_nf4(16, 64, 64, "nf4", False, seed=1).to("cpu"),
                        random_nf4(16, 128, 64, "nf4", False, seed=1).to("cpu")],
        "scales": [a, random_int_grouped(16, 64, 4, 32, True, seed=1, dtype=torch.bfloat16)],
        "bias": [random_nf4(16, 64, 64, "nf4", False, seed=s).to("cpu") for s in (1, 2)],
        "storage": [random_nf4(16, 64, 64, "nf4", False, seed=1).to("cpu"),
                    random_nf4(16, 64, 64, "nf4", False, seed=1, storage=torch.bfloat16).to("cpu")],
        "unknown": [_OtherLinear(64, 16), _OtherLinear(64, 16)],
    }[case]
    if case == "bias":
        mods[1].bias = mods[1].bias.half()
    with pytest.raises(ValueError, match=f"cannot fuse a.*{msg}"):
        concat_outputs(mods, NAMES[: len(mods)])


def test_split_needs_parts_that_add_up():
    fused = concat_outputs([random_int_grouped(16, 64, 4, 32, False, seed=s) for s in (1, 2)], ["a", "b"])
    with pytest.raises(ValueError, match="parts of 24 outputs do not split 32"):
        split_outputs(fused, [Part("a", 16, False), Part("b", 8, False)])


@pytest.mark.parametrize("named,msg", [
    ({"attention": ["q_proj", "k_proj"]}, r"modules_to_fuse\['attention'\] must list at least 3 module names"),
    ({"mlp": "gate_proj"}, r"modules_to_fuse\['mlp'\] must list at least 2 module names"),
    ({"layernorm": ["input_layernorm"]}, "names no 'attention' or 'mlp' modules"),
])
def test_bad_awq_modules_to_fuse(named, msg):
    with pytest.raises(ValueError, match=msg):
        awq_groups(named)


# --- whole models ----------------------------------------------------------------------------

CONFIGS = {
    "rtn3": lowbit.RtnConfig(bits=3, group_size=32),
    "gptq-act-order": lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True),
    "int8-outliers": lowbit.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.05),
    "nf4": lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
}


PRODUCTS = (operator.matmul, torch.ops.aten._weight_int4pack_mm_for_cpu)
"""A traced layer's product: the reference's ``@``, or PyTorch's CPU int4 kernel (``cpu-int4``)."""


def quantized(name: str) -> nn.Module:
    return lowbit.quantize(tiny_llama_model(), CONFIGS[name], calib_ids(4, 32), progress=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_model_matches_unfused_and_compiles(name):
    model = quantized(name)
    ids = calib_ids(2, 8, seed=5)
    products = []

    def backend(gm, inputs):  # runs the traced graph as it is, noting its matmuls
        products.extend(n for n in gm.graph.nodes if n.op == "call_function" and n.target in PRODUCTS)
        return gm.forward

    with torch.no_grad():
        want = model(ids).logits
        fused = fuse(model)
        got = model(ids).logits
        # the stand-ins trace the same way for every format (test_compile traces each format's kernels)
        if name in ("rtn3", "gptq-act-order"):
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend=backend)(ids).logits
            torch.testing.assert_close(compiled, got, rtol=1e-5, atol=1e-5)
    if name == "rtn3":  # one product per layer (on a CPU: cpu-int4's op): 7 per block unfused, one per group fused
        assert len(products) == 4 * 2
    assert sorted(fused) == [f"model.layers.{i}.{p}" for i in range(2)
                             for p in ("mlp.fused_gate_proj_up_proj", "self_attn.fused_q_proj_k_proj_v_proj")]
    assert isinstance(model.model.layers[0].self_attn.k_proj, FusedPart)
    assert all(g._pending is None for g in model.modules() if isinstance(g, FusedLinears))  # nothing kept
    # one wider matmul: the same numbers summed in another blocking
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_model_saves_the_unfused_checkpoint(tmp_path):
    model = quantized("gptq-act-order")
    lowbit.save_quantized(model, tmp_path / "plain")
    fuse(model)
    lowbit.save_quantized(model, tmp_path / "fused")
    assert isinstance(model.model.layers[1].mlp.up_proj, FusedPart)  # put back after saving
    want, got = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "fused" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "fused" / "config.json").read_text() == (tmp_path / "plain" / "config.json").read_text()
    unfuse(model)
    assert not any(isinstance(m, (FusedLinears, FusedPart)) for m in model.modules())


def test_unfused_restores_the_groups_after_an_error():
    model = quantized("rtn3")
    fuse(model, [("gate_proj", "up_proj")])
    group = model.model.layers[0].mlp.fused_gate_proj_up_proj
    with pytest.raises(RuntimeError, match="boom"), unfused(model):
        assert isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)
        raise RuntimeError("boom")
    assert model.model.layers[0].mlp.fused_gate_proj_up_proj is group


def test_a_part_called_on_another_input_recomputes():
    model = quantized("rtn3")
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj, attn.k_proj
    fuse(model, [("q_proj", "k_proj", "v_proj")])
    x, y = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        got_q, got_k = attn.q_proj(x), attn.k_proj(y)
        torch.testing.assert_close(got_q, q(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_k, k(y), rtol=1e-5, atol=1e-5)


def test_awq_do_fuse_fuses_the_named_groups_and_bad_names_are_errors():
    cfg = lowbit.AwqConfig(bits=4, group_size=32, do_fuse=True, fuse_max_seq_len=64, nsamples=4,
                           modules_to_fuse={"attention": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    model = lowbit.quantize(tiny_llama_model(), cfg, calib_ids(4, 32), progress=False)
    assert isinstance(model.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj, FusedLinears)
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)  # only the named groups
    bad = cfg.replace(modules_to_fuse={"attention": ["wq", "wk", "wv", "wo"]})
    with pytest.raises(ValueError, match="no module of the model has quantized linears named wq, wk, wv"):
        lowbit.quantize(tiny_llama_model(), bad, calib_ids(4, 32), progress=False)


def test_fuse_option_and_bad_groups():
    model = lowbit.quantize(tiny_llama_model(), CONFIGS["rtn3"], progress=False, fuse=True)
    assert isinstance(model.model.layers[1].mlp.fused_gate_proj_up_proj, FusedLinears)
    with pytest.raises(ValueError, match="two or more distinct"):
        fuse(quantized("rtn3"), [("q_proj",)])
    with pytest.raises(ValueError, match="no module of the model has quantized linears named x_proj, y_proj"):
        fuse(quantized("rtn3"), [("x_proj", "y_proj")], strict=True)


def test_checkpoint_loads_fused(tmp_path):
    model = quantized("gptq-act-order")
    lowbit.save_quantized(model, tmp_path / "q")
    plain, fused = lowbit.from_pretrained(tmp_path / "q"), lowbit.from_pretrained(tmp_path / "q", fuse=True)
    assert isinstance(fused.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj, FusedLinears)
    ids = calib_ids(1, 8, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
