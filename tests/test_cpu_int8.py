"""The CPU kernel of LLM.int8 weights (``lowbit.kernels.cpu_int8``: PyTorch's ``_weight_int8pack_mm``)
against the reference, its integer product's rounding, and when ``kernel="auto"`` takes it."""

from __future__ import annotations

import pytest
import torch

import lowbit
from conftest import CPU_INT8_REL, rel_err, tiny_llama_model
from lowbit.checkpoint.safetensors_io import ALIGN, load_state_dict
from lowbit.formats.base import modules_of, prepare_model
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.kernels import cpu_int8, exact_kernels, select_kernel

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="this PyTorch has no CPU int8-weight kernel")

# (N, K): SmolLM2's 576 inputs; N odd; a long K; the smallest K taken
SHAPES = [(64, 576), (17, 96), (250, 64), (40, 1536), (5, 32)]


def layer(n: int, k: int, *, threshold: float = 3.0, int8_activations: bool = True, bias: bool = True,
          seed: int = 0) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return Int8Linear.from_linear(w, b, threshold=threshold, int8_activations=int8_activations)


def run(mod: Int8Linear, x: torch.Tensor, kernel: str) -> torch.Tensor:
    mod.kernel = kernel
    with torch.no_grad():
        return mod(x)


@pytest.mark.parametrize("m", [1, 3, 16, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["int8", "int8-no-outliers", "weight-only"])
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_matches_reference(case, mode, dtype, m):
    n, k = case
    mod = layer(n, k, threshold=0.0 if mode == "int8-no-outliers" else 3.0, int8_activations=mode != "weight-only")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[:, 1] = 4.0  # an outlier column (|x| >= 3) at every M
    x = x.to(dtype)
    got, want = run(mod, x, "cpu-int8"), run(mod, x, "reference")
    assert got.dtype == dtype and got.shape == want.shape == (m, n)
    assert rel_err(got, want) <= CPU_INT8_REL


@pytest.mark.parametrize("k", [32, 576, 4096])
def test_integer_product_is_the_sum_rounded_to_bf16(k):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (7, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (33, k), generator=g, dtype=torch.int8)
    exact = (a.long() @ b.long().t()).double()  # [7, 33]
    got = cpu_int8.int8_product(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(got, got.bfloat16().float())  # a bf16 value
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0**-8).all()  # half a bf16 step at most
    assert rel_err(got, exact) <= 2.0**-8


def test_three_dimensional_input_and_bias():
    mod = layer(48, 576)
    x = torch.randn(2, 5, 576)
    got, want = run(mod, x, "cpu-int8"), run(mod, x, "reference")
    assert got.shape == (2, 5, 48)
    assert rel_err(got, want) <= CPU_INT8_REL
    mod.bias = None
    assert rel_err(run(mod, x, "cpu-int8"), run(mod, x, "reference")) <= CPU_INT8_REL


def test_auto_takes_it_on_the_cpu(monkeypatch):
    x = torch.randn(3, 576)
    assert select_kernel(layer(16, 576), x).name == "cpu-int8"
    assert select_kernel(layer(16, 576, int8_activations=False), x).name == "cpu-int8"
    assert select_kernel(layer(16, 40), torch.randn(3, 40)).name == "reference"  # K not a multiple of 32
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(layer(16, 576), x).name == "reference"


def test_named_on_an_unsupported_shape_raises():
    mod = layer(16, 40)
    mod.kernel = "cpu-int8"
    with pytest.raises(ValueError, match="does not support this input"):
        mod(torch.randn(3, 40))


def test_exact_kernels_keeps_fp32_on_the_reference():
    mod = layer(16, 576)
    with exact_kernels():
        assert select_kernel(mod, torch.randn(2, 576)).name == "reference"
        assert select_kernel(mod, torch.randn(2, 576, dtype=torch.float16)).name == "reference"
        assert select_kernel(mod, torch.randn(2, 576, dtype=torch.bfloat16)).name == "cpu-int8"


def test_gradients():
    """LLM.int8 keeps its backward (the product with the dequantized weight) through the kernel;
    weight-only, which has none there, goes through the reference when a gradient is recorded."""
    mod = layer(24, 96)
    x = torch.randn(4, 96, requires_grad=True)
    assert select_kernel(mod, x).name == "cpu-int8"
    y = mod(x)
    y.sum().backward()
    got = x.grad.clone()
    x.grad = None
    mod.kernel = "reference"
    want = mod(x)
    want.sum().backward()
    assert torch.allclose(got, x.grad)
    assert rel_err(y.detach(), want.detach()) <= CPU_INT8_REL
    assert select_kernel(layer(24, 96, int8_activations=False), x).name == "reference"
    with torch.no_grad():
        assert select_kernel(layer(24, 96, int8_activations=False), x).name == "cpu-int8"


def test_a_misaligned_weight_goes_through_the_reference():
    """PyTorch's kernel loads weight rows with aligned vector loads (a misaligned one crashes the
    process): a weight 8 bytes off, or with K not a multiple of 16, is left to the reference."""
    mod = layer(16, 64)
    buf = torch.empty(mod.weight.numel() + 8, dtype=torch.int8)
    assert buf.data_ptr() % cpu_int8.WEIGHT_ALIGN == 0
    mod.weight = buf[8:].view(16, 64).copy_(mod.weight)
    x = torch.randn(3, 64)
    assert not cpu_int8.weight_supported(mod.weight)
    assert select_kernel(mod, x).name == "reference"
    assert not cpu_int8.weight_supported(torch.zeros(4, 24, dtype=torch.int8))
    assert not cpu_int8.weight_supported(torch.zeros(64, 32, dtype=torch.int8).t())


def test_prepare_gives_a_misaligned_or_strided_weight_a_copy_the_kernel_reads():
    """After a model load (``prepare_model``), a weight the kernel could not read only for its
    memory gets an aligned contiguous copy; one it cannot read for its shape is left alone."""
    mod = layer(16, 64)
    want = mod.weight.clone()
    buf = torch.empty(mod.weight.numel() + 8, dtype=torch.int8)
    mod.weight = buf[8:].view(16, 64).copy_(want)  # 8 bytes off
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = mod(x)
    prepare_model(torch.nn.Sequential(mod))
    assert torch.equal(mod.weight, want) and cpu_int8.weight_supported(mod.weight)
    assert select_kernel(mod, x).name == "cpu-int8"
    with torch.no_grad():
        assert rel_err(mod(x), before) <= CPU_INT8_REL
    strided = layer(16, 64)
    strided.weight = strided.weight.t().contiguous().t()  # the same values, column-major
    strided.prepare()
    assert strided.weight.is_contiguous() and select_kernel(strided, x).name == "cpu-int8"
    odd = layer(16, 24)  # K = 24: not a multiple of 16, whatever its memory
    kept = odd.weight
    odd.prepare()
    assert odd.weight is kept


def test_inputs_are_passed_aligned():
    x = torch.randn(3 * 64 + 1, dtype=torch.bfloat16)[1:].view(3, 64)  # 2 bytes off
    got = cpu_int8._aligned(x)
    assert got.data_ptr() % cpu_int8.INPUT_ALIGN == 0 and torch.equal(got, x)
    mod = layer(16, 64, int8_activations=False)
    assert rel_err(run(mod, x, "cpu-int8"), run(mod, x, "reference")) <= CPU_INT8_REL


def test_a_loaded_checkpoint_takes_the_kernel(tmp_path):
    """safetensors returns tensors 8 bytes off a 64-byte boundary; the loader realigns them."""
    cfg = lowbit.BitsAndBytesConfig(load_in_8bit=True)
    lowbit.save_quantized(lowbit.quantize(tiny_llama_model(), cfg), tmp_path / "q")
    tensors = load_state_dict(tmp_path / "q")
    assert all(t.data_ptr() % ALIGN == 0 for t in tensors.values())
    loaded = lowbit.from_pretrained(tmp_path / "q")
    layers = modules_of(loaded, Int8Linear)
    x = torch.randn(2, 64)
    assert layers and all(select_kernel(m, torch.randn(2, m.in_features)).name == "cpu-int8" for m in layers.values())
    up = loaded.model.layers[0].mlp.up_proj
    assert rel_err(run(up, x, "cpu-int8"), run(up, x, "reference")) <= CPU_INT8_REL
