"""IntGroupedLinear, the RTN quantizer that fills it, and kernel selection."""

import pytest
import torch
from torch import nn

from lowbit.config import RtnConfig
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.kernels import KernelImpl, kernels_for, register_kernel, select_kernel
from lowbit.methods.affine import dequantize, quantize_grouped
from lowbit.methods.rtn import RtnQuantizer


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


CASES = [  # (K, N, bits, group_size, sym)
    (64, 24, 4, 32, True),
    (64, 24, 4, 32, False),
    (96, 7, 3, 32, False),
    (40, 13, 2, 8, False),
    (48, 5, 8, -1, True),
    (128, 33, 4, 128, False),
]


@pytest.mark.parametrize("k,n,bits,gs,sym", CASES, ids=lambda c: str(c))
def test_rtn_module_dequantizes_to_rtn_weights(k, n, bits, gs, sym):
    lin = _linear(k, n)
    mod = RtnQuantizer(RtnConfig(bits=bits, group_size=gs, sym=sym)).quantize_layer("l", lin, None)
    assert isinstance(mod, IntGroupedLinear)
    g = k if gs == -1 else gs
    q, s, z = quantize_grouped(lin.weight.data, bits, g, sym)  # [N,K] [G,N] [G,N]
    groups = torch.arange(k) // g
    expect = dequantize(q, s.t()[:, groups], z.t()[:, groups])  # [N, K]
    assert torch.equal(mod.dequantize(), expect)
    assert torch.equal(mod.g_idx, groups.to(torch.int32))


@pytest.mark.parametrize("m", [1, 3, 16, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_matches_dense_dequantized(m, dtype):
    lin = _linear(64, 24)
    mod = RtnQuantizer(RtnConfig(bits=4, group_size=16)).quantize_layer("l", lin, None)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = mod(x)
    assert mod.bias.dtype == torch.float16 and torch.equal(mod.bias, lin.bias.data.half())  # GPTQ layout: fp16
    ref = x.double() @ mod.dequantize().double().t() + mod.bias.double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.dtype == dtype and y.shape == (m, 24)
    assert rel <= {torch.float32: 1e-6, torch.bfloat16: 5e-3}[dtype]


def test_rtn_4bit_close_to_original():
    lin = _linear(256, 64, bias=False)
    mod = RtnQuantizer(RtnConfig(bits=4, group_size=64)).quantize_layer("l", lin, None)
    w = lin.weight.data
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - mod.dequantize()).pow(2).sum())
    assert sqnr > 18  # 4-bit RTN on Gaussian weights: ~20 dB


def test_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=32)  # in 32, out 12, weight [32, 12]
    nn.init.normal_(conv.weight, std=0.1)
    mod = RtnQuantizer(RtnConfig(bits=8, group_size=-1)).quantize_layer("c", conv, None)
    assert (mod.in_features, mod.out_features) == (32, 12)
    x = torch.randn(2, 32)
    assert torch.allclose(mod(x), conv(x), atol=2e-2)


@pytest.mark.parametrize("k,gs", [(64, 48), (576, 128), (40, 64)], ids=["64g48", "576g128", "40g64"])
def test_shorter_last_group(k, gs):
    """A group size that does not divide K leaves a shorter last group (AutoGPTQ's ceil(K/g))."""
    lin = _linear(k, 6)
    mod = RtnQuantizer(RtnConfig(bits=4, group_size=gs)).quantize_layer("l", lin, None)
    groups = -(-k // gs)
    assert mod.scales.shape == (groups, 6) and mod.qzeros.shape == (groups, 1)
    assert torch.equal(mod.g_idx, (torch.arange(k) // gs).to(torch.int32))
    w = lin.weight.data
    for g in range(groups):  # each group's codes come from that group's columns alone
        cols = slice(g * gs, min((g + 1) * gs, k))
        q, s, z = quantize_grouped(w[:, cols], 4, gs, sym=True)
        assert torch.equal(mod.dequantize()[:, cols], dequantize(q, s.t(), z.t()))


@pytest.mark.parametrize("gs,msg", [(0, "group_size=0"), (-2, "group_size=-2")])
def test_bad_group_size_in_layer_check(gs, msg):
    from lowbit.formats.int_grouped import check_grouping

    with pytest.raises(ValueError, match=msg):
        check_grouping(64, 4, gs)


def test_nan_weights_refused():
    lin = _linear(64, 8)
    lin.weight.data[2, 3] = float("nan")
    with pytest.raises(ValueError, match="blk.q: weight contains NaN"):
        RtnQuantizer(RtnConfig(bits=4, group_size=32)).quantize_layer("blk.q", lin, None)


def test_repr_names_the_layer():
    mod = IntGroupedLinear(64, 8, bits=3, group_size=32, bias=False)
    assert repr(mod) == "IntGroupedLinear(in_features=64, out_features=8, kernel=auto, bits=3, group_size=32)"


def test_wrong_input_width_raises():
    mod = RtnQuantizer(RtnConfig(bits=4, group_size=32)).quantize_layer("l", _linear(64, 8), None)
    with pytest.raises(ValueError, match="input has 32 features, layer expects 64"):
        mod(torch.randn(2, 32))


# --- kernel selection -------------------------------------------------------------------

class _Fmt(IntGroupedLinear):
    format = "test_fmt"


def _impl(name, prio, available=True, supports=True, out=0.0):
    return KernelImpl(name, prio, lambda: available, lambda m, x: supports, lambda x, m: torch.full((1,), out))


@pytest.fixture(scope="module")
def fmt_module():
    register_kernel("test_fmt", _impl("slow", 0, out=1.0))
    register_kernel("test_fmt", _impl("fast", 10, out=2.0))
    register_kernel("test_fmt", _impl("absent", 20, available=False))
    register_kernel("test_fmt", _impl("picky", 15, supports=False))
    return _Fmt(32, 8, bits=4, group_size=32, bias=False)


def test_auto_picks_highest_available_supported(fmt_module, monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    assert [k.name for k in kernels_for("test_fmt")] == ["absent", "picky", "fast", "slow"]
    assert select_kernel(fmt_module, torch.randn(1, 32)).name == "fast"


def test_env_forces_kernel(fmt_module, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "slow")
    assert select_kernel(fmt_module, torch.randn(1, 32)).name == "slow"
    assert fmt_module(torch.randn(1, 32)).item() == 1.0


@pytest.mark.parametrize("name,msg", [("absent", "not available"), ("picky", "does not support"),
                                      ("nope", "unknown kernel")])
def test_named_kernel_that_cannot_run_raises(fmt_module, monkeypatch, name, msg):
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    with pytest.raises(ValueError, match=msg):
        select_kernel(fmt_module, torch.randn(1, 32), kernel=name)


def test_env_unknown_kernel_raises(fmt_module, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "nope")
    with pytest.raises(ValueError, match="LOWBIT_KERNEL=nope"):
        select_kernel(fmt_module, torch.randn(1, 32))


def test_duplicate_kernel_name_raises(fmt_module):
    with pytest.raises(ValueError, match="already registered"):
        register_kernel("test_fmt", _impl("fast", 1))


def test_reference_is_registered_for_int_grouped(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    mod = IntGroupedLinear(32, 8, bits=4, group_size=32, bias=False)
    assert select_kernel(mod, torch.randn(1, 32)).name == "reference"
