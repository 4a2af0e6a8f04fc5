"""Grouped-int, NF4/FP4 and AQLM weights at many rows on the CPU (``lowbit.kernels.cpu_dequant``):
the bf16 weight written a piece at a time equals the reference's dequantized weight rounded to bf16,
bit for bit; the product is the reference's up to bf16 rounding; ``kernel="auto"`` takes it from
``MIN_ROWS`` rows (AQLM: ``CODEBOOK_MIN_ROWS``) and not for what it cannot run."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import AQLM_SCHEMES, AQLM_SHAPES, CPU_INT4_REL, aqlm_layer, grouped_layer as grouped, rel_err
from lowbit.formats.blockwise4 import Blockwise4Linear
from lowbit.kernels import cpu_codebook, cpu_dequant, exact_kernels, reference, select_kernel

# (N, K, group_size, act_order): SmolLM2's K = 576 at group 128 (a shorter last group); one group
# per row; K not a multiple of 32 (a part word at 3 bits, a shorter last group); act-order
SHAPES = [(64, 576, 128, False), (48, 96, -1, False), (33, 100, 32, False), (40, 192, 64, True),
          (24, 70, 16, False)]


def blockwise(n: int, k: int, quant_type: str, double_quant: bool, blocksize: int = 64) -> Blockwise4Linear:
    g = torch.Generator().manual_seed(1)
    return Blockwise4Linear.from_linear(torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g),
                                        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


def ids(case) -> str:
    n, k, group, act = case
    return f"{n}x{k}-g{group}" + ("-act" if act else "")


@pytest.fixture(params=[1 << 20, 96], ids=["one-piece", "small-pieces"])
def piece(request, monkeypatch):
    """The step size: the default, and one so small that every weight here takes several steps (a
    last one shorter, a group cut by none: steps are whole groups)."""
    monkeypatch.setattr(cpu_dequant, "PIECE", request.param)
    return request.param


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_grouped_weight_is_the_reference_rounded_to_bf16(case, bits, piece):
    mod = grouped(*case, bits=bits)
    n, k = case[0], case[1]
    out = torch.full((k, n), float("nan"), dtype=torch.bfloat16)
    cpu_dequant.int_grouped_into(out, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits, mod.group_size)
    want = reference.dequantize_int_grouped(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits)  # [N, K] fp32
    assert torch.equal(out, want.t().to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
# whole blocks (what it takes), some of them across rows
@pytest.mark.parametrize("shape,blocksize", [((64, 576), 64), ((36, 80), 64), ((32, 100), 128)],
                         ids=["64x576", "36x80", "32x100-b128"])
def test_blockwise_weight_is_the_reference_rounded_to_bf16(shape, blocksize, quant_type, double_quant, piece):
    mod = blockwise(*shape, quant_type, double_quant, blocksize)
    out = torch.full((shape[0] * shape[1],), float("nan"), dtype=torch.bfloat16)
    absmax = reference.blockwise4_absmax(mod.absmax, mod.nested_absmax, mod.nested_quant_map, mod.nested_offset)
    cpu_dequant.blockwise4_into(out, mod.weight, absmax, mod.quant_map, blocksize)
    assert torch.equal(out.view(shape), mod.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_grouped_product_matches_reference(case, dtype):
    mod = grouped(*case)
    x = torch.randn(2, cpu_dequant.MIN_ROWS // 2 + 3, case[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        mod.kernel = "cpu-dequant"
        got = mod(x)
        mod.kernel = "reference"
        want = mod(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) < CPU_INT4_REL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blockwise_product_matches_reference(quant_type, dtype):
    mod = blockwise(40, 192, quant_type, True)
    x = torch.randn(cpu_dequant.MIN_ROWS, 192, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        mod.kernel = "cpu-dequant"
        got = mod(x)
        mod.kernel = "reference"
        want = mod(x)
    assert got.dtype == dtype
    assert rel_err(got, want) < CPU_INT4_REL


def test_auto_takes_it_from_min_rows_only():
    mod = grouped(64, 576, 128, False)
    many = torch.randn(cpu_dequant.MIN_ROWS, 576)
    few = torch.randn(cpu_dequant.MIN_ROWS - 1, 576)
    with torch.no_grad():
        assert select_kernel(mod, many).name == "cpu-dequant"
        assert select_kernel(mod, few).name != "cpu-dequant"
        assert select_kernel(mod, many.half()).name != "cpu-dequant"  # no vectorized fp16 product here
        with exact_kernels():  # it rounds fp32 to bf16: calibration passes over it
            assert select_kernel(mod, many).name == "reference"
            assert select_kernel(mod, many.bfloat16()).name == "cpu-dequant"
        with pytest.raises(ValueError, match="does not support"):
            select_kernel(mod, few, "cpu-dequant")
    assert select_kernel(mod, many.requires_grad_()).name == "reference"  # no backward here


@pytest.mark.parametrize("make,min_rows", [
    (lambda: grouped(64, 576, 128, False), cpu_dequant.MIN_ROWS),
    (lambda: grouped(64, 576, 128, False, bits=3), cpu_dequant.MIN_ROWS),
    (lambda: grouped(64, 576, 128, False, bits=8), cpu_dequant.PLANES_MIN_ROWS),  # two planes in cpu-int4
    (lambda: blockwise(40, 192, "nf4", True), cpu_dequant.PLANES_MIN_ROWS),
], ids=["4-bit", "3-bit", "8-bit", "nf4"])
def test_auto_threshold_by_format(make, min_rows):
    mod = make()
    assert cpu_dequant.PLANES_MIN_ROWS < cpu_dequant.MIN_ROWS
    with torch.no_grad():
        assert select_kernel(mod, torch.randn(min_rows, mod.in_features)).name == "cpu-dequant"
        assert select_kernel(mod, torch.randn(min_rows - 1, mod.in_features)).name == "cpu-int4"


def test_blockwise_auto_needs_whole_blocks():
    with torch.no_grad():
        assert select_kernel(blockwise(40, 192, "nf4", False), torch.randn(200, 192)).name == "cpu-dequant"
        odd = blockwise(3, 50, "nf4", False)  # 150 weights: two blocks and part of a third
        assert select_kernel(odd, torch.randn(200, 50)).name != "cpu-dequant"


@pytest.mark.parametrize("scheme", AQLM_SCHEMES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("shape", AQLM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-ig{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["to-bf16", "to-fp32", "to-fp16"])
def test_codebook_weight_is_the_reference_rounded(shape, scheme, dtype, out_dtype, piece):
    """Rounded once from the reference's fp32 weight, in fp32 the weight itself (what cpu-codebook
    multiplies with, through the same function)."""
    mod = aqlm_layer(*shape, *scheme, dtype=dtype)  # the codebooks' and scales' dtype
    out = torch.full((shape[0] * shape[1],), float("nan"), dtype=out_dtype)
    cpu_dequant.codebook_into(out, mod.codes, mod.codebooks, mod.scales)
    assert torch.equal(out.view(shape[:2]), mod.dequantize().to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", [(2, 8), (1, 16)], ids=["2x8", "1x16"])
def test_codebook_product_matches_reference(scheme, dtype):
    mod = aqlm_layer(40, 96, 8, *scheme)
    x = torch.randn(3, cpu_dequant.CODEBOOK_MIN_ROWS, 96, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        mod.kernel = "cpu-dequant"
        got = mod(x)
        mod.kernel = "reference"
        want = mod(x)
    assert got.dtype == dtype and got.shape == want.shape == (3, cpu_dequant.CODEBOOK_MIN_ROWS, 40)
    assert rel_err(got, want) < CPU_INT4_REL


def test_codebook_auto_takes_it_above_the_lookup_tables():
    mod = aqlm_layer(40, 96, 8, 2, 8)
    assert cpu_dequant.CODEBOOK_MIN_ROWS == cpu_codebook.LUT_MAX_ROWS + 1  # where the tables stop
    many = torch.randn(cpu_dequant.CODEBOOK_MIN_ROWS, 96)
    few = torch.randn(cpu_dequant.CODEBOOK_MIN_ROWS - 1, 96)
    with torch.no_grad():
        assert select_kernel(mod, many).name == "cpu-dequant"
        assert select_kernel(mod, many.bfloat16()).name == "cpu-dequant"
        assert select_kernel(mod, few).name == "cpu-codebook"  # table lookups
        assert select_kernel(mod, many.half()).name == "cpu-codebook"
        assert select_kernel(aqlm_layer(40, 96, 8, 2, 8, og=2), many).name == "reference"  # two outputs a group
        with exact_kernels():  # fp32 rounded to bf16: calibration and fine-tuning pass over it
            assert select_kernel(mod, many).name == "cpu-codebook"
            assert select_kernel(mod, many.bfloat16()).name == "cpu-dequant"
    assert select_kernel(mod, many.requires_grad_()).name == "cpu-codebook"  # no backward here


def test_workspace_is_reused_and_grows():
    small = cpu_dequant.workspace(10)
    assert cpu_dequant.workspace(5).data_ptr() == small.data_ptr()  # the same buffer, not a new one
    large = cpu_dequant.workspace(1 << 16)
    assert large.numel() == 1 << 16 and large.dtype == torch.bfloat16
    assert cpu_dequant.workspace(10).data_ptr() == large.data_ptr()
    assert cpu_dequant.workspace(8, torch.int32, "piece").dtype == torch.int32


def test_workspace_made_in_inference_mode_is_written_outside_it():
    mod = grouped(64, 576, 128, False)
    x = torch.randn(cpu_dequant.MIN_ROWS, 576)
    with torch.no_grad():
        want = reference.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4, mod.bias)

    def run() -> list[float]:
        cpu_dequant._local.__dict__.pop("bufs", None)  # this thread's buffers, made anew below
        with torch.inference_mode():
            first = mod(x)
        with torch.no_grad():
            return [rel_err(first, want), rel_err(mod(x), want)]

    errors = []
    t = threading.Thread(target=lambda: errors.extend(run()))  # (its own buffers: none of this thread's are dropped)
    t.start()
    t.join()
    assert len(errors) == 2 and max(errors) < CPU_INT4_REL


def test_layers_of_different_shapes_in_turn_and_in_threads():
    """The workspace holds one weight at a time: each call writes the whole of what it reads, and
    each thread has its own."""
    mods = [grouped(64, 576, 128, False), grouped(33, 100, 32, False, bits=3), grouped(40, 192, 64, True, bits=8)]
    xs = [torch.randn(cpu_dequant.MIN_ROWS + 5, m.in_features, generator=torch.Generator().manual_seed(i))
          for i, m in enumerate(mods)]
    with torch.no_grad():
        want = [reference.matmul_int_grouped(x, m.qweight, m.scales, m.qzeros, m.g_idx, m.bits, m.bias)
                for m, x in zip(mods, xs)]
        for _ in range(2):
            for m, x, w in zip(mods, xs, want):
                assert rel_err(m(x), w) < CPU_INT4_REL
    errors = {}

    def run(i: int) -> None:
        with torch.no_grad():
            errors[i] = max(rel_err(mods[i](xs[i]), want[i]) for _ in range(20))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mods))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(errors) == [0, 1, 2] and max(errors.values()) < CPU_INT4_REL
