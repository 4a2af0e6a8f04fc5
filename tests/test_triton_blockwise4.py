"""Triton NF4/FP4 kernels against the reference (interpreter on CPU; compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEQUANT_ATOL, MATMUL_REL, launch_keyword, rel_err
from lowbit.formats.blockwise4 import Blockwise4Linear
from lowbit.kernels import reference, select_kernel

pytest.importorskip("triton")
T = pytest.importorskip("lowbit.kernels.triton_blockwise4")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K, blocksize): odd N*K (a padded last byte), K not a multiple of the block (blocks
# straddle rows), blocks larger than a row, M on both sides of the tl.dot threshold; rows of whole
# blocks (K a multiple of the block: codes read a byte at a time, scale after the product)
SHAPES = [(1, 33, 71, 64), (3, 40, 96, 64), (16, 24, 100, 128), (127, 20, 64, 64), (2, 48, 80, 256),
          (1, 40, 192, 64), (4, 17, 256, 128), (16, 24, 256, 32), (1, 9, 512, 256)]
SHAPE_IDS = [f"M{m}-N{n}-K{k}-b{b}" for m, n, k, b in SHAPES]


def random_module(n, k, blocksize, quant_type, double_quant, seed, storage=torch.uint8, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    return Blockwise4Linear.from_linear(w, b, quant_type=quant_type, blocksize=blocksize,
                                        double_quant=double_quant, quant_storage=storage).to(DEVICE)


def args(m: Blockwise4Linear) -> tuple:
    return (m.weight, m.absmax, m.quant_map, m.blocksize, (m.out_features, m.in_features),
            m.nested_absmax, m.nested_quant_map, m.nested_offset)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", True)],
                         ids=["nf4", "nf4-dq", "fp4-dq"])
@pytest.mark.parametrize("m,n,k,bs", SHAPES, ids=SHAPE_IDS)
def test_matmul_matches_reference(m, n, k, bs, quant_type, double_quant, dtype):
    mod = random_module(n, k, bs, quant_type, double_quant, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)  # fp32: the kernel's error alone
    got = T.matmul_blockwise4(x, *args(mod), bias=mod.bias)
    assert got.dtype == dtype and got.shape == (m, n) and torch.isfinite(got).all()
    assert rel_err(got, want) <= MATMUL_REL[dtype]


@pytest.mark.parametrize("path", ["tiled", "dequantize"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_both_batch_paths_match_reference(path, dtype):
    mod = random_module(40, 128, 64, "nf4", True, seed=3)
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    got = T.matmul_blockwise4(x, *args(mod), bias=mod.bias, batch_path=path)
    assert got.dtype == dtype and got.shape == (2, 9, 40)
    assert rel_err(got, want) <= MATMUL_REL[dtype]


# rows of whole blocks for the tiles of y.T: odd N, blocks of 32, 64 and 256, a K split, nf4 and fp4
SWAP_SHAPES = [(16, 40, 128, 64, "nf4"), (20, 33, 512, 32, "nf4"), (33, 17, 768, 256, "fp4"), (64, 24, 2048, 64, "nf4")]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,bs,quant_type", SWAP_SHAPES, ids=[f"M{m}-N{n}-K{k}-b{b}-{q}"
                                                                  for m, n, k, b, q in SWAP_SHAPES])
def test_swapped_dot_tiles_match_reference(monkeypatch, m, n, k, bs, quant_type, double_quant, dtype):
    """``DOT_SWAP``'s tiles of ``y.T`` (off by default; the bench times them beside the default),
    the tiled path forced above 16 rows as the bench forces it."""
    monkeypatch.setattr(T, "DOT_SWAP", True)
    mod = random_module(n, k, bs, quant_type, double_quant, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    swapped = launch_keyword(monkeypatch, T, "SWAP")
    got = T.matmul_blockwise4(x, *args(mod), bias=mod.bias, batch_path="tiled")
    assert swapped == [True]
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got, want) <= MATMUL_REL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 33, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swapped_dot_tiles_at_model_size_on_gpu(monkeypatch, m, dtype):
    monkeypatch.setattr(T, "DOT_SWAP", True)
    mod = random_module(11008, 4096, 64, "nf4", True, seed=m)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    assert rel_err(T.matmul_blockwise4(x, *args(mod), bias=mod.bias, batch_path="tiled"), want) <= MATMUL_REL[dtype]


# the GEMV kernel, the tiled kernel on rows of whole blocks and on straddling blocks, tl.dot tiles
LOOKUP_SHAPES = [(1, 40, 192, 64), (3, 40, 96, 64), (1, 33, 71, 64), (16, 24, 256, 32)]


@pytest.mark.parametrize("m,n,k,bs", LOOKUP_SHAPES, ids=[f"M{m}-N{n}-K{k}-b{b}" for m, n, k, b in LOOKUP_SHAPES])
def test_every_table_lookup_gives_the_same_product(m, n, k, bs):
    mod = random_module(n, k, bs, "nf4", True, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.float16)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    got = {lookup: T.matmul_blockwise4(x, *args(mod), bias=mod.bias, batch_path="tiled", lookup=lookup)
           for lookup in T.LOOKUPS}
    assert rel_err(got["global"], want) <= MATMUL_REL[torch.float16]
    for lookup in got:  # the same table values, the same arithmetic
        assert torch.equal(got[lookup], got["global"]), lookup


def test_every_table_lookup_dequantizes_the_same():
    mod = random_module(33, 71, 64, "fp4", True, seed=5)
    want = T.dequantize_blockwise4(*args(mod), lookup="global")
    torch.testing.assert_close(want.float(), reference.dequantize_blockwise4(*args(mod)),
                               atol=DEQUANT_ATOL[torch.float16], rtol=DEQUANT_ATOL[torch.float16])
    for lookup in T.LOOKUPS:
        assert torch.equal(T.dequantize_blockwise4(*args(mod), lookup=lookup), want), lookup


# rows of one block, of several whole steps, of a partial last step (5 blocks of 64 in steps of
# 4), blocks of 32 (steps of 8) and 256 (steps of 1), a K split (long rows), double quant and not
GEMV_SHAPES = [(40, 64, 64), (33, 512, 64), (24, 320, 64), (17, 96, 32), (9, 768, 256), (20, 8192, 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("n,k,bs", GEMV_SHAPES, ids=[f"N{n}-K{k}-b{b}" for n, k, b in GEMV_SHAPES])
def test_gemv_matches_reference_with_either_lookup(n, k, bs, double_quant, dtype):
    mod = random_module(n, k, bs, "nf4", double_quant, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    got = {lookup: T.matmul_blockwise4(x, *args(mod), bias=mod.bias, lookup=lookup) for lookup in T.LOOKUPS}
    assert got["gather"].dtype == dtype and got["gather"].shape == (1, n) and torch.isfinite(got["gather"]).all()
    assert rel_err(got["gather"], want) <= MATMUL_REL[dtype]
    assert torch.equal(got["global"], got["gather"])  # the same table values, the same arithmetic


@pytest.mark.parametrize("step_bytes,warps", [(128, 8), (64, 4), (64, 8), (256, 8)])
@pytest.mark.parametrize("n,k,bs", [(33, 512, 64), (24, 320, 64), (9, 768, 256)], ids=["steps", "partial", "b256"])
def test_gemv_other_steps_and_warps_match_reference(monkeypatch, step_bytes, warps, n, k, bs):
    """The one-token kernel at the step sizes and warps ``bench/lookup.py`` times beside the default."""
    monkeypatch.setattr(T, "GEMV_STEP_BYTES", step_bytes)
    monkeypatch.setattr(T, "GEMV_WARPS", warps)
    mod = random_module(n, k, bs, "nf4", True, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, torch.float16)
    assert T._gemv_config(n, k, bs, x.device, T.gemv_step_blocks(bs)).num_warps == warps
    got = T.matmul_blockwise4(x, *args(mod), bias=mod.bias)
    assert rel_err(got, reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)) <= MATMUL_REL[torch.float16]


@pytest.mark.parametrize("blocksize,step", [(32, 8), (64, 4), (128, 2), (256, 1)])
def test_gemv_step_is_128_bytes_of_a_row(blocksize, step):
    assert T.gemv_step_blocks(blocksize) == step


@pytest.mark.parametrize("m,choice,msg", [
    (1, {"lookup": "texture"}, "lookup must be one of .*'global'.*, not 'texture'"),
    (16, {"batch_path": "dense"}, "batch_path must be 'tiled' or 'dequantize', not 'dense'"),
], ids=["lookup", "batch-path"])
def test_unknown_choice_is_an_error(m, choice, msg):
    mod = random_module(8, 64, 64, "nf4", False, seed=1)
    with pytest.raises(ValueError, match=msg):
        T.matmul_blockwise4(torch.randn(m, 64).to(DEVICE, torch.float16), *args(mod), **choice)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", False), ("nf4", True)],
                         ids=["nf4", "fp4", "nf4-dq"])
@pytest.mark.parametrize("n,k,bs", [(33, 71, 64), (24, 100, 128), (300, 40, 4096)], ids=["odd", "b128", "b4096"])
def test_dequantize_matches_reference(n, k, bs, quant_type, double_quant):
    mod = random_module(n, k, bs, quant_type, double_quant, seed=n)
    want = reference.dequantize_blockwise4(*args(mod))
    for dtype in (torch.float16, torch.bfloat16):
        got = T.dequantize_blockwise4(*args(mod), dtype=dtype)
        assert got.shape == (n, k)
        torch.testing.assert_close(got, want.to(dtype), atol=DEQUANT_ATOL[dtype], rtol=DEQUANT_ATOL[dtype])


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16-storage", "fp32-storage"])
def test_any_quant_storage(storage):
    mod = random_module(32, 64, 64, "nf4", True, seed=5, storage=storage)
    x = torch.randn(4, 64).to(DEVICE, torch.float16)
    want = reference.matmul_blockwise4(x.float(), *args(mod), bias=mod.bias)
    assert rel_err(T.matmul_blockwise4(x, *args(mod), bias=mod.bias), want) <= MATMUL_REL[torch.float16]


def test_compute_dtype_and_batched_input():
    from lowbit.formats.blockwise4 import _triton_forward

    mod = random_module(40, 96, 64, "nf4", False, seed=9)
    mod.compute_dtype = torch.bfloat16
    x = torch.randn(2, 5, 96).to(DEVICE, torch.float16)
    want = reference.matmul_blockwise4(x.bfloat16().float(), *args(mod), bias=mod.bias)
    got = _triton_forward(x, mod)
    assert got.dtype == torch.float16 and got.shape == (2, 5, 40)
    assert rel_err(got, want) <= MATMUL_REL[torch.bfloat16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU selection")
def test_cpu_and_fp32_compute_select_reference():
    mod = random_module(16, 64, 64, "nf4", False, seed=1)
    assert select_kernel(mod, torch.randn(2, 64, dtype=torch.float16)).name == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128])
def test_model_size_on_gpu(m):
    mod = random_module(4096, 4096, 64, "nf4", True, seed=m, bias=False)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    assert select_kernel(mod, x).name == "triton"
    want = reference.matmul_blockwise4(x.float(), *args(mod))
    assert rel_err(mod(x), want) <= MATMUL_REL[torch.float16]
