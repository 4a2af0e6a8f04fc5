"""NF4/FP4 weights on the CPU as two planes of 4-bit codes through PyTorch's int4 kernel
(``lowbit.kernels.cpu_blockwise4``): the code-table fit, the layout's codes, outputs against the
reference, and when ``kernel="auto"`` takes it."""

from __future__ import annotations

import pytest
import torch

from conftest import CPU_INT4_REL, check_layout_rebuilt, input_grad, rel_err
from lowbit.formats.blockwise4 import Blockwise4Linear, code_table
from lowbit.formats.packing import unpack_nibbles
from lowbit.kernels import cpu_blockwise4, cpu_dequant, cpu_int4, exact_kernels, select_kernel

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="this PyTorch has no CPU int4 kernel")

# (N, K, blocksize): blocks of 64 over SmolLM2's K = 576; one block per row; blocks across rows
# (K = 96: sub-groups of 32); N not a multiple of 16; one block over the whole weight
SHAPES = [(24, 576, 64), (40, 64, 64), (8, 96, 64), (33, 256, 128), (100, 96, 4096)]


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


def ids(case) -> str:
    return f"{case[0]}x{case[1]}-b{case[2]}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_fit_is_within_its_tolerance(quant_type):
    table = code_table(quant_type).double()
    a, b, c0, i, j = cpu_blockwise4.two_plane_fit(code_table(quant_type))
    fitted = a * i.double() + b * j.double() + c0  # [16]
    assert i.min() >= 0 and j.min() >= 0 and i.max() <= 15 and j.max() <= 15
    err = (fitted - table).abs().max().item()
    assert 0 < err <= cpu_blockwise4.FIT_TOLERANCE
    # every code keeps its own value: the fitted values are in the table's order, none shared
    assert torch.equal(fitted.argsort(), table.argsort())


def test_any_table_is_fitted_or_left_to_the_reference(monkeypatch):
    """A table of random values is fitted as closely as NF4's; one held to a tolerance no fit
    meets has no layout, and its layer takes the reference."""
    mod = layer(24, 576, 64)
    mod.quant_map = torch.rand(16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a, b, c0, i, j = cpu_blockwise4.two_plane_fit(mod.quant_map)
    assert (a * i + b * j + c0 - mod.quant_map.double()).abs().max() <= cpu_blockwise4.FIT_TOLERANCE
    x = torch.randn(2, 576)
    assert select_kernel(mod, x).name == "cpu-int4"
    assert rel_err(run(mod, x, "auto"), run(mod, x, "reference")) <= CPU_INT4_REL
    assert cpu_blockwise4.two_plane_fit(mod.quant_map, tolerance=1e-5) is None
    monkeypatch.setattr(cpu_blockwise4, "FIT_TOLERANCE", 1e-5)
    mod.quant_map = mod.quant_map.clone()  # a new buffer: the layout is built again
    assert mod.cpu_int4() is None
    assert select_kernel(mod, x).name == "reference"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_the_layout_holds_every_code(case, quant_type):
    """With every absmax 1 the identity through the kernel reads back each weight's fitted value
    (to bf16, the kernel's output type); the nearest fitted value is that of the weight's own code
    (or of its twin: FP4 has +0 and -0)."""
    n, k, blocksize = case
    mod = layer(*case, quant_type, bias=False)
    mod.absmax = torch.ones_like(mod.absmax)
    a, b, c0, i, j = cpu_blockwise4.two_plane_fit(mod.quant_map)
    fitted = (a * i.double() + b * j.double() + c0).float()  # [16]
    with torch.no_grad():
        got = cpu_int4.matmul_cpu_int4(torch.eye(k), mod.cpu_int4()).t()  # [N, K]
    codes = unpack_nibbles(mod.weight, n * k).view(n, k)
    assert (got - fitted[codes]).abs().max() <= 2**-8
    nearest = (got[..., None] - fitted).abs().argmin(dim=-1)  # [N, K]
    assert torch.equal(mod.quant_map[nearest], mod.quant_map[codes])


@pytest.mark.parametrize("m", [1, 3, 16, cpu_dequant.PLANES_MIN_ROWS - 1])  # more rows take cpu-dequant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_matches_reference(case, quant_type, double_quant, dtype, m):
    mod = layer(*case, quant_type, double_quant)
    x = torch.randn(m, case[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    assert select_kernel(mod, x).name == "cpu-int4"
    got, want = run(mod, x, "auto"), run(mod, x, "reference")
    assert got.dtype == dtype and got.shape == want.shape == (m, case[0])
    assert rel_err(got, want) <= CPU_INT4_REL


def test_compute_dtype_storage_and_three_dimensional_input():
    """A bf16 compute dtype, packed bytes stored as bf16, a [2, 3, K] input."""
    mod = layer(24, 576, 64, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    x = torch.randn(2, 3, 576)
    assert select_kernel(mod, x).name == "cpu-int4"
    got, want = run(mod, x, "auto"), run(mod, x, "reference")
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert rel_err(got, want) <= CPU_INT4_REL


def test_auto_takes_it_for_fp32_and_bf16_only(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    mod = layer(24, 576, 64)
    for dtype in (torch.float32, torch.bfloat16):
        assert select_kernel(mod, torch.randn(4, 576, dtype=dtype)).name == "cpu-int4"
    # PyTorch's fp16 CPU kernel is not vectorized; an fp16 input or compute dtype stays on the reference
    assert select_kernel(mod, torch.randn(1, 576, dtype=torch.float16)).name == "reference"
    assert select_kernel(layer(24, 576, 64, compute_dtype=torch.float16), torch.randn(1, 576)).name == "reference"
    assert select_kernel(layer(24, 80, 64), torch.randn(1, 80)).name == "reference"  # K = 80: no sub-group
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(mod, torch.randn(1, 576)).name == "reference"


def test_exact_kernels_pass_it_over():
    """The code values are fitted: calibration takes the reference whatever the dtype."""
    mod = layer(24, 576, 64)
    with exact_kernels():
        for dtype in (torch.float32, torch.bfloat16):
            assert select_kernel(mod, torch.randn(1, 576, dtype=dtype)).name == "reference"


def test_a_gradient_to_record_goes_through_the_reference():
    mod = layer(24, 576, 64)
    x = torch.randn(3, 576, requires_grad=True)
    assert select_kernel(mod, x).name == "reference"
    want = input_grad(mod, x, "reference")
    assert torch.equal(input_grad(mod, x, "auto"), want)
    with torch.no_grad():
        assert select_kernel(mod, x).name == "cpu-int4"


def test_layout_is_held_and_rebuilt_when_a_buffer_changes():
    mod = layer(24, 576, 64, double_quant=True)
    x = torch.randn(2, 576)
    first = mod.cpu_int4()
    assert mod.cpu_int4() is first  # held
    with torch.no_grad():
        mod.nested_absmax.mul_(2)  # written in place
        assert mod.cpu_int4() is not first
        assert rel_err(run(mod, x, "auto"), run(mod, x, "reference")) <= CPU_INT4_REL
    check_layout_rebuilt(mod, mod.cpu_int4, "weight")
