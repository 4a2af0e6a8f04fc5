"""The CPU kernel of AQLM weights (``lowbit.kernels.cpu_codebook``: table lookups, a faster
dequantize) against the reference, and when ``kernel="auto"`` takes it."""

from __future__ import annotations

import pytest
import torch

from conftest import AQLM_SCHEMES, AQLM_SHAPES, MATMUL_REL, aqlm_layer as layer, input_grad, rel_err
from lowbit.formats.codebook import AqlmLinear
from lowbit.kernels import cpu_codebook, exact_kernels, reference, select_kernel


def run(mod: AqlmLinear, x: torch.Tensor, kernel: str) -> torch.Tensor:
    mod.kernel = kernel
    with torch.no_grad():
        return mod(x)


@pytest.mark.parametrize("scheme", AQLM_SCHEMES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("shape", AQLM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-ig{s[2]}")
def test_dequantize_equals_the_reference(shape, scheme):
    mod = layer(*shape, *scheme)
    assert torch.equal(cpu_codebook.dequantize_codebook(mod.codes, mod.codebooks, mod.scales), mod.dequantize())


@pytest.mark.parametrize("m", [1, 3, 16])  # tables up to LUT_MAX_ROWS, the dequantizing path above
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("scheme", AQLM_SCHEMES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("shape", AQLM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-ig{s[2]}")
def test_matches_reference(shape, scheme, dtype, m):
    mod = layer(*shape, *scheme)
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    got, want = run(mod, x, "cpu-codebook"), run(mod, x, "reference")
    assert got.dtype == dtype and got.shape == want.shape == (m, shape[0])
    assert rel_err(got, want) <= MATMUL_REL[dtype]


@pytest.mark.parametrize("m", [1, 3, cpu_codebook.LUT_MAX_ROWS])
def test_lookup_tables_match_the_dequantized_product(m):
    """The tables' product against the dequantized weight's in fp64: fp32 rounding apart."""
    mod = layer(40, 96, 8, 2, 8, bias=False, dtype=torch.float32)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(3))
    assert cpu_codebook.lut_applies(m, mod.codebooks)
    assert not cpu_codebook.lut_applies(cpu_codebook.LUT_MAX_ROWS + 1, mod.codebooks)
    got = cpu_codebook.lut_product(x, mod.codes, mod.codebooks, mod.scales)
    want = x.double() @ reference.dequantize_codebook(mod.codes, mod.codebooks, mod.scales).double().t()
    assert rel_err(got, want) <= MATMUL_REL[torch.float32]
    assert not cpu_codebook.lut_applies(1, layer(40, 96, 8, 1, 16).codebooks)  # 2**16 entries: no tables


def test_three_dimensional_input_and_gradient():
    mod = layer(40, 96, 8, 2, 8)
    for shape in [(1, 1, 96), (2, 5 + cpu_codebook.LUT_MAX_ROWS, 96)]:  # tables (one row) and the dequantizing path
        x = torch.randn(*shape, requires_grad=True)
        assert select_kernel(mod, x).name == "cpu-codebook"
        assert rel_err(input_grad(mod, x, "cpu-codebook"), input_grad(mod, x, "reference")) <= MATMUL_REL[torch.float32]


def test_auto_takes_it_on_the_cpu(monkeypatch):
    x = torch.randn(3, 96)
    assert select_kernel(layer(40, 96, 8, 2, 8), x).name == "cpu-codebook"
    with exact_kernels():  # fp32 throughout: nothing narrowed
        assert select_kernel(layer(40, 96, 8, 2, 8), x).name == "cpu-codebook"
    assert select_kernel(layer(40, 96, 8, 2, 8, og=2), x).name == "reference"  # two outputs per group
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(layer(40, 96, 8, 2, 8), x).name == "reference"


def test_a_weight_kept_for_the_backward_is_not_the_held_buffer():
    """With a gradient to record, the dequantized weight is a new tensor: a later call of another
    layer, which writes the held buffer, leaves the weight the backward reads alone."""
    mod, other = layer(40, 96, 8, 1, 16), layer(40, 96, 8, 1, 16, seed=1)
    mod.kernel = other.kernel = "cpu-codebook"
    x = torch.randn(2, 96, requires_grad=True)
    y = mod(x)  # 1x16 at 2 rows: the dequantizing path
    with torch.no_grad():
        other(torch.randn(2, 96))
    y.sum().backward()
    want = mod.dequantize().sum(0).expand(2, 96)  # d(sum of x W^T)/dx
    assert rel_err(x.grad, want) <= MATMUL_REL[torch.float32]
