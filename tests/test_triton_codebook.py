"""Triton AQLM codebook kernels against the reference (interpreter on CPU; compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEQUANT_ATOL, MATMUL_REL, launch_keyword, rel_err
from lowbit.formats.codebook import AqlmLinear
from lowbit.kernels import reference, select_kernel

pytest.importorskip("triton")
T = pytest.importorskip("lowbit.kernels.triton_codebook")
L = pytest.importorskip("lowbit.kernels.triton_codebook_lut")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K, in_group): odd N, K not a multiple of the K tile, M on both sides of the tl.dot threshold,
# groups that are not a power of two (decoded a value at a time)
SHAPES = [(1, 33, 72, 8), (3, 40, 96, 8), (16, 24, 80, 16), (37, 20, 64, 4), (2, 48, 200, 8), (1, 16, 72, 12),
          (17, 8, 36, 12)]
SHAPE_IDS = [f"M{m}-N{n}-K{k}-g{g}" for m, n, k, g in SHAPES]
SCHEMES = [(2, 8), (1, 16), (3, 5)]  # the two published schemes and an odd one (int8 codes, 32 entries)


def random_module(n, k, ig, n_codebooks, nbits, seed, bias=True, dtype=torch.float16):
    """Random codes over the whole index range (signed storage exercised), codebooks, scales, bias."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << nbits, (n, k // ig, n_codebooks), generator=gen)
    books = torch.randn(n_codebooks, 1 << nbits, 1, ig, generator=gen)
    scales = torch.rand(n, generator=gen) * 0.05 + 0.01
    b = torch.randn(n, generator=gen) if bias else None
    return AqlmLinear.from_quantized(idx, books, scales, b, dtype=dtype).to(DEVICE)


def args(m: AqlmLinear) -> tuple:
    return m.codes, m.codebooks, m.scales


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=[f"{c}x{b}" for c, b in SCHEMES])
@pytest.mark.parametrize("m,n,k,ig", SHAPES, ids=SHAPE_IDS)
def test_matmul_matches_reference(m, n, k, ig, scheme, dtype):
    mod = random_module(n, k, ig, *scheme, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)  # fp32: the kernel's error alone
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias)
    assert got.dtype == dtype and got.shape == (m, n) and torch.isfinite(got).all()
    assert rel_err(got, want) <= MATMUL_REL[dtype]


@pytest.mark.parametrize("path", ["tiled", "dequantize"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_both_batch_paths_match_reference(path, dtype):
    mod = random_module(24, 80, 8, *SCHEMES[0], seed=4)
    x = torch.randn(2, 17, 80, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias, batch_path=path)
    assert got.dtype == dtype and got.shape == (2, 17, 24)
    assert rel_err(got, want) <= MATMUL_REL[dtype]


# the tiled kernel's tiles of y.T: odd N, K not a multiple of the tile, groups of 4, 8 and 16, a K split
SWAP_CASES = [(16, 24, 80, 8, (2, 8)), (37, 20, 64, 4, (1, 16)), (20, 33, 512, 16, (3, 5)), (64, 17, 1024, 8, (1, 16))]


@pytest.mark.parametrize("gather", [False, True], ids=["loaded", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,ig,scheme", SWAP_CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-{c[4][0]}x{c[4][1]}"
                                                             for c in SWAP_CASES])
def test_swapped_dot_tiles_match_reference(monkeypatch, m, n, k, ig, scheme, dtype, gather):
    """``DOT_SWAP``'s tiles of ``y.T`` in the tiled kernel (off by default; the bench times them
    beside the default), codebooks loaded from memory or gathered where they fit."""
    monkeypatch.setattr(T, "DOT_SWAP", True)
    mod = random_module(n, k, ig, *scheme, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    swapped = launch_keyword(monkeypatch, T, "SWAP")
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias, batch_path="tiled", gather=gather)
    assert swapped == [True]
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got, want) <= MATMUL_REL[dtype]


# codebooks small enough to gather from: the GEMV, tl.dot tiles, groups of 4, and a group wider than
# the K tile (decoded a value at a time)
GATHER_CASES = [(1, 33, 72, 8, (2, 8)), (16, 24, 80, 8, (2, 8)), (3, 40, 96, 4, (2, 8)), (1, 8, 256, 256, (1, 2))]


@pytest.mark.parametrize("m,n,k,ig,scheme", GATHER_CASES, ids=[f"M{c[0]}-K{c[2]}-g{c[3]}" for c in GATHER_CASES])
def test_gathered_codebooks_give_the_same_product(m, n, k, ig, scheme):
    mod = random_module(n, k, ig, *scheme, seed=k)
    assert T.gather_table(mod.codebooks, gather=True) == mod.codebooks.numel()  # the case gathers
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, torch.float16)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    loaded = T.matmul_codebook(x, *args(mod), bias=mod.bias, batch_path="tiled", gather=False)
    gathered = T.matmul_codebook(x, *args(mod), bias=mod.bias, batch_path="tiled", gather=True)
    assert rel_err(gathered, want) <= MATMUL_REL[torch.float16]
    assert torch.equal(gathered, loaded)


def test_gathered_codebooks_dequantize_the_same():
    mod = random_module(33, 72, 8, 2, 8, seed=4)
    gathered = T.dequantize_codebook(*args(mod), gather=True)
    torch.testing.assert_close(gathered.float(), reference.dequantize_codebook(*args(mod)),
                               atol=DEQUANT_ATOL[torch.float16], rtol=DEQUANT_ATOL[torch.float16])
    assert torch.equal(gathered, T.dequantize_codebook(*args(mod), gather=False))


# tabulated codeword products: one row, several, a K split (long rows), odd N, groups of 4 and 12,
# three codebooks of 32 entries, int8 (2x8) and int16 (1x8 in 16-bit storage is not a layout: 2x8 only)
LUT_CASES = [(1, 33, 72, 8, (2, 8)), (3, 40, 96, 8, (2, 8)), (1, 24, 2048, 8, (2, 8)), (2, 20, 64, 4, (2, 8)),
             (4, 17, 72, 12, (3, 5)), (1, 8, 64, 8, (1, 8))]


# how the tabulated path reads its table: (LUT_SLICES, LUT_SLICE_PRODUCTS)
LUT_READS = {"gathered": (False, False), "slices-held": (True, False), "slices-made": (True, True)}


@pytest.mark.parametrize("reads", list(LUT_READS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("m,n,k,ig,scheme", LUT_CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-{c[4][0]}x{c[4][1]}"
                                                            for c in LUT_CASES])
def test_tabulated_products_match_reference(monkeypatch, m, n, k, ig, scheme, dtype, reads):
    """The tabulated path, its entries gathered from device memory (``_lut_gemv_kernel``), from
    slices of the table held in each program (``LUT_SLICES``), or from slices each program makes
    (``LUT_SLICE_PRODUCTS``; three codebooks are not a power of two and keep the table)."""
    monkeypatch.setattr(L, "LUT_SLICES", LUT_READS[reads][0])
    monkeypatch.setattr(L, "LUT_SLICE_PRODUCTS", LUT_READS[reads][1])
    mod = random_module(n, k, ig, *scheme, seed=k + m)
    assert L.products_in_program(mod.codebooks) == (scheme[0] != 3)
    assert L.lut_applies(m, mod.codebooks, lut=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias, lut=True)
    assert got.dtype == dtype and got.shape == (m, n) and torch.isfinite(got).all()
    assert rel_err(got, want) <= MATMUL_REL[dtype]
    nobias = T.matmul_codebook(x, *args(mod), lut=True)
    assert rel_err(nobias, reference.matmul_codebook(x.float(), *args(mod))) <= MATMUL_REL[dtype]


@pytest.mark.parametrize("block_j,prefetch", [(64, False), (64, True), (256, True), (256, False), (32, False),
                                              (128, False)],
                         ids=["64", "64-prefetch", "256-prefetch", "256", "32", "128"])
@pytest.mark.parametrize("m,n,k", [(1, 8, 4096), (2, 200, 1024), (1, 33, 200)],
                         ids=["split-2-steps-each", "unsplit-4-steps", "partial-step"])
def test_tabulated_steps_and_prefetch(monkeypatch, block_j, prefetch, m, n, k):
    """Each step size, with and without the next codes loaded ahead, gives the reference's product
    over K splits of several steps, unsplit rows of several steps, and a last step past the codes."""
    monkeypatch.setattr(L, "LUT_BLOCK_J", block_j)
    monkeypatch.setattr(L, "LUT_PREFETCH", prefetch)
    mod = random_module(n, k, 8, 2, 8, seed=n + block_j)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, torch.float16)
    cfg = L._lut_config(m, n, k // 8 * 2, torch.device(DEVICE))
    assert cfg.block_k == block_j
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias, lut=True)
    assert rel_err(got, reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)) <= MATMUL_REL[torch.float16]


@pytest.mark.parametrize("m,n,k", [(1, 300, 4096), (3, 600, 2048), (1, 40, 200)],
                         ids=["split-2-slices-each", "rows-over-a-program", "partial-slice"])
@pytest.mark.parametrize("made", [False, True], ids=["slices-held", "slices-made"])
def test_held_slices_over_splits(monkeypatch, m, n, k, made):
    """Slices of the table held in (or made by) the program: programs of several slices, several row
    blocks, and a last slice past the codes (its entries read as 0)."""
    monkeypatch.setattr(L, "LUT_SLICES", True)
    monkeypatch.setattr(L, "LUT_SLICE_PRODUCTS", made)
    mod = random_module(n, k, 8, 2, 8, seed=n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, torch.float16)
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias, lut=True)
    assert rel_err(got, reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)) <= MATMUL_REL[torch.float16]


def test_held_slice_config():
    """A held slice fits :data:`LUT_SLICE_BYTES` (fp16 and fp32 tables, 2x8 and 3x5), and every split has a slice."""
    for size, entry in ((256, 2), (256, 4), (32, 2)):
        for n in (8, 4096, 11008):
            for j in (18, 1024, 2752):
                cfg = L._lut_slice_config(1, n, j, size, entry, torch.device(DEVICE))
                assert cfg.block_k * size * entry <= L.LUT_SLICE_BYTES and cfg.block_k <= 64
                assert T.cdiv(j, cfg.block_k) >= cfg.split_k
    assert L._lut_slice_config(1, 8, 1024, 256, 2, torch.device(DEVICE)).split_k > 1


def test_lut_split_keeps_a_step_per_split():
    """The K split of the tabulated GEMV never leaves a split without codes to read."""
    for n in (8, 64, 4096, 11008):
        for j in (64, 200, 1024, 2752):
            for block_j in (64, 256):
                cfg = L._lut_config(1, n, j, torch.device(DEVICE), block_j)
                assert cfg.split_k == 1 or T.cdiv(j, block_j) >= cfg.split_k
    assert L._lut_config(1, 8, 1024, torch.device(DEVICE), 64).split_k > 1  # few rows, long K: split


def test_codeword_products_table():
    mod = random_module(8, 48, 8, 2, 8, seed=3, dtype=torch.float32)
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    lut = L.codeword_products(x, mod.codebooks)
    assert lut.shape == (2, 6, 512) and lut.dtype == torch.float32
    books = mod.codebooks.float()
    for m, g, c, s in [(0, 0, 0, 0), (1, 5, 1, 255), (0, 3, 1, 17), (1, 2, 0, 128)]:
        want = float(x[m, g * 8 : (g + 1) * 8] @ books[c, s, 0])
        assert float(lut[m, g, c * 256 + s]) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_tabulated_path_applies_to_few_rows_and_small_codebooks():
    small, big = torch.empty(2, 256, 1, 8), torch.empty(1, 65536, 1, 8)
    assert L.lut_applies(1, small, lut=True) and L.lut_applies(L.LUT_MAX_ROWS, small, lut=True)
    assert not L.lut_applies(L.LUT_MAX_ROWS + 1, small, lut=True)
    assert not L.lut_applies(1, big, lut=True)  # 1x16: 65,536 products per group
    assert not L.lut_applies(1, small, lut=False)
    assert L.lut_applies(1, small) == L.DEFAULT_LUT


@pytest.mark.parametrize("gather", [False, True], ids=["global", "gather"])
@pytest.mark.parametrize("n,k,ig,scheme", [(33, 72, 8, (2, 8)), (40, 128, 4, (2, 8)), (17, 64, 8, (1, 16)),
                                           (24, 96, 16, (3, 5))], ids=["2x8-odd", "2x8-g4", "1x16", "3x5-g16"])
def test_whole_codeword_dequantize_is_the_same(n, k, ig, scheme, gather):
    """Decoding a codeword per code gives the value-at-a-time kernel's weights bit for bit."""
    mod = random_module(n, k, ig, *scheme, seed=n + k)
    words = T.dequantize_codebook(*args(mod), gather=gather, whole_words=True)
    torch.testing.assert_close(words.float(), reference.dequantize_codebook(*args(mod)),
                               atol=DEQUANT_ATOL[torch.float16], rtol=DEQUANT_ATOL[torch.float16])
    assert torch.equal(words, T.dequantize_codebook(*args(mod), gather=gather, whole_words=False))


def test_only_small_codebooks_are_gathered():
    assert T.gather_table(torch.empty(2, 256, 1, 8), gather=True) == 4096
    assert T.gather_table(torch.empty(1, 65536, 1, 8), gather=True) == 0  # 1x16: read from memory
    assert T.gather_table(torch.empty(3, 32, 1, 8), gather=True) == 0  # 768: not a power of two
    assert T.gather_table(torch.empty(2, 256, 1, 8), gather=False) == 0


def test_unknown_batch_path_is_an_error():
    mod = random_module(8, 64, 8, *SCHEMES[0], seed=1)
    with pytest.raises(ValueError, match="batch_path must be 'tiled' or 'dequantize', not 'dense'"):
        T.matmul_codebook(torch.randn(16, 64).to(DEVICE, torch.float16), *args(mod), batch_path="dense")


@pytest.mark.parametrize("scheme", SCHEMES, ids=[f"{c}x{b}" for c, b in SCHEMES])
@pytest.mark.parametrize("n,k,ig", [(33, 72, 8), (24, 80, 16), (70, 40, 4)], ids=["odd", "g16", "g4"])
def test_dequantize_matches_reference(n, k, ig, scheme):
    mod = random_module(n, k, ig, *scheme, seed=n)
    want = reference.dequantize_codebook(*args(mod))
    for dtype in (torch.float16, torch.bfloat16):
        got = T.dequantize_codebook(*args(mod), dtype=dtype)
        assert got.shape == (n, k)
        torch.testing.assert_close(got, want.to(dtype), atol=DEQUANT_ATOL[dtype], rtol=DEQUANT_ATOL[dtype])


def test_batched_input_and_bf16_codebooks():
    from lowbit.formats.codebook import _triton_forward

    mod = random_module(40, 96, 8, 2, 8, seed=9, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 96).to(DEVICE, torch.float16)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    got = _triton_forward(x, mod)
    assert got.dtype == torch.float16 and got.shape == (2, 5, 40)
    assert rel_err(got, want) <= MATMUL_REL[torch.float16]


def test_out_groups_other_than_one_are_refused():
    gen = torch.Generator().manual_seed(0)
    mod = AqlmLinear.from_quantized(torch.randint(0, 256, (8, 4, 1), generator=gen),
                                    torch.randn(1, 256, 2, 8, generator=gen), torch.rand(8, generator=gen), None)
    assert not T.supports(mod.codebooks)
    with pytest.raises(ValueError, match="out_group_size 1, not 2"):
        T.matmul_codebook(torch.randn(1, 32, dtype=torch.float16), *args(mod))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU selection")
def test_cpu_does_not_select_triton():
    mod = random_module(16, 64, 8, 2, 8, seed=1)
    assert select_kernel(mod, torch.randn(2, 64, dtype=torch.float16)).name == "cpu-codebook"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [(2, 8), (1, 16)], ids=["2x8", "1x16"])
@pytest.mark.parametrize("m", [1, 16, 128])
def test_model_size_on_gpu(m, scheme):
    mod = random_module(4096, 4096, 8, *scheme, seed=m, bias=False)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    assert select_kernel(mod, x).name == "triton"
    want = reference.matmul_codebook(x.float(), *args(mod))
    assert rel_err(mod(x), want) <= MATMUL_REL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [(2, 8), (1, 16)], ids=["2x8", "1x16"])
@pytest.mark.parametrize("m", [16, 128])
def test_swapped_dot_tiles_at_model_size_on_gpu(monkeypatch, m, scheme):
    monkeypatch.setattr(T, "DOT_SWAP", True)
    mod = random_module(4096, 4096, 8, *scheme, seed=m)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    got = T.matmul_codebook(x, *args(mod), bias=mod.bias, batch_path="tiled")
    assert rel_err(got, want) <= MATMUL_REL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("made", [False, True], ids=["slices-held", "slices-made"])
def test_held_slices_at_model_sizes_on_gpu(monkeypatch, k, n, m, dtype, made):
    """``LUT_SLICES``' kernels compiled: fp16 and fp32 tables, a K split over 22 slices."""
    monkeypatch.setattr(L, "LUT_SLICES", True)
    monkeypatch.setattr(L, "LUT_SLICE_PRODUCTS", made)
    mod = random_module(n, k, 8, 2, 8, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    want = reference.matmul_codebook(x.float(), *args(mod), bias=mod.bias)
    assert rel_err(T.matmul_codebook(x, *args(mod), bias=mod.bias, lut=True), want) <= MATMUL_REL[dtype]
