"""The CPU int4 kernel of grouped-int weights (``lowbit.kernels.cpu_int4``: PyTorch's
``_weight_int4pack_mm_for_cpu``) against the reference, its layout's exact round trip, and when
``kernel="auto"`` takes it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lowbit
from conftest import CPU_INT4_REL, calib_ids, check_layout_rebuilt, grouped_layer as layer, rel_err, tiny_llama_model
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.kernels import cpu_int4, exact_kernels, select_kernel

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="this PyTorch has no CPU int4 kernel")

# (N, K, group_size, act_order): SmolLM2's K = 576 at group 128 (a shorter last group: sub-groups
# of 64); one group per row; N not a multiple of 16 (padded); act-order; the largest sub-group
SHAPES = [(64, 576, 128, False), (48, 96, -1, False), (100, 96, 32, False), (40, 192, 64, True),
          (16, 512, 256, False), (33, 256, 128, True)]


def ids(case) -> str:
    n, k, group, act = case
    return f"{n}x{k}-g{group}" + ("-act" if act else "")


@pytest.mark.parametrize("m", [1, 3, 16, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_matches_reference(case, dtype, m):
    mod = layer(*case)  # 4 bits; test_two_and_three_bits for the others
    x = torch.randn(m, case[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    with torch.no_grad():
        mod.kernel = "cpu-int4"
        got = mod(x)
        mod.kernel = "reference"
        want = mod(x)
    assert got.dtype == dtype and got.shape == want.shape == (m, case[0])
    assert rel_err(got, want) <= CPU_INT4_REL


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_layout_round_trip_is_exact(case, bits):
    """With unit scales and zero points the weight is its codes: the identity through the kernel
    reads back every code, in the canonical input order (act-order and padded outputs included;
    8-bit codes as the sum of their two planes, 0-255, exact in bf16)."""
    n, k = case[:2]
    mod = layer(*case, bias=False, unit=True, bits=bits)
    with torch.no_grad():
        got = cpu_int4.matmul_cpu_int4(torch.eye(k), mod.cpu_int4())  # [K, N]: W.T
    assert mod.cpu_int4().planes == (2 if bits == 8 else 1)
    assert torch.equal(got, mod.dequantize().t())  # codes 0-15 (0-255 for 8 bits): exact in bf16


def test_three_dimensional_input_and_bias():
    mod = layer(64, 576, 128, False)
    x = torch.randn(2, 5, 576)
    with torch.no_grad():
        got = cpu_int4.matmul_cpu_int4(x, mod.cpu_int4(), mod.bias)
        no_bias = cpu_int4.matmul_cpu_int4(x, mod.cpu_int4())
        want = x @ mod.dequantize().t() + mod.bias.float()
    assert got.shape == (2, 5, 64)
    assert rel_err(got, want) <= CPU_INT4_REL
    torch.testing.assert_close(got - no_bias, mod.bias.float().expand_as(got), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("group_size", "k", "want"), [
    (128, 576, 64), (128, 4096, 128), (-1, 576, 64), (576, 576, 64), (256, 1024, 256), (32, 96, 32),
    (48, 96, None), (16, 64, None), (128, 80, None),
])
def test_kernel_group(group_size, k, want):
    assert cpu_int4.kernel_group(k if group_size == -1 else group_size, k) == want


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_two_three_and_eight_bits(case, bits, dtype, m):
    """2- and 3-bit codes run as 4-bit ones, 8-bit codes as two planes of them."""
    mod = layer(*case, bits=bits)
    x = torch.randn(m, case[1], generator=torch.Generator().manual_seed(bits)).to(dtype)
    assert select_kernel(mod, x).name == "cpu-int4"
    with torch.no_grad():
        got = mod(x)
        mod.kernel = "reference"
        want = mod(x)
    assert got.dtype == dtype and got.shape == want.shape == (m, case[0])
    assert rel_err(got, want) <= CPU_INT4_REL


def test_symmetric_eight_bit_offsets_are_exact():
    """Zero point 128 (symmetric 8-bit): the high plane's offset is 0 and its scale 16 s, exact in
    bf16, so the layout holds each scale as bf16(s) and nothing else is rounded."""
    mod = layer(40, 192, 64, False, bits=8)
    mod.qzeros = torch.full_like(mod.qzeros, 0x80808080 - (1 << 32))  # every 8-bit zero point 128
    w = mod.cpu_int4()
    s = mod.scales.to(torch.bfloat16)  # [G, N]
    hi, lo = w.scales_zeros[:3, :40], w.scales_zeros[3:, :40]  # [K/group, N, 2] per plane
    assert torch.equal(hi[..., 0], 16 * s) and torch.equal(hi[..., 1], torch.zeros_like(s))
    assert torch.equal(lo[..., 0], s) and torch.equal(lo[..., 1], 8 * s)


def test_unequal_groups_and_no_sub_group_have_no_layout():
    unequal = layer(16, 64, 32, False)
    unequal.g_idx = torch.tensor([0] * 20 + [1] * 44, dtype=torch.int32)  # a first group longer than the last
    assert unequal.cpu_int4() is None
    assert layer(16, 96, 48, False).cpu_int4() is None  # groups of 48: no sub-group of 32-256 divides them
    x = torch.randn(1, 64)
    assert select_kernel(unequal, x).name == "reference"


def test_auto_takes_it_on_cpu_for_fp32_and_bf16_only(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    mod = layer(64, 576, 128, False)
    for dtype in (torch.float32, torch.bfloat16):
        assert select_kernel(mod, torch.randn(1, 576, dtype=dtype)).name == "cpu-int4"
    # PyTorch's fp16 CPU kernel is not vectorized; fp16 inputs stay on the reference
    assert select_kernel(mod, torch.randn(1, 576, dtype=torch.float16)).name == "reference"
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(mod, torch.randn(1, 576)).name == "reference"


def test_a_gradient_to_record_goes_through_the_reference():
    mod = layer(64, 576, 128, False)
    x = torch.randn(3, 576, requires_grad=True)
    assert select_kernel(mod, x).name == "reference"
    mod(x).sum().backward()
    torch.testing.assert_close(x.grad, mod.dequantize().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert select_kernel(mod, x).name == "cpu-int4"


def test_layout_is_held_and_rebuilt_when_a_buffer_changes():
    mod = layer(64, 576, 128, False)
    x = torch.randn(2, 576)
    first = mod.cpu_int4()
    assert mod.cpu_int4() is first  # held
    with torch.no_grad():
        mod.scales.mul_(2)  # written in place
        assert mod.cpu_int4() is not first
        mod.kernel = "cpu-int4"
        got = mod(x)
        mod.kernel = "reference"
        want = mod(x)
    assert rel_err(got, want) <= CPU_INT4_REL
    check_layout_rebuilt(mod, mod.cpu_int4, "qweight")


def test_exact_kernels_pass_it_over_for_fp32_only():
    mod = layer(64, 576, 128, False)
    with exact_kernels():
        assert select_kernel(mod, torch.randn(1, 576)).name == "reference"
        assert select_kernel(mod, torch.randn(1, 576, dtype=torch.bfloat16)).name == "cpu-int4"
        assert select_kernel(mod, torch.randn(1, 576), "cpu-int4").name == "cpu-int4"  # named: still taken
    assert select_kernel(mod, torch.randn(1, 576)).name == "cpu-int4"


def test_calibration_runs_the_quantized_layers_at_the_models_precision(monkeypatch):
    """True-sequential GPTQ feeds later layers through the quantized earlier ones: on a CPU those
    run the fp32 reference (as with ``LOWBIT_KERNEL=reference``), not the bf16 int4 kernel."""
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    config = lowbit.GPTQConfig(bits=4, group_size=32)
    calib = calib_ids(4, 32)
    auto = lowbit.quantize(tiny_llama_model(), config, calib, progress=False)
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    exact = lowbit.quantize(tiny_llama_model(), config, calib, progress=False)
    monkeypatch.delenv("LOWBIT_KERNEL")
    ids = calib_ids(1, 8, seed=5)
    for name, m in auto.named_modules():
        if isinstance(m, IntGroupedLinear):
            assert torch.equal(m.qweight, exact.get_submodule(name).qweight), name
            # after calibration: the fast path
            assert select_kernel(m, torch.randn(1, m.in_features)).name == "cpu-int4"
    with torch.no_grad():
        assert rel_err(auto(ids).logits, exact(ids).logits) <= CPU_INT4_REL


def test_copies_and_pickles_of_a_module_leave_its_layouts_behind():
    mod = layer(64, 576, 128, False)
    x = torch.randn(2, 576)
    with torch.no_grad():
        want = mod(x)
    assert "cpu_int4" in mod._layouts
    for other in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert len(other._layouts) == 0
        with torch.no_grad():
            assert torch.equal(other(x), want)  # built again from the copy's own buffers
        assert other.cpu_int4() is not mod.cpu_int4()
    assert len(pickle.dumps(mod)) < len(pickle.dumps(mod.qweight)) + len(pickle.dumps(mod.scales)) + 64 * 1024


def test_compiled_before_any_eager_call_it_traces_the_reference():
    """The layout is built at the first eager forward; tracing cannot build it."""
    mod = layer(64, 576, 128, False)
    x = torch.randn(2, 576)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
        mod.kernel = "reference"
        want = mod(x)
        mod.kernel = "auto"
        assert torch.equal(got, want)
        assert "cpu_int4" not in mod._layouts
        eager = mod(x)  # builds it
        torch._dynamo.reset()
        assert torch.equal(torch.compile(mod, fullgraph=True, backend="aot_eager")(x), eager)
    assert rel_err(eager, want) <= CPU_INT4_REL and not torch.equal(eager, want)


def test_a_layout_built_under_inference_mode_serves_calls_outside_it():
    mod = layer(40, 192, 64, True)
    x = torch.randn(2, 192)
    with torch.inference_mode():
        inside = mod(x)
    assert mod.cpu_int4().packed.is_inference()
    with torch.no_grad():
        assert torch.equal(mod(x), inside)
    assert torch.equal(mod(x), inside)  # gradients on, none to record for x


@pytest.mark.parametrize("config", [lowbit.RtnConfig(bits=8, group_size=32),
                                    lowbit.BitsAndBytesConfig(load_in_4bit=True)], ids=["rtn-8bit", "nf4"])
def test_quantized_models_hold_their_layouts_before_the_first_forward(config, monkeypatch):
    """Built at the first forward, between its temporaries, the layouts kept the heap from
    shrinking (an 8-bit SmolLM2's evaluation peaked 450 MiB higher): lowbit builds them when it
    finishes a model, for the model's dtype, and only where ``auto`` would take the kernel."""
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    model = lowbit.quantize(tiny_llama_model(), config, progress=False)
    quantized = [m for m in model.modules() if hasattr(m, "cpu_int4")]
    assert len(quantized) == 14 and all("cpu_int4" in m._layouts for m in quantized)
    half = lowbit.quantize(tiny_llama_model().half(), config, progress=False)  # fp16 takes the reference
    assert not any(m._layouts for m in half.modules() if hasattr(m, "cpu_int4"))
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    forced = lowbit.quantize(tiny_llama_model(), config, progress=False)
    assert not any(m._layouts for m in forced.modules() if hasattr(m, "cpu_int4"))


def test_a_model_only_saved_holds_no_layouts(tmp_path, monkeypatch):
    """``prepare=False`` (``lowbit quantize`` and ``convert``, which only save) builds no layouts:
    the model's first forward does, with the prepared model's logits, and its checkpoint is the
    same bytes."""
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    config = lowbit.BitsAndBytesConfig(load_in_4bit=True)
    prepared = lowbit.quantize(tiny_llama_model(), config, progress=False)
    bare = lowbit.quantize(tiny_llama_model(), config, progress=False, prepare=False)
    quantized = [m for m in bare.modules() if hasattr(m, "cpu_int4")]
    assert len(quantized) == 14 and not any(m._layouts for m in quantized)
    lowbit.save_quantized(prepared, tmp_path / "prepared")
    lowbit.save_quantized(bare, tmp_path / "bare")
    files = sorted(p.name for p in (tmp_path / "prepared").iterdir())
    assert all((tmp_path / "prepared" / f).read_bytes() == (tmp_path / "bare" / f).read_bytes() for f in files)
    loaded = lowbit.from_pretrained(tmp_path / "bare", prepare=False)
    assert not any(m._layouts for m in loaded.modules() if hasattr(m, "cpu_int4"))
    ids = calib_ids(1, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(bare(ids).logits, prepared(ids).logits)
    assert all("cpu_int4" in m._layouts for m in quantized)
