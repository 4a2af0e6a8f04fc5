"""The CPU kernel of NF4/FP4 weights at one row (``lowbit.kernels.cpu_blockwise4``: table lookups over
the weight's bytes) against the reference, and when ``kernel="auto"`` takes it."""

from __future__ import annotations

import pytest
import torch

from conftest import MATMUL_REL, input_grad, rel_err
from lowbit.formats.blockwise4 import Blockwise4Linear
from lowbit.kernels import cpu_blockwise4, exact_kernels, select_kernel

# (N, K, blocksize): blocks of 64 over SmolLM2's K = 576; one block per row; 32; 128 over an odd N
SHAPES = [(24, 576, 64), (40, 64, 64), (17, 64, 32), (33, 256, 128)]


def layer(n: int, k: int, blocksize: int, quant_type: str = "nf4", double_quant: bool = False, *,
          bias: bool = True, seed: int = 0, **kw) -> Blockwise4Linear:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) if bias else None
    return Blockwise4Linear.from_linear(torch.randn(n, k, generator=g) * 0.05, b, quant_type=quant_type,
                                        blocksize=blocksize, double_quant=double_quant, **kw)


def run(mod: Blockwise4Linear, x: torch.Tensor, kernel: str) -> torch.Tensor:
    mod.kernel = kernel
    with torch.no_grad():
        return mod(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}")
def test_matches_reference(case, quant_type, double_quant, dtype):
    mod = layer(*case, quant_type, double_quant)
    x = torch.randn(1, case[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    got, want = run(mod, x, "cpu-lookup"), run(mod, x, "reference")
    assert got.dtype == dtype and got.shape == want.shape == (1, case[0])
    assert rel_err(got, want) <= MATMUL_REL[dtype]


def test_compute_dtype_storage_and_three_dimensional_input():
    """A bf16 compute dtype (the reference computes in it; the tables in fp32), packed bytes stored
    as bf16, a [1, 1, K] input."""
    mod = layer(24, 576, 64, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    x = torch.randn(1, 1, 576)
    got, want = run(mod, x, "cpu-lookup"), run(mod, x, "reference")
    assert got.shape == (1, 1, 24) and got.dtype == torch.float32
    assert rel_err(got, want) <= MATMUL_REL[torch.bfloat16]
    fp32 = layer(24, 576, 64, quant_storage=torch.bfloat16)
    assert rel_err(run(fp32, x, "cpu-lookup"), run(fp32, x, "reference")) <= MATMUL_REL[torch.float32]


def test_gradient_reaches_the_input():
    mod = layer(24, 576, 64)
    x = torch.randn(1, 576, requires_grad=True)
    assert select_kernel(mod, x).name == "cpu-lookup"
    assert rel_err(input_grad(mod, x, "cpu-lookup"), input_grad(mod, x, "reference")) <= MATMUL_REL[torch.float32]


def test_auto_takes_it_at_one_row(monkeypatch):
    mod = layer(24, 576, 64)
    assert select_kernel(mod, torch.randn(1, 576)).name == "cpu-lookup"
    assert select_kernel(mod, torch.randn(1, 1, 576)).name == "cpu-lookup"
    rows = cpu_blockwise4.LUT_MAX_ROWS + 1
    assert select_kernel(mod, torch.randn(rows, 576)).name == "reference"
    assert select_kernel(layer(8, 96, 64), torch.randn(1, 96)).name == "reference"  # a block across rows
    with exact_kernels():  # fp32 throughout: nothing narrowed
        assert select_kernel(mod, torch.randn(1, 576)).name == "cpu-lookup"
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(mod, torch.randn(1, 576)).name == "reference"
