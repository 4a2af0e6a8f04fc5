"""AWQ: the scale and clip searches, exact scale folding, the AutoAWQ GEMM layout, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import AwqConfig
from lowbit.checkpoint.layouts.awq import awq_pack, awq_unpack
from lowbit.checkpoint.safetensors_io import SINGLE_FILE
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.methods.affine import fake_quantize_grouped
from lowbit.methods.awq import (
    apply_clip,
    candidate_scale,
    fold_inverse_scale,
    search_clip,
    search_scale,
    set_linear_weight,
    weight_mean,
)
from lowbit.methods.awq_maps import BLOCK_MAPS
from lowbit.methods.walk import linear_weight

from conftest import calib_ids, tiny_llama_model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- packing ---------------------------------------------------------------------------------

def test_awq_pack_worked_example_and_round_trip():
    assert awq_pack(torch.arange(8, dtype=torch.int32)[None]).item() == 0x75316420
    q = torch.randint(0, 16, (12, 40), generator=_gen(1), dtype=torch.int32)
    packed = awq_pack(q)
    assert packed.shape == (12, 5) and packed.dtype == torch.int32
    assert torch.equal(awq_unpack(packed, 40), q)
    assert torch.equal(awq_pack(awq_unpack(packed, 40)), packed)  # pack -> unpack -> pack


# --- pure functions --------------------------------------------------------------------------

def test_candidate_scale_is_centred_and_positive():
    x_mean = torch.rand(96, generator=_gen(2)) * 5
    x_mean[3] = 0.0  # a dead channel still gets a positive scale
    w_mean = torch.rand(96, generator=_gen(3))
    for ratio in (0.0, 0.3, 0.95):
        for w in (None, w_mean):
            s = candidate_scale(x_mean, w, ratio)
            assert (s > 0).all() and torch.isfinite(s).all()
            assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    assert torch.equal(candidate_scale(x_mean, None, 0.0), torch.ones(96))


def test_weight_mean_normalises_each_group_by_its_max():
    w = torch.tensor([[1.0, -2.0, 4.0, 1.0, 3.0], [2.0, 2.0, -1.0, 1.0, 1.0]])  # groups of 2: [0,1] [2,3] [4]
    expected = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (1.0 + 1.0) / 2, (0.25 + 1.0) / 2, 1.0])
    torch.testing.assert_close(weight_mean(w, 2), expected)


def test_search_scale_returns_the_lowest_loss_candidate():
    x_mean = torch.rand(64, generator=_gen(4)) + 0.1
    w = torch.randn(16, 64, generator=_gen(5))
    target = 0.35
    ideal = candidate_scale(x_mean, None, target)

    def loss_of(ws):  # distance of the implied scale from the ideal one: minimal at ratio 0.35
        return float((ws[0] - fake_quantize_grouped(w * ideal, 4, 32, False) / ideal).abs().sum())

    s, ratio, losses = search_scale(x_mean, None, [w], loss_of, 4, 32, sym=False)
    assert ratio == pytest.approx(target) and len(losses) == 20
    assert losses[7] == min(losses) and torch.equal(s, ideal)


def test_search_scale_refuses_when_no_loss_is_finite():
    with pytest.raises(ValueError, match="no finite loss"):
        search_scale(torch.ones(8), None, [torch.randn(4, 8)], lambda ws: float("nan"), 4, 8, sym=False)


@pytest.mark.parametrize("group_size", [32, 48])  # 48 leaves a shorter last group on K=96
def test_clip_search_never_increases_the_partial_product_error(group_size):
    w = torch.randn(24, 96, generator=_gen(6))
    w[:, 5] *= 8  # an outlier weight column: clipping pays off
    x = torch.randn(200, 96, generator=_gen(7))
    max_val = search_clip(w, x, 4, group_size, sym=False)
    clipped = apply_clip(w, max_val, group_size)
    assert max_val.shape == (24, -(-96 // group_size))
    assert (clipped.abs() <= w.abs()).all()

    def err(weight):
        deq = fake_quantize_grouped(weight, 4, group_size, False)
        total = 0.0
        for s in range(0, 96, group_size):
            sl = slice(s, s + group_size)
            total += ((x[:, sl] @ deq[:, sl].t() - x[:, sl] @ w[:, sl].t()) ** 2).mean(0).sum().item()
        return total

    assert err(clipped) <= err(w) + 1e-6
    assert (max_val < w.abs().reshape(24, -1).amax(1, keepdim=True).expand_as(max_val) + 1e-6).any()


def _symmetric_groups(rows: int, k: int, seed: int) -> torch.Tensor:
    """Weights whose every 64-wide group is clamped to +-0.8 of its smaller end: ``max = -min``,
    as the clip search leaves many groups."""
    w = torch.randn(rows, k, generator=_gen(seed)).reshape(rows, -1, 64)
    m = 0.8 * torch.minimum(w.amax(-1), -w.amin(-1))[..., None]
    return torch.clamp(w, -m, m).reshape(rows, k)


def test_symmetric_groups_keep_every_code():
    """On ``max = -min`` groups the zero point sits on a tie (3.5 at 3 bits). Chosen with the
    fp32 scale it nearly always breaks the same way (to 4: the negative end keeps the extra code);
    with the scale rounded to fp16 first it breaks at random, and about half the groups lose a code.
    (A group can also miss an interior code by chance: 64 values over 8 codes.)"""
    from lowbit.methods.affine import quantize_grouped
    from lowbit.methods.awq import CODE_SCALE_DTYPE

    w = _symmetric_groups(256, 128, seed=11)
    codes_used = {}
    for dtype in (CODE_SCALE_DTYPE, torch.float16):
        q, _, zeros = quantize_grouped(w, 3, 64, sym=False, scale_dtype=dtype)
        groups = q.reshape(256, 2, 64)
        codes_used[dtype] = torch.tensor([len(torch.unique(g)) for g in groups.reshape(-1, 64)]).float()
    assert (codes_used[CODE_SCALE_DTYPE] == 8).float().mean() >= 0.9
    assert 0.2 <= (codes_used[torch.float16] < 8).float().mean() <= 0.8


def test_awq_module_stores_fp16_scales_of_codes_chosen_in_fp32():
    """The final rounding is the fp32 one; only the stored scale is rounded (relative 2**-11)."""
    from lowbit.methods.awq import AwqQuantizer

    w = _symmetric_groups(48, 128, seed=12)
    linear = torch.nn.Linear(128, 48, bias=False)
    set_linear_weight(linear, w)
    module = AwqQuantizer(AwqConfig(bits=3, group_size=64)).quantize_layer("l", linear, None)
    assert module.scales.dtype == torch.float16
    want = fake_quantize_grouped(w, 3, 64, sym=False, scale_dtype=torch.float32)
    got = module.dequantize().float()
    assert ((got - want).abs() <= want.abs() * 2**-11 + 1e-6).all()


# --- folding scales keeps the fp model's function -------------------------------------------

def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def _opt(seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


def _mha_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [tiny_llama_model, _mha_llama, _gpt2, _opt], ids=["llama-gqa", "llama-mha", "gpt2", "opt"])
def test_folding_every_scale_group_leaves_the_fp_model_unchanged(make):
    from lowbit.methods.awq import can_fold
    from lowbit.methods.walk import find_blocks, linear_shape

    model = make()
    ids = calib_ids(2, 32)
    with torch.no_grad():
        before = model(ids).logits
        _, blocks = find_blocks(model)
        block = blocks[0]
        folded = 0
        for g in BLOCK_MAPS[type(block).__name__].groups:
            if not can_fold(block, g):
                continue
            k, _ = linear_shape(block.get_submodule(g.linears[0]))
            s = torch.rand(k, generator=_gen(folded)) + 0.5
            fold_inverse_scale(block.get_submodule(g.prev), s)
            for name in g.linears:
                lin = block.get_submodule(name)
                set_linear_weight(lin, linear_weight(lin) * s)
            folded += 1
        after = model(ids).logits
    assert folded >= 3
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# --- quantizing models -----------------------------------------------------------------------

def _salient_llama():
    """A tiny Llama whose normed activations have a few large channels, as real LLMs do."""
    model = tiny_llama_model()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] = 12.0
    return model


def _output_error(model, ref_model, ids):
    with torch.no_grad():
        ref = ref_model(ids).logits
        return ((model(ids).logits - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_salient_channels(bits):
    ids, held_out = calib_ids(8, 64, seed=0), calib_ids(4, 64, seed=1)
    cfg = AwqConfig(bits=bits, group_size=32, nsamples=8)
    awq = lowbit.quantize(_salient_llama(), cfg, calib=ids, progress=False)
    rtn = lowbit.quantize(_salient_llama(), lowbit.RtnConfig(bits=bits, group_size=32, sym=False))
    assert isinstance(awq.model.layers[0].mlp.down_proj, IntGroupedLinear)
    assert _output_error(awq, _salient_llama(), held_out) < 0.8 * _output_error(rtn, _salient_llama(), held_out)


@pytest.mark.parametrize("make,linears", [(_gpt2, 8), (_opt, 12)], ids=["gpt2", "opt"])
def test_awq_runs_on_other_architectures(make, linears):
    model = lowbit.quantize(make(), AwqConfig(bits=4, group_size=32, nsamples=4), calib=calib_ids(4, 64), progress=False)
    assert sum(isinstance(m, IntGroupedLinear) for m in model.modules()) == linears
    assert _output_error(model, make(), calib_ids(2, 32, seed=3)) < 0.2


def test_unknown_architecture_is_a_clear_error():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128)).eval()
    with pytest.raises(ValueError, match=r"AWQ does not know which linears of a BertLayer share an input; "
                                         r"add a BlockMap for it in lowbit/methods/awq_maps.py"):
        lowbit.quantize(bert, AwqConfig(bits=4, group_size=32, nsamples=2), calib=calib_ids(2, 16))


# --- the GEMM layout on disk -----------------------------------------------------------------

@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
def test_save_load_round_trip_in_the_gemm_layout(tmp_path, zero_point):
    cfg = AwqConfig(bits=4, group_size=32, zero_point=zero_point, nsamples=4)
    model = lowbit.quantize(_salient_llama(), cfg, calib=calib_ids(4, 64), progress=False)
    lowbit.save_quantized(model, tmp_path / "awq")
    t = load_file(tmp_path / "awq" / SINGLE_FILE)
    p = "model.layers.0.mlp.up_proj."  # K=64 -> N=128
    assert t[p + "qweight"].shape == (64, 16) and t[p + "qzeros"].shape == (2, 16) and t[p + "scales"].shape == (2, 128)
    assert p + "g_idx" not in t
    if not zero_point:
        assert (awq_unpack(t[p + "qzeros"], 128) == 8).all()
    qcfg = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["version"] == "gemm" and qcfg["zero_point"] == zero_point
    # the stored codes are the module's codes in AWQ order
    up = model.model.layers[0].mlp.up_proj
    from lowbit.formats.packing import unpack_int

    assert torch.equal(awq_unpack(t[p + "qweight"], 128), unpack_int(up.qweight, 4, 64, dim=0))
    loaded = lowbit.from_pretrained(tmp_path / "awq")
    for (na, a), (nb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert na == nb and torch.equal(a, b), na
    ids = calib_ids(2, 32, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("cfg,msg", [
    (AwqConfig(bits=3, group_size=32, nsamples=2), "the AWQ GEMM layout holds 4-bit weights only"),
    (AwqConfig(bits=4, group_size=48, nsamples=2), "group_size=48 does not divide in_features=64"),
], ids=["bits", "group"])
def test_what_the_gemm_layout_cannot_hold_is_refused_and_nothing_written(tmp_path, cfg, msg):
    model = lowbit.quantize(tiny_llama_model(), cfg, calib=calib_ids(2, 32), progress=False)
    with pytest.raises(ValueError, match=msg):
        lowbit.save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_layout_on_load_is_a_clear_error(tmp_path):
    model = lowbit.quantize(tiny_llama_model(), AwqConfig(bits=4, group_size=32, nsamples=2),
                            calib=calib_ids(2, 32), progress=False)
    lowbit.save_quantized(model, tmp_path / "awq")
    path = tmp_path / "awq" / SINGLE_FILE
    t = load_file(path)
    key = "model.layers.0.mlp.up_proj.qweight"
    t[key] = t[key].reshape(16, 64)  # a GPTQ-shaped [K/8, N] tensor under an AWQ config
    save_file(t, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.qweight is torch.int32 \(16, 64\); the AWQ GEMM layout .* \(64, 16\)"):
        lowbit.from_pretrained(tmp_path / "awq")
