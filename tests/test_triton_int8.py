"""Triton LLM.int8 kernel against the reference (interpreter on CPU; compiled on a GPU).

fp32 inputs show the integer part exact (the same int8 codes and int32 sums as the reference:
only the fp32 scaling and outlier sums differ, in their order); fp16 and bf16 inputs are held to
the fused-matmul tolerance of the table in conftest.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import DEQUANT_ATOL, MATMUL_REL, rel_err
from lowbit.formats.int8_outlier import Int8Linear, quantize_rows
import lowbit.kernels as K
from lowbit.kernels import reference, select_kernel

pytest.importorskip("triton")
T = pytest.importorskip("lowbit.kernels.triton_int8")
A = pytest.importorskip("lowbit.kernels.triton_int8_activations")
C = pytest.importorskip("lowbit.kernels.triton_common")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_REL = 1e-6  # the reference in fp32: the same integer sums, fp32 scaling in another order
# compiled, tl.dot tiles (16 rows and more) multiply fp32 outlier columns in tf32 (10-bit
# mantissa): the weight's dequantized values round there, so the outlier sums are off by ~1e-4
# of themselves (seen on the H100: 2e-5 of the whole output)
TF32_REL = 1e-4

# (M, N, K, threshold): one token (vector-unit products) and tl.dot tiles (16 rows and more), K
# not a multiple of the tile, K under one tile, no outlier threshold; thresholds that bf16 holds
# exactly (the planted outliers equal them: the comparison is ">=")
SHAPES = [(1, 33, 71, 6.0), (3, 40, 96, 2.0), (16, 24, 100, 2.5), (127, 20, 64, 3.0), (1, 9, 512, 0.0),
          (5, 17, 300, 2.75), (17, 8, 40, 0.0), (2, 64, 257, 3.25)]
SHAPE_IDS = [f"M{m}-N{n}-K{k}-t{t:g}" for m, n, k, t in SHAPES]


def random_case(m, n, k, seed, threshold=0.0):
    """Codes and scales of a random weight, a bias, and ``x [m, k]`` under 2 in magnitude; with a
    threshold, row 0 holds it in columns 1 and ``k - 2`` (the first and the last K tile of 128,
    where K spans three: the middle one has no outlier)."""
    gen = torch.Generator().manual_seed(seed)
    cb, scb = quantize_rows(torch.randn(n, k, generator=gen).half())
    x = torch.randn(m, k, generator=gen).clamp(-1.9, 1.9)
    if threshold:
        x[0, [1, k - 2]] = torch.tensor([threshold, -threshold])
    b = torch.randn(n, generator=gen)
    return x.to(DEVICE), cb.to(DEVICE), scb.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,threshold", SHAPES, ids=SHAPE_IDS)
def test_matmul_matches_reference(m, n, k, threshold, dtype):
    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 outlier products run in tf32 on a GPU")
    x, cb, scb, b = random_case(m, n, k, seed=m * k + n, threshold=threshold)
    x = x.to(dtype)
    outliers = A.activation_stats(x, threshold)[0]  # uint8 [K], None without a threshold
    assert outliers is None if not threshold else outliers.nonzero().flatten().tolist() == [1, k - 2]
    want = reference.matmul_int8_outlier(x.float(), cb, scb, threshold, b)  # fp32: the kernel's error alone
    got = T.matmul_int8_outlier(x, cb, scb, threshold, b)
    assert got.dtype == dtype and got.shape == (m, n) and torch.isfinite(got).all()
    assert rel_err(got, want) <= (FP32_REL if dtype == torch.float32 else MATMUL_REL[dtype])


@pytest.mark.parametrize("threshold", [0.0, 2.5])
@pytest.mark.parametrize("m,k", [(1, 71), (5, 1100), (16, 512), (17, 300), (40, 96)])
def test_activation_statistics(m, k, threshold):
    """The outlier columns and each row's absmax over the others, from the statistics kernel (up
    to 16 rows, partials over blocks of columns) and from PyTorch (more rows), as the reference
    finds them."""
    x = random_case(m, 8, k, seed=m + k, threshold=threshold)[0].half()
    outliers, part = A.activation_stats(x, threshold)
    xa = x.float().abs()
    want_outliers = (xa >= threshold).any(0) if threshold else torch.zeros(k, dtype=torch.bool, device=x.device)
    if threshold:
        assert torch.equal(outliers.bool(), want_outliers) and want_outliers.sum() == 2
    else:
        assert outliers is None
    assert part.shape == ((-(-k // A.STATS_BLOCK_K) if m <= A.STATS_ROWS else 1), m)
    assert torch.equal(part.amax(0), xa.masked_fill(want_outliers, 0).amax(1))


@pytest.mark.parametrize("block_m,split_k", [(1, 4), (4, 2), (16, 3), (32, 1)])
def test_every_tile_and_split_gives_the_reference(block_m, split_k):
    """Launch configurations the heuristic picks on a GPU (split-K for few rows, tl.dot tiles),
    forced on a small problem."""
    x, cb, scb, b = random_case(20, 40, 700, seed=block_m + split_k, threshold=3.0)
    want = reference.matmul_int8_outlier(x, cb, scb, 3.0, b)
    cfg = C.MatmulConfig(block_m, 32, 64, split_k, 4, 2)
    got = T.matmul_int8_outlier(x, cb, scb, 3.0, b, cfg=cfg)
    assert rel_err(got, want) <= (TF32_REL if DEVICE == "cuda" and block_m >= 16 else FP32_REL)


def test_wide_tiles_give_the_reference():
    """The 128x128 tiles, 8 warps, that prequantized launches of many rows take on CUDA, on a
    problem smaller than one tile in M and N and two tiles in K."""
    x, cb, scb, b = random_case(40, 50, 200, seed=7, threshold=3.0)
    x = x.half()
    got = T.matmul_int8_outlier(x, cb, scb, 3.0, b, cfg=T.WIDE_TILES, prequantize=True)
    assert rel_err(got, reference.matmul_int8_outlier(x.float(), cb, scb, 3.0, b)) <= MATMUL_REL[torch.float16]


def test_wide_tiles_only_for_prequantized_launches_of_many_rows_on_cuda(monkeypatch):
    """``int8_config``: the wide tiles from WIDE_TILES_ROWS rows, prequantized, 128-wide K tiles, on
    CUDA; the shared heuristic otherwise (fewer rows, codes made in every program, the CPU, ROCm)."""
    cuda, cpu, rows = torch.device("cuda", 0), torch.device("cpu"), T.WIDE_TILES_ROWS
    monkeypatch.setattr(torch.version, "hip", None)
    assert T.int8_config(rows, 4096, 4096, 128, cuda, True) is T.WIDE_TILES
    assert T.int8_config(4 * rows, 11008, 4096, 128, cuda, True) is T.WIDE_TILES
    monkeypatch.setattr(C, "launch_config", lambda *a: "heuristic")
    monkeypatch.setattr(T, "launch_config", lambda *a: "heuristic")
    assert T.int8_config(rows - 1, 4096, 4096, 128, cuda, True) == "heuristic"
    assert T.int8_config(rows, 4096, 4096, 128, cuda, False) == "heuristic"
    assert T.int8_config(rows, 4096, 64, 64, cuda, True) == "heuristic"
    assert T.int8_config(rows, 4096, 4096, 128, cpu, True) == "heuristic"
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert T.int8_config(rows, 4096, 4096, 128, cuda, True) == "heuristic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,k,threshold", [(17, 300, 2.5), (40, 1100, 0.0), (3, 64, 3.0)])
def test_prequantized_codes_are_the_references(m, k, threshold, dtype):
    """The quantize kernel's int8 codes (across its 16 x 256 blocks, K not a multiple) are the
    reference's ``round(x * 127 / absmax)`` with the outlier columns 0."""
    x = random_case(m, 8, k, seed=m + k, threshold=threshold)[0].to(dtype)
    outliers, part = A.activation_stats(x, threshold)
    got = A.quantize_activations(x, outliers, part)
    mask, _row, want = reference.int8_activation_codes(x.float(), threshold)
    assert got.dtype == torch.int8 and torch.equal(got, want)
    assert int(mask.sum()) == (2 if threshold else 0) and got[:, mask].eq(0).all()


@pytest.mark.parametrize("block_m,split_k", [(1, 2), (16, 1), (32, 3)])
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_prequantized_product_equals_the_fused_one(block_m, split_k, threshold):
    """Codes written once and loaded give the same integer sums, outlier products and output, bit
    for bit, as codes made in every program."""
    x, cb, scb, b = random_case(20, 40, 700, seed=block_m + split_k, threshold=threshold)
    x = x.half()
    cfg = C.MatmulConfig(block_m, 32, 64, split_k, 4, 2)
    fused = T.matmul_int8_outlier(x, cb, scb, threshold, b, cfg=cfg, prequantize=False)
    pre = T.matmul_int8_outlier(x, cb, scb, threshold, b, cfg=cfg, prequantize=True)
    assert torch.equal(pre, fused)
    assert rel_err(pre, reference.matmul_int8_outlier(x.float(), cb, scb, threshold, b)) <= MATMUL_REL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("block_m,split_k", [(None, None), (1, 3), (16, 1), (32, 2)])
@pytest.mark.parametrize("m,n,k", [(1, 33, 71), (5, 17, 300), (20, 40, 700)])
def test_weight_only_product_matches_the_reference(m, n, k, block_m, split_k, dtype):
    """``weight_only``: x in floating point times the codes, scaled by SCB / 127 -- the product with
    the dequantized weight, with or without outliers in x (they are not treated apart)."""
    if dtype == torch.float32 and DEVICE == "cuda" and block_m != 1:
        pytest.skip("fp32 tl.dot tiles run in tf32 on a GPU")
    x, cb, scb, b = random_case(m, n, k, seed=m * k + n, threshold=3.0)
    x = x.to(dtype)
    want = reference.matmul_int8_weight_only(x.float(), cb, scb, b)  # fp32: the kernel's error alone
    cfg = None if block_m is None else C.MatmulConfig(block_m, 32, 64, split_k, 4, 2)
    got = T.matmul_int8_outlier(x, cb, scb, 3.0, b, cfg=cfg, weight_only=True)
    assert got.dtype == dtype and got.shape == (m, n) and torch.isfinite(got).all()
    assert rel_err(got, want) <= MATMUL_REL[dtype]
    if dtype == torch.float32:  # and it is not LLM.int8's product, whose activation rounding shows
        assert rel_err(reference.matmul_int8_outlier(x, cb, scb, 3.0, b), want) > 10 * MATMUL_REL[dtype]


def test_ties_round_half_to_even_as_the_reference():
    """Rows whose absmax is 127 scale by exactly 1, so ``x = j + 0.5`` sits on a tie between two
    codes: the kernel must round as ``torch.round`` (half to even), and the test can tell."""
    gen = torch.Generator().manual_seed(3)
    k, n = 96, 24
    x = (torch.randint(-126, 126, (4, k), generator=gen) + 0.5).float()
    x[:, 0] = 127.0  # each row's absmax
    cb, scb = quantize_rows(torch.randn(n, k, generator=gen))
    x, cb, scb = x.to(DEVICE), cb.to(DEVICE), scb.to(DEVICE)
    want = reference.matmul_int8_outlier(x, cb, scb, 0.0)
    got = T.matmul_int8_outlier(x, cb, scb, 0.0)
    away = torch.sign(x) * torch.floor(x.abs() + 0.5)  # half away from zero: the other usual rounding
    wrong = (away @ cb.float().t()) * scb / 127.0
    assert rel_err(wrong, want) > 100 * FP32_REL  # the two roundings are far apart here
    assert rel_err(got, want) <= FP32_REL


def test_zero_rows_and_all_outlier_rows():
    """A row of zeros (absmax 0) and a row whose every column is an outlier give the reference's
    finite output, not NaN from a division by zero."""
    x, cb, scb, b = random_case(3, 16, 64, seed=9, threshold=6.0)
    x[0] = 0.0
    x[2, ::2] = 50.0  # half the columns are outliers for every row; row 2 keeps only those
    x[2, 1::2] = 0.0
    want = reference.matmul_int8_outlier(x, cb, scb, 6.0, b)
    got = T.matmul_int8_outlier(x, cb, scb, 6.0, b)
    assert torch.isfinite(got).all() and rel_err(got, want) <= FP32_REL


def test_empty_input_and_batched_shape():
    x, cb, scb, b = random_case(6, 16, 64, seed=4, threshold=6.0)
    assert T.matmul_int8_outlier(x[:0], cb, scb, 6.0, b).shape == (0, 16)
    got = T.matmul_int8_outlier(x.reshape(2, 3, 64), cb, scb, 6.0, b)
    assert got.shape == (2, 3, 16)
    assert torch.equal(got.reshape(6, 16), T.matmul_int8_outlier(x, cb, scb, 6.0, b))


def test_bad_launch_inputs_are_refused():
    x, cb, scb, b = random_case(2, 16, 64, seed=6)
    with pytest.raises(ValueError, match="unit stride along K"):
        T.matmul_int8_outlier(x, cb.t().contiguous().t(), scb, 6.0)
    with pytest.raises(ValueError, match="under 32"):
        T.matmul_int8_outlier(x, cb, scb, 6.0, cfg=C.MatmulConfig(1, 32, 16, 1, 4, 2))


@pytest.mark.parametrize("int8_activations", [True, False], ids=["int8-activations", "weight-only"])
def test_module_forward_through_the_kernel_matches_reference(monkeypatch, int8_activations):
    """The ``Int8Linear`` forward through its registered Triton implementation (made available on
    this device) equals the reference forward, and passes the gradient to the input."""
    gen = torch.Generator().manual_seed(5)
    mod = Int8Linear.from_linear(torch.randn(48, 80, generator=gen), torch.randn(48, generator=gen),
                                 threshold=2.5, int8_activations=int8_activations).to(DEVICE)
    x = torch.randn(2, 80, generator=gen).to(DEVICE)
    mod.kernel = "reference"
    with torch.no_grad():
        want = mod(x)
    mod.kernel = "auto"
    impls = [dataclasses.replace(i, available=K.always, supports=lambda m, x: True) if i.name == "triton" else i
             for i in K.kernels_for(Int8Linear.format)]
    monkeypatch.setitem(K._KERNELS, Int8Linear.format, impls)
    monkeypatch.setattr(K, "_AVAILABLE", {})
    assert select_kernel(mod, x).name == "triton"
    xg = x.clone().requires_grad_(True)
    got = mod(xg)
    got.sum().backward()
    assert rel_err(got.detach(), want) <= FP32_REL
    want_grad = reference.dequantize_int8_rows(mod.weight, mod.SCB).sum(0).expand(2, 80)
    assert rel_err(xg.grad, want_grad) <= FP32_REL


@pytest.mark.gpu
@pytest.mark.parametrize("m,prequantize,weight_only,path", [
    (1, False, False, "tiled"), (16, False, False, "tiled"), (128, False, False, "tiled"), (128, True, False, "tiled"),
    (600, True, False, "tiled"), (600, None, False, "dequantize"), (1, False, True, "tiled"),
    (128, False, True, "tiled"), (600, None, True, "dequantize")])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_model_sizes_on_gpu(m, k, n, prequantize, weight_only, path):
    gen = torch.Generator().manual_seed(m + k)
    cb, scb = quantize_rows(torch.randn(n, k, generator=gen).half())
    x = torch.randn(m, k, generator=gen).half()
    x[:, 7] = 20.0  # one outlier column
    if weight_only:
        want = reference.matmul_int8_weight_only(x.float(), cb, scb)
    else:
        want = reference.matmul_int8_outlier(x.float(), cb, scb, 6.0)
    got = T.matmul_int8_outlier(x.cuda(), cb.cuda(), scb.cuda(), 6.0, prequantize=prequantize,
                                weight_only=weight_only, batch_path=path).cpu()
    assert rel_err(got, want) <= MATMUL_REL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dequantized_weight_is_the_references(dtype):
    _, cb, scb, _ = random_case(1, 70, 300, seed=2)
    got = A.dequantize_int8_rows(cb, scb, dtype)
    assert got.dtype == dtype
    assert_rounded_equal(got, reference.dequantize_int8_rows(cb, scb).to(dtype))


def assert_rounded_equal(got, want):
    """The same fp32 values cast to the dtype: equal, but for bf16 under the interpreter, whose
    fp32 -> bf16 cast truncates (one rounding step: the dequantize tolerance of the table)."""
    if got.dtype == torch.bfloat16 and DEVICE == "cpu":
        torch.testing.assert_close(got, want, atol=DEQUANT_ATOL[got.dtype], rtol=DEQUANT_ATOL[got.dtype])
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("threshold", [0.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_grid_activations_are_the_codes_values(threshold, dtype):
    """Each column that is not an outlier holds the reference code times ``absmax_row / 127`` (as
    fp32, cast to x's dtype); the outlier columns hold x."""
    x, *_ = random_case(40, 8, 300, seed=3, threshold=threshold)
    x = x.to(dtype)
    outliers, row, ca = reference.int8_activation_codes(x.float(), threshold)
    want = torch.where(outliers, x.float(), ca.float() * (row / 127.0).unsqueeze(1)).to(dtype)
    got = A.grid_activations(x, *A.activation_stats(x, threshold))
    assert got.dtype == dtype
    assert_rounded_equal(got, want)


@pytest.mark.parametrize("weight_only", [False, True], ids=["int8-activations", "weight-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_batch_paths_match_reference(monkeypatch, dtype, weight_only):
    """Above ``TILED_MAX_ROWS`` rows the default dequantizes the weight and multiplies the grid
    activations with ``F.linear`` (bf16: only when asked); both paths give the reference's product
    (the dequantize path to x's dtype's rounding of the grid values and the weight: fp32 holds
    them to 1e-6; bf16's 8 bits about double the fused kernel's error, so its bound is twice the
    table's)."""
    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 products run in tf32 on a GPU")
    rows = T.TILED_MAX_ROWS
    assert T.batch_path_for(rows, dtype) == "tiled"
    assert T.batch_path_for(rows + 1, dtype) == ("tiled" if dtype == torch.bfloat16 else "dequantize")
    m, n, k, threshold = T.TILED_MAX_ROWS + 5, 24, 200, 2.5
    x, cb, scb, b = random_case(m, n, k, seed=11, threshold=threshold)
    x = x.to(dtype)
    if weight_only:
        want = reference.matmul_int8_weight_only(x.float(), cb, scb, b)
    else:
        want = reference.matmul_int8_outlier(x.float(), cb, scb, threshold, b)
    dequantized = []
    real = T.dequantize_int8_rows
    monkeypatch.setattr(T, "dequantize_int8_rows", lambda *a, **kw: dequantized.append(1) or real(*a, **kw))
    for path, dequantizes in (("tiled", False), ("dequantize", True), (None, dtype != torch.bfloat16)):
        dequantized.clear()
        got = T.matmul_int8_outlier(x, cb, scb, threshold, b, weight_only=weight_only, batch_path=path)
        assert got.dtype == dtype and got.shape == (m, n)
        bound = MATMUL_REL[dtype] * (2 if dequantizes and dtype == torch.bfloat16 else 1)
        assert rel_err(got, want) <= bound, path
        assert bool(dequantized) == dequantizes, path
    with pytest.raises(ValueError, match="batch_path"):
        T.matmul_int8_outlier(x, cb, scb, threshold, batch_path="int_mm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,k,threshold", [(1, 1100, 2.5), (3, 300, 0.0), (16, 200, 2.75), (7, 64, 2.5)],
                         ids=["M1-3-chunks", "M3-no-threshold", "M16-dot", "M7-one-chunk"])
def test_statistics_in_the_matmul_equal_a_launch_of_their_own(monkeypatch, m, k, threshold, dtype):
    """With ``FUSED_ROW_STATS`` decode launches find the row absmaxes and outlier columns in the
    matmul kernel; the codes, and so the output, are those of the statistics launch, bit for bit.
    One row holds the threshold in two columns, and another row's absmax lies in a column that is
    not an outlier."""
    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 outlier products run in tf32 on a GPU")
    x, cb, scb, b = random_case(m, 24, k, seed=m + k, threshold=threshold)
    x = x.to(dtype)
    x[-1, k // 2] = 1.95  # above every other |x| < 1.9
    monkeypatch.setattr(T, "FUSED_ROW_STATS", True)
    fused = T.matmul_int8_outlier(x, cb, scb, threshold, b)
    monkeypatch.setattr(T, "FUSED_ROW_STATS", False)
    separate = T.matmul_int8_outlier(x, cb, scb, threshold, b)
    assert torch.equal(fused, separate)
    want = reference.matmul_int8_outlier(x.float(), cb, scb, threshold, b)
    assert rel_err(fused, want) <= MATMUL_REL[dtype]
