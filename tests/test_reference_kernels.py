"""Reference dequantize/matmul against hand-computed cases, and the affine math."""

import pytest
import torch

from lowbit.formats.packing import pack_int
from lowbit.kernels.reference import dequantize_int_grouped, matmul_int_grouped
from lowbit.methods.affine import choose_qparams, dequantize, group_index, quantize, quantize_grouped


def test_dequantize_hand_computed_4bit():
    # K=4 inputs, N=2 outputs, group_size=2 -> G=2.
    q_kn = torch.tensor([[0, 15], [1, 14], [8, 3], [9, 2]], dtype=torch.int32)  # [K, N]
    scales = torch.tensor([[0.5, 1.0], [2.0, 0.25]], dtype=torch.float16)  # [G, N]
    zeros = torch.tensor([[8, 7], [8, 0]], dtype=torch.int32)  # [G, N]
    g_idx = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    w = dequantize_int_grouped(pack_int(q_kn, 4, 0), scales, pack_int(zeros, 4, 1), g_idx, 4)
    expect = torch.tensor(
        [[(0 - 8) * 0.5, (1 - 8) * 0.5, (8 - 8) * 2.0, (9 - 8) * 2.0],
         [(15 - 7) * 1.0, (14 - 7) * 1.0, (3 - 0) * 0.25, (2 - 0) * 0.25]]
    )
    assert w.dtype == torch.float32 and w.shape == (2, 4)
    assert torch.equal(w, expect)


def test_dequantize_follows_permuted_g_idx():
    q_kn = torch.tensor([[1], [2], [3]], dtype=torch.int32)
    scales = torch.tensor([[1.0], [10.0]], dtype=torch.float16)
    zeros = torch.zeros(2, 1, dtype=torch.int32)
    g_idx = torch.tensor([1, 0, 1], dtype=torch.int32)  # act-order style
    w = dequantize_int_grouped(pack_int(q_kn, 8, 0), scales, pack_int(zeros, 8, 1), g_idx, 8)
    assert torch.equal(w, torch.tensor([[10.0, 2.0, 30.0]]))


@pytest.mark.parametrize(("k", "group_size", "permuted"), [(64, 16, False), (64, 16, True), (70, 16, False),
                                                          (48, 48, False)], ids=["in-order", "act-order", "ragged", "one-group"])
def test_dequantize_equals_the_formula_on_every_path(k, group_size, permuted):
    # in-order equal groups take a broadcast path, the rest a gather: both are the formula exactly
    g = torch.Generator().manual_seed(k + group_size + permuted)
    n, groups = 9, -(-k // group_size)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (groups, n), generator=g, dtype=torch.int32)
    s = torch.rand(groups, n, generator=g).half() + 0.01
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if permuted:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    w = dequantize_int_grouped(pack_int(q, 4, 0), s, pack_int(z, 4, 1), g_idx, 4)
    gl = g_idx.long()
    assert torch.equal(w, ((q.float() - z[gl].float()) * s[gl].float()).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matmul_is_linear_of_dequantized(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 64, generator=g)
    q, s, z = quantize_grouped(w, 4, 16, sym=False)
    args = (pack_int(q.t(), 4, 0), s.half(), pack_int(z, 4, 1), group_index(64, 16), 4)
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    bias = torch.randn(12, generator=g)
    y = matmul_int_grouped(x, *args, bias=bias)
    assert y.dtype == dtype and y.shape == (3, 5, 12)
    ref = x.double() @ dequantize_int_grouped(*args).double().t() + bias.double()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_rtn_error_bounded_by_half_step(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 32, generator=g) + (0.0 if sym else 0.7)
    scale, zero = choose_qparams(w, bits, sym)
    q = quantize(w, scale[:, None], zero[:, None], bits)
    assert int(q.min()) >= 0 and int(q.max()) < 2**bits
    err = (dequantize(q, scale[:, None], zero[:, None]) - w).abs()
    # Every value, clipped ones included, is within half a step: the grid ends lie within
    # half a step of the row's range (sym: the top code sits s/2 below max|w|; asym: the
    # rounded zero point moves the grid by at most s/2), plus the fp16 rounding of the scale
    # (relative 2**-11) accumulated over the 2**bits - 1 steps to the far end of the grid.
    slack = (2**bits - 1) * 2.0**-11
    assert (err <= scale[:, None] * (0.5 + slack)).all()


def test_sym_zero_is_midpoint_and_asym_range_contains_zero():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    _, z_sym = choose_qparams(w, 4, sym=True)
    assert z_sym.item() == 8
    s, z = choose_qparams(w, 4, sym=False)
    assert z.item() == 0 and torch.isclose(s, torch.tensor([3.0 / 15]), rtol=1e-3).all()


def test_all_zero_group_gets_positive_scale():
    s, z = choose_qparams(torch.zeros(2, 8), 4, sym=False)
    assert (s > 0).all()
    q = quantize(torch.zeros(2, 8), s[:, None], z[:, None], 4)
    assert torch.equal(dequantize(q, s[:, None], z[:, None]), torch.zeros(2, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_raise(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        choose_qparams(w, 4, sym=True)


@pytest.mark.parametrize("shape", [(6, 64), (5, 13), (3, 7)], ids=["whole-blocks", "ragged", "odd-length"])
def test_blockwise4_dequantize_equals_the_nibble_formula(shape):
    from lowbit.formats.packing import pack_nibbles, unpack_nibbles
    from lowbit.kernels.reference import dequantize_blockwise4

    g = torch.Generator().manual_seed(shape[0] * shape[1])
    n = shape[0] * shape[1]
    codes = torch.randint(0, 16, (n,), generator=g)
    quant_map = torch.randn(16, generator=g)
    absmax = torch.rand(-(-n // 64), generator=g) + 0.1
    w = dequantize_blockwise4(pack_nibbles(codes).view(-1, 1), absmax, quant_map, 64, shape)
    packed = pack_nibbles(codes)
    expect = quant_map[unpack_nibbles(packed, n)] * absmax.repeat_interleave(64)[:n]
    assert torch.equal(w, expect.view(shape))
