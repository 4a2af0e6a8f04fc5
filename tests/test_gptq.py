"""GPTQ: the Hessian, the solver's promises (beats RTN on the data it saw), its options and errors."""

import logging

import pytest
import torch

import lowbit
from lowbit import GPTQConfig, IntGroupedLinear, QuantLinear
from lowbit.methods.affine import dequantize, group_index, quantize_grouped
from lowbit.methods.calibration import input_groups
from lowbit.methods.gptq import GptqQuantizer, HessianStats, gptq_quantize, inverse_hessian_factor
from lowbit.methods.walk import find_blocks

from conftest import correlated_layer, tiny_llama_model


def _layer_data(n=24, k=96, rows=512, seed=0):
    return correlated_layer(n, k, rows, seed)


def _hessian(x):
    stats = HessianStats(x.shape[1])
    stats.add_batch(x)
    return stats.H


def _dequant(r):
    s = r.scales[r.g_idx.long()].t()  # [N, K]
    z = r.zeros[r.g_idx.long()].t()
    return dequantize(r.q, s, z)


def _out_err(w, w_hat, x):
    return ((x @ (w - w_hat).t()) ** 2).sum().item()


def test_hessian_is_running_average_of_2xxt():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    stats = HessianStats(16)
    for batch in x:  # three batches of 7 rows
        stats.add_batch(batch)
    flat = x.reshape(-1, 16).double()
    assert stats.nsamples == 21
    assert torch.allclose(stats.H.double(), 2 * flat.t() @ flat / 21, rtol=1e-5, atol=1e-6)


def test_hessian_refuses_nan_activations():
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="activations contain NaN"):
        HessianStats(8).add_batch(x)


CASES = [  # bits, group_size, sym, desc_act, static_groups
    (4, 32, True, False, False),
    (4, 32, False, False, False),
    (4, -1, True, False, False),
    (3, 32, False, False, False),
    (2, 16, False, False, False),
    (8, 32, True, False, False),
    (4, 32, True, True, False),
    (4, 32, False, True, True),
    (4, 40, True, True, False),  # K=96: groups of 40, 40 and a shorter 16
]


@pytest.mark.parametrize("bits,gs,sym,desc_act,static", CASES, ids=lambda c: str(c))
def test_gptq_output_error_below_rtn(bits, gs, sym, desc_act, static):
    w, x = _layer_data()
    k = w.shape[1]
    g = k if gs == -1 else gs
    r = gptq_quantize(w, _hessian(x), bits=bits, group_size=g, sym=sym, desc_act=desc_act,
                      static_groups=static, damp_percent=0.1, block_size=32)
    assert r.q.dtype == torch.int32 and r.q.shape == w.shape
    assert 0 <= int(r.q.min()) and int(r.q.max()) < 2**bits
    assert r.scales.shape == r.zeros.shape == (-(-k // g), w.shape[0])
    q, s, z = quantize_grouped(w, bits, g, sym)
    rtn = dequantize(q, s.t()[:, group_index(k, g).long()], z.t()[:, group_index(k, g).long()])
    gptq_err, rtn_err = _out_err(w, _dequant(r), x), _out_err(w, rtn, x)
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


def test_identity_hessian_reduces_to_rtn():
    """With H = I no column's error reaches another, so GPTQ is round-to-nearest exactly."""
    w, _ = _layer_data()
    r = gptq_quantize(w, torch.eye(96), bits=4, group_size=32, sym=False, block_size=32)
    q, s, z = quantize_grouped(w, 4, 32, sym=False)
    assert torch.equal(r.q, q) and torch.equal(r.scales, s) and torch.equal(r.zeros, z)
    assert torch.equal(r.g_idx, group_index(96, 32))


def test_block_size_does_not_change_the_result_much():
    w, x = _layer_data()
    H = _hessian(x)
    a = gptq_quantize(w, H, bits=4, group_size=32, sym=True, block_size=8)
    b = gptq_quantize(w, H, bits=4, group_size=32, sym=True, block_size=96)
    assert (a.q != b.q).float().mean() < 0.01  # same math; only float summation order differs


def test_act_order_g_idx_follows_decreasing_hessian_diagonal():
    w, x = _layer_data()
    H = _hessian(x)
    r = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=True)
    order = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(r.g_idx[order], (torch.arange(96) // 32).to(torch.int32))
    static = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=True, static_groups=True)
    assert torch.equal(static.g_idx, group_index(96, 32))


def test_dead_columns_are_zeroed():
    w, x = _layer_data()
    x[:, 5] = 0  # input channel 5 never fires
    r = gptq_quantize(w, _hessian(x), bits=4, group_size=32, sym=True)
    assert torch.equal(_dequant(r)[:, 5], torch.zeros(24))


def test_zero_min_keeps_asym_zeros_storable_as_v1():
    w, x = _layer_data()
    w = w.abs()  # no negative weights: plain asym would pick zero point 0
    r0 = gptq_quantize(w, _hessian(x), bits=4, group_size=32, sym=False)
    r1 = gptq_quantize(w, _hessian(x), bits=4, group_size=32, sym=False, zero_min=1)
    assert int(r0.zeros.min()) == 0 and int(r1.zeros.min()) == 1


def test_damp_is_raised_when_cholesky_fails(caplog):
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))
    with caplog.at_level(logging.WARNING, logger="lowbit.methods.gptq"):
        U, damp = inverse_hessian_factor(H, 0.1)
    assert damp == pytest.approx(0.625)  # 0.1 x mean diag (0.625) failed, 1.0 x worked
    assert "dampening raised" in caplog.text
    assert torch.allclose(U.t() @ U, torch.linalg.inv(H + damp * torch.eye(4)), atol=1e-6)


def test_hessian_that_cannot_be_damped_raises():
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_hessian_factor(-torch.eye(4), 0.1)


def test_nan_weights_raise():
    w, x = _layer_data()
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, _hessian(x), bits=4, group_size=32, sym=True)


def test_quantizer_without_calibration_inputs_raises():
    lin = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="blk.q: GPTQ got no calibration inputs"):
        GptqQuantizer(GPTQConfig(bits=4, group_size=32)).quantize_layer("blk.q", lin, HessianStats(32))


# --- the runner and the whole model -----------------------------------------------------------

def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_input_groups_of_a_llama_block():
    model = tiny_llama_model()
    _, blocks = find_blocks(model)
    from lowbit.methods.calibration import capture_block_inputs
    from lowbit.methods.walk import find_linears

    states, kwargs = capture_block_inputs(model, blocks[0], _ids(1), torch.device("cpu"))
    groups = input_groups(blocks[0], find_linears(blocks[0]), states[0], kwargs)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("true_sequential", [True, False], ids=["true-seq", "all-at-once"])
def test_gptq_model_beats_rtn_on_calibration_loss(true_sequential):
    ids = _ids()
    fp = tiny_llama_model()
    with torch.no_grad():
        target = fp(ids).logits

    def loss(cfg):
        model = lowbit.quantize(tiny_llama_model(), cfg, ids, progress=False)
        with torch.no_grad():
            return ((model(ids).logits - target) ** 2).mean().item()

    gptq = loss(GPTQConfig(bits=3, group_size=32, true_sequential=true_sequential, damp_percent=0.01))
    rtn = loss(lowbit.RtnConfig(bits=3, group_size=32))
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_gptq_save_load_round_trip(tmp_path):
    model = lowbit.quantize(tiny_llama_model(), GPTQConfig(bits=4, group_size=32, desc_act=True), _ids(),
                            progress=False)
    assert sum(isinstance(m, IntGroupedLinear) for m in model.modules()) == 14
    lowbit.save_quantized(model, tmp_path / "q")
    loaded = lowbit.from_pretrained(tmp_path / "q")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), loaded.get_submodule(name).dequantize()), name
    with torch.no_grad():
        assert torch.equal(model(_ids(2, 9, 1)).logits, loaded(_ids(2, 9, 1)).logits)


@pytest.mark.parametrize("calib,msg", [
    (torch.tensor([[5]]), "too little calibration data"),
    (torch.zeros(2, 3, 4, dtype=torch.int64), "int tensor \\[nsamples, seqlen\\]"),
    (torch.rand(2, 8), "int tensor \\[nsamples, seqlen\\]"),
], ids=["one-token", "3d", "float"])
def test_bad_calibration_tensors(calib, msg):
    with pytest.raises(ValueError, match=msg):
        lowbit.quantize(tiny_llama_model(), GPTQConfig(bits=4, group_size=32), calib, progress=False)


def test_gptq_without_tokenizer_or_tokens_raises():
    with pytest.raises(ValueError, match="gptq needs calibration data"):
        lowbit.quantize(tiny_llama_model(), GPTQConfig(bits=4, group_size=32), ["some text"], progress=False)


def test_few_calibration_rows_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.methods.gptq"):
        lowbit.quantize(tiny_llama_model(), GPTQConfig(bits=4, group_size=32), _ids(1, 16), progress=False)
    assert "16 calibration rows for 64 inputs" in caplog.text


@pytest.mark.gpu
def test_gptq_on_gpu_matches_cpu():
    ids = _ids()
    cfg = GPTQConfig(bits=4, group_size=32, desc_act=True)
    cpu = lowbit.quantize(tiny_llama_model(), cfg, ids, progress=False)
    gpu = lowbit.quantize(tiny_llama_model().cuda(), cfg, ids, device="cuda", progress=False)
    for name, m in cpu.named_modules():
        if isinstance(m, IntGroupedLinear):
            a, b = m.dequantize(), gpu.get_submodule(name).dequantize().cpu()
            assert (a != b).float().mean() < 0.02, name  # float summation order differs by device


def test_linears_outside_blocks_are_recorded_as_not_converted(tmp_path, caplog):
    """A BERT-style pooler sits outside the blocks: GPTQ leaves it, and the saved config says so."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()
    with caplog.at_level(logging.WARNING, logger="lowbit.api"):
        lowbit.quantize(bert, GPTQConfig(bits=4, group_size=32), _ids(4, 16), progress=False)
    assert "pooler.dense" in caplog.text
    assert lowbit.quantized_config(bert).modules_to_not_convert == ("pooler.dense",)
    assert sum(isinstance(m, IntGroupedLinear) for m in bert.modules()) == 2 * 6
    lowbit.save_quantized(bert, tmp_path / "b")
    loaded = lowbit.from_pretrained(tmp_path / "b")
    ids = _ids(2, 9, 1)
    with torch.no_grad():
        assert torch.equal(bert(ids).last_hidden_state, loaded(ids).last_hidden_state)
