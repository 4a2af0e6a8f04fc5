"""Triton grouped-int kernels against the reference.

Without a GPU the kernels run on CPU under ``TRITON_INTERPRET=1`` (set in conftest) at small
sizes; with one, the ``gpu`` tests also run them compiled at model sizes. Tolerances come from
the table in conftest. ``tests/test_aot_check.py`` compiles every kernel for sm_90, gfx942 and gfx1100;
``tests/test_split_k.py`` checks the split-K scratch the kernels are given.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEQUANT_ATOL, MATMUL_REL, rel_err
from lowbit.formats.group_order import to_group_ordered
from lowbit.kernels import reference, select_kernel
from lowbit.kernels import split_k as S
from test_group_order import random_module

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
T = pytest.importorskip("lowbit.kernels.triton_int_grouped")
C = pytest.importorskip("lowbit.kernels.triton_common")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K, group_size, act_order): odd M, N and K not multiples of any block, one group per row,
# groups whose power-of-two divisor is under 16 (tiles span groups), act-order; single tokens (the
# GEMV kernel) with act-order and with one group per row
SHAPES = [
    (1, 96, 256, 64, True),
    (1, 33, 80, 80, False),
    (1, 40, 100, 32, False),
    (3, 70, 130, 64, True),
    (16, 33, 96, 96, False),
    (127, 50, 200, 48, True),
    (5, 64, 128, 128, False),
    (1, 24, 300, 100, False),
    (20, 17, 160, 160, True),
]
SHAPE_IDS = [f"M{m}-N{n}-K{k}-g{g}{'-act' if a else ''}" for m, n, k, g, a in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m,n,k,gs,act", SHAPES, ids=SHAPE_IDS)
def test_matmul_matches_reference(m, n, k, gs, act, bits, dtype):
    mod = random_module(n, k, bits, gs, act, seed=m + n + bits, dtype=dtype).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype)
    # the reference in fp32 on the same (rounded) inputs: the comparison sees the kernel's error alone
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits, bias.float())
    got = T.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= MATMUL_REL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,gs,act", [(40, 100, 32, False), (70, 130, 64, True), (33, 96, 96, True)],
                         ids=["g32", "g64-act", "per-row-act"])
def test_dequantize_matches_reference(n, k, gs, act, bits, dtype):
    mod = random_module(n, k, bits, gs, act, seed=bits, dtype=dtype).to(DEVICE)
    want = reference.dequantize_int_grouped(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits)
    got = T.dequantize_int_grouped(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits, dtype)
    assert got.dtype == dtype and got.shape == (n, k)
    # the same fp32 product rounded to dtype: one rounding step apart at most
    torch.testing.assert_close(got, want.to(dtype), atol=DEQUANT_ATOL[dtype], rtol=DEQUANT_ATOL[dtype])


def test_batched_input_and_module_forward_path():
    """The registered kernel's forward: [..., K] inputs, bias, cached group order."""
    from lowbit.formats.int_grouped import _triton_forward

    mod = random_module(48, 128, 4, 32, act_order=True, seed=3).to(DEVICE)
    mod.bias = torch.randn(48).to(DEVICE, torch.float16)
    x = torch.randn(2, 3, 128).to(DEVICE, torch.float16)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4, mod.bias.float())
    ordered = mod.group_ordered()  # what the kernel's supports checks, in every forward, before it runs
    got = _triton_forward(x, mod)
    assert got.shape == (2, 3, 48) and rel_err(got, want) <= MATMUL_REL[torch.float16]
    assert ordered is mod.group_ordered()  # built once
    assert ordered.perm is not None
    # the buffers (and so a saved checkpoint) keep the canonical layout
    fresh = random_module(48, 128, 4, 32, act_order=True, seed=3)
    assert torch.equal(mod.qweight.cpu(), fresh.qweight) and torch.equal(mod.g_idx.cpu(), fresh.g_idx)


def test_group_order_follows_in_place_writes_and_replaced_buffers():
    """The cached layout is rebuilt when a buffer is written in place (its version moves) or
    replaced, and kept while neither happens."""
    mod = random_module(32, 96, 4, 32, act_order=True, seed=4).to(DEVICE)
    other = random_module(32, 96, 4, 32, act_order=True, seed=5).to(DEVICE)
    first = mod.group_ordered()
    assert mod.group_ordered() is first
    rebuilt = lambda: to_group_ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)  # noqa: E731
    mod.qzeros.bitwise_xor_(0x11111111)  # every zero point moves: the layout is built again
    moved = mod.group_ordered()
    assert moved is not first
    mod.qweight = other.qweight.clone()
    replaced = mod.group_ordered()
    assert replaced is not moved and torch.equal(replaced.qweight, rebuilt().qweight)
    assert not torch.equal(replaced.qweight, moved.qweight)
    assert mod.group_ordered() is replaced


def test_group_order_rebuilt_after_in_place_load():
    """load_state_dict copies into the existing buffers; the cached order must follow."""
    a = random_module(32, 96, 4, 32, act_order=True, seed=1).to(DEVICE)
    b = random_module(32, 96, 4, 32, act_order=True, seed=2).to(DEVICE)
    first = a.group_ordered()
    a.load_state_dict(b.state_dict())
    second = a.group_ordered()
    assert second is not first
    assert torch.equal(second.qweight, b.group_ordered().qweight)


def test_unequal_groups_fall_back_to_reference():
    mod = random_module(16, 64, 4, 32, act_order=False).to(DEVICE)
    mod.g_idx = torch.tensor([0] * 24 + [1] * 40, dtype=torch.int32, device=DEVICE)
    assert mod.group_ordered() is None
    x = torch.randn(2, 64).to(DEVICE, torch.float16)
    assert select_kernel(mod, x).name == "reference"
    with pytest.raises(ValueError, match="equal contiguous groups"):
        T.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU selection")
def test_cpu_input_selects_reference():
    mod = random_module(16, 64, 4, 32, act_order=False)
    assert select_kernel(mod, torch.randn(2, 64, dtype=torch.float16)).name == "reference"


def test_configs_cover_both_inner_products_and_split_k():
    """The shapes above reach every code path: FMA and tl.dot, split-K, tiles across groups."""
    seen = set()
    for m, n, k, gs, _ in SHAPES:
        cfg = C.matmul_config(m, n, k, T.block_k_for(gs, k)[0], C.device_sms(torch.device(DEVICE)), C.device_arch(torch.device(DEVICE)))
        seen.add(("dot" if cfg.block_m >= 16 else "fma", cfg.split_k > 1, T.block_k_for(gs, k)[1]))
    assert {s[0] for s in seen} == {"dot", "fma"}
    assert {s[1] for s in seen} == {True, False}
    assert {s[2] for s in seen} == {True, False}


@pytest.mark.parametrize("group,k,want", [(128, 4096, (128, True)), (32, 4096, (32, True)),
                                          (48, 4096, (16, True)), (100, 4096, (32, False)),
                                          (576, 576, (128, True)), (40, 40, (64, True))])
def test_block_k_for(group, k, want):
    assert T.block_k_for(group, k) == want


def test_launch_config_whose_k_tile_spans_groups_is_an_error():
    mod = random_module(16, 128, 4, 32, False, seed=1).to(DEVICE)
    layout = mod.group_ordered()
    cfg = C.MatmulConfig(1, 64, 64, 1, 2, 3)  # 64-wide K tiles over groups of 32
    with pytest.raises(ValueError, match="block_k 64 does not fit group size 32 \\(use 32\\)"):
        T.matmul_group_ordered(torch.randn(1, 128).to(DEVICE, torch.float16), layout, cfg=cfg)


def _split_counters(device) -> torch.Tensor:
    return S.split_k_counters(torch.device(device), 1)


@pytest.mark.parametrize("split,m,n,k", [(2, 1, 33, 256), (16, 1, 200, 2048), (4, 3, 70, 512), (8, 17, 64, 1024)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_serial_split_k(split, m, n, k, dtype, bias):
    """The K splits of each output tile meet in the fp32 workspace and the last one to arrive writes
    the output: against the reference (the matmul tolerance), and against one split (the same sums
    in another order: two fp16/bf16 units at most); a second call gives the first bit for bit, and
    every arrival counter is back at 0 after each launch."""
    mod = random_module(n, k, 4, 64, False, seed=split + m, dtype=dtype).to(DEVICE)
    layout = mod.group_ordered()
    gen = torch.Generator().manual_seed(split * 100 + m)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    bm = 1 if m < 16 else 16
    one = T.matmul_group_ordered(x, layout, b, cfg=C.MatmulConfig(bm, 32, 64, 1, 2, 3))
    cfg = C.MatmulConfig(bm, 32, 64, split, 2, 3)
    got = T.matmul_group_ordered(x, layout, b, cfg=cfg)
    assert not _split_counters(DEVICE).any()
    again = T.matmul_group_ordered(x, layout, b, cfg=cfg)
    assert not _split_counters(DEVICE).any()
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4,
                                        b.float() if bias else None)
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got, want) <= MATMUL_REL[dtype]
    torch.testing.assert_close(got, one, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    assert torch.equal(got, again)


@pytest.mark.gpu
def test_serial_split_k_on_gpu_repeats_in_streams_and_graphs():
    """On a GPU, where the splits of a tile run at the same time on different multiprocessors: one
    token with 16 splits, 200 eager calls give the first call's output bit for bit and leave the
    held counters at zero; a side stream gets counters of its own for each call; a CUDA graph
    captured on a side stream uses the held counters (no fill in the graph) and its replays give
    the eager output; the graph does not use the held partials buffer."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm GPU")
    mod = random_module(4096, 4096, 4, 128, False, seed=3).to("cuda")
    layout = mod.group_ordered()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    b = torch.randn(4096, device="cuda", dtype=torch.float16)
    cfg = C.MatmulConfig(1, 64, 128, 16, 4, 3)
    first = T.matmul_group_ordered(x, layout, b, cfg=cfg)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4, b.float())
    assert rel_err(first, want) <= MATMUL_REL[torch.float16]
    outs = [T.matmul_group_ordered(x, layout, b, cfg=cfg) for _ in range(200)]
    assert all(torch.equal(o, first) for o in outs)
    held = S.split_k_counters(x.device, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = T.matmul_group_ordered(x, layout, b, cfg=cfg)
        assert S.split_k_counters(x.device, 1).data_ptr() != held.data_ptr()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, first)
    graph = torch.cuda.CUDAGraph()
    partials = S.split_k_partials(x.device, 1)
    with torch.cuda.graph(graph):
        assert S.split_k_counters(x.device, 1) is held
        assert S.split_k_partials(x.device, 1) is not partials
        captured = T.matmul_group_ordered(x, layout, b, cfg=cfg)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)
    assert not held.any()


@pytest.mark.parametrize(("k", "n", "splits"), [(4096, 4096, (8, 4, 4)), (4096, 11008, (8, 2, 2)),
                                                (11008, 4096, (8, 4, 4))])
def test_skinny_tiles_are_the_h100_sweeps_best(k, n, splits):
    """16, 32 and 64 rows of the Llama-7B shapes on an H100 (132 SMs) take the launch its sweep found
    fastest (``docs/perf/2026-11-27-h100-run6-sweeps.json``): 16x64 tiles with K split 8 ways at 16
    rows (16 ways, the rule before, took 1.27-1.42x as long where it applied), and 64x64 tiles from
    17 rows (16x64 tiles took 1.45-3.5x as long at 32 and 64 rows)."""
    got = [C.matmul_config(m, n, k, 128, 132, None) for m in (16, 32, 64)]
    assert [(c.block_m, c.block_n) for c in got] == [(16, 64), (64, 64), (64, 64)]
    assert tuple(c.split_k for c in got) == splits


def test_act_order_token_takes_its_own_tile_on_nvidia(monkeypatch):
    """One act-order token (x gathered through ``perm``) takes ``ACT_ORDER_GEMV_TILE`` on NVIDIA and
    the plain one-token tile on AMD; plain weights and more rows keep the shared heuristic's."""
    plain = C.matmul_config(1, 4096, 4096, 128, 132, None)
    act = C.matmul_config(1, 4096, 4096, 128, 132, None, T.ACT_ORDER_GEMV_TILE)
    assert (plain.block_n, plain.num_warps) == (64, 2)
    assert (act.block_n, act.num_warps) == T.ACT_ORDER_GEMV_TILE and act.split_k == plain.split_k == 16
    amd = C.matmul_config(1, 4096, 4096, 128, 304, "gfx942", T.ACT_ORDER_GEMV_TILE)
    assert (amd.block_n, amd.num_warps) == (64, 2)
    assert C.matmul_config(16, 4096, 4096, 128, 132, None, T.ACT_ORDER_GEMV_TILE) == \
        C.matmul_config(16, 4096, 4096, 128, 132, None)
    device = torch.device(DEVICE)
    planned = []
    real_plan = T._plan

    def plan(*args):
        out = real_plan(*args)
        planned.append(out[0])
        return out

    monkeypatch.setattr(T, "_plan", plan)
    act_columns = T.ACT_ORDER_GEMV_TILE[0] if C.device_arch(device) is None else 64
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.float16)
    for act, want in ((True, act_columns), (False, C.launch_config(1, 300, 512, 64, device).block_n)):
        mod = random_module(300, 512, 4, 64, act_order=act, seed=4).to(DEVICE)
        planned.clear()
        T.matmul_group_ordered(x, mod.group_ordered())
        assert [cfg.block_n for cfg in planned] == [want]


def test_split_k_fills_the_gpu_for_a_single_token():
    cfg = C.matmul_config(1, 4096, 4096, 128, 132, None)
    programs = -(-4096 // cfg.block_n) * cfg.split_k
    assert cfg.split_k > 1 and programs >= 132


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("act", [False, True], ids=["plain", "act"])
def test_model_sizes_on_gpu(m, k, n, act):
    mod = random_module(n, k, 4, 128, act, seed=m).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    got = T.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    assert rel_err(got, want) <= MATMUL_REL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 33, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_swapped_tiles_at_model_sizes_on_gpu(monkeypatch, m, dtype, bits):
    """``DOT_SWAP``'s tiles compiled, on a 4096x11008 weight (K split), and 128 rows in one tile."""
    k, n = 4096, 11008
    mod = random_module(n, k, bits, 128, False, seed=m, dtype=dtype).cuda()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits)
    monkeypatch.setattr(T, "DOT_SWAP", True)
    got = T.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits)
    assert rel_err(got, want) <= MATMUL_REL[dtype]
    w = to_group_ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits)
    one_tile = C.MatmulConfig(128, 64, 128, 2, 4, 3, swap=True)
    assert rel_err(T.matmul_group_ordered(x, w, cfg=one_tile), want) <= MATMUL_REL[dtype]


def test_launch_arithmetic_equals_tritons():
    """The wrappers' ``cdiv`` and ``next_power_of_2`` (cheap to call) give Triton's values."""
    for a in range(1, 300):
        assert C.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 3, 16, 64, 128, 512):
            assert C.cdiv(a, b) == triton.cdiv(a, b)


@triton.jit
def _both_unpacks(qw_ptr, rows_ptr, cols_ptr, k0, N, qw_words,
                  BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = T._unpack_rows(qw_ptr, k0, offs_n, N, qw_words, mask_n, BITS, BLOCK_K, BLOCK_N)  # [BK, BN]
    cols = T._unpack_cols(qw_ptr, k0, offs_n, N, qw_words, mask_n, BITS, BLOCK_K, BLOCK_N)  # [BN, BK]
    tl.store(rows_ptr + offs_k[:, None] * BLOCK_N + offs_n[None, :], rows)
    tl.store(cols_ptr + offs_n[:, None] * BLOCK_K + offs_k[None, :], cols)


@pytest.mark.skipif(DEVICE != "cpu", reason="helper kernel checked under the interpreter")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k0", [0, 32, 96], ids=["first", "k0-32", "last-partial"])
def test_unpack_cols_is_unpack_rows_transposed(bits, k0):
    """The tensor-core path's K-contiguous unpack gives exactly the canonical values, in K order,
    padding rows past the last word with 0 (the 128-row weight ends inside the tile at k0=96)."""
    from lowbit.formats.packing import pack_int, unpack_int

    n, k, block_k, block_n = 24, 112, 32, 32
    q = torch.randint(0, 2**bits, (k, n), generator=torch.Generator().manual_seed(bits + k0))
    qw = pack_int(q, bits, dim=0)  # [K * bits / 32, N]
    assert torch.equal(unpack_int(qw, bits, k, dim=0), q)
    rows = torch.full((block_k, block_n), -1, dtype=torch.int32)
    cols = torch.full((block_n, block_k), -1, dtype=torch.int32)
    _both_unpacks[(1,)](qw, rows, cols, k0, n, qw.shape[0], BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n)
    want = torch.zeros(block_k, block_n, dtype=torch.int32)
    stop = min(k, k0 + block_k)
    want[:stop - k0, :n] = q[k0:stop].to(torch.int32)
    assert torch.equal(rows, want)
    assert torch.equal(cols, want.T)


@triton.jit
def _rounded(v_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, C._round_to_bf16(tl.load(v_ptr + offs)))


@pytest.mark.skipif(DEVICE != "cpu", reason="helper kernel checked under the interpreter")
def test_round_to_bf16_is_torchs_rounding():
    """The interpreter's stand-in for a GPU's fp32 -> bf16 cast rounds as PyTorch does: random
    values of every magnitude, ties (to even, both ways) and values that carry into the exponent."""
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 - 2**-10, 255.5, 3 * 2**-9])
    edge = torch.tensor([1.9999999, -1.9999999, 65504.0, 3.3895e38, 0.0, -0.0])
    n = 4096 - ties.numel() - edge.numel()
    v = torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
    v = torch.cat([v, ties, edge])  # [4096]
    out = torch.empty_like(v)
    _rounded[(1,)](v, out, N=v.numel())
    assert torch.equal(out, v.to(torch.bfloat16).float())


# (M, N, K, group_size, act_order) for the tiles of y.T: N and K not multiples of a tile, one group
# per row, act-order (x permuted before the kernel), split K
SWAP_SHAPES = [(20, 70, 256, 64, False), (16, 33, 96, 96, False), (127, 50, 200, 200, True), (33, 17, 512, 128, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m,n,k,gs,act", SWAP_SHAPES, ids=[f"M{m}-N{n}-K{k}-g{g}{'-act' if a else ''}"
                                                          for m, n, k, g, a in SWAP_SHAPES])
def test_swapped_dot_tiles_match_reference(monkeypatch, m, n, k, gs, act, bits, dtype):
    """``DOT_SWAP``'s tiles of ``y.T`` (off by default; the benches time them beside the default)
    are planned for these weights and match the reference, as the default's tiles do."""
    mod = random_module(n, k, bits, gs, act, seed=m + bits, dtype=dtype).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits, bias.float())
    for swap in (False, True):
        monkeypatch.setattr(T, "DOT_SWAP", swap)
        cfg = T._plan(m, n, k, bits, gs, False, True, dtype, x.device, None, swap)[0]
        assert cfg.swap is swap and cfg.block_m >= 16
        got = T.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits, bias)
        assert got.dtype == dtype and got.shape == (m, n)
        assert rel_err(got, want) <= MATMUL_REL[dtype]


@pytest.mark.parametrize("block_m", [2, 8])
def test_swapped_tiles_of_few_rows_match_reference(block_m):
    """Swapped tiles under 16 rows (``tl.dot`` pads them), as the sweep tries them."""
    m, n, k, gs = block_m - 1 or 1, 70, 256, 64
    mod = random_module(n, k, 4, gs, False, seed=block_m).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(block_m)).to(DEVICE, torch.float16)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    w = to_group_ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    got = T.matmul_group_ordered(x, w, cfg=C.MatmulConfig(block_m, 32, 64, 2, 4, 3, swap=True))
    assert rel_err(got, want) <= MATMUL_REL[torch.float16]


def test_a_split_without_a_k_tile_is_refused():
    """A given ``split_k`` above the K tiles would leave programs with no K tile, which the swapped
    tiles' kernel assumes away (the default tiles' programs just add nothing)."""
    mod = random_module(33, 256, 4, 128, False, seed=1).to(DEVICE)
    w = to_group_ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    x = torch.randn(16, 256).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="split_k 4 leaves a split without a K tile"):
        T.matmul_group_ordered(x, w, cfg=C.MatmulConfig(16, 32, 128, 4, 4, 3, swap=True))
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    got = T.matmul_group_ordered(x, w, cfg=C.MatmulConfig(16, 32, 128, 4, 4, 3))
    assert rel_err(got, want) <= MATMUL_REL[torch.float16]


@pytest.mark.parametrize("bits,gs", [(3, 64), (8, 100)], ids=["3-bit", "tiles-span-groups"])
def test_swapped_tiles_refused_where_the_kernel_has_none(bits, gs):
    mod = random_module(33, 200, bits, gs, False, seed=bits).to(DEVICE)
    w = to_group_ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, bits)
    block_k = T.block_k_for(gs, 200)[0]
    x = torch.randn(16, 200).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="swapped tiles need 2, 4 or 8 bits and tiles inside groups"):
        T.matmul_group_ordered(x, w, cfg=C.MatmulConfig(16, 32, block_k, 1, 4, 3, swap=True))


@pytest.mark.parametrize("m", [1, 16, 5])
def test_act_order_rows_gathered_or_permuted_first(monkeypatch, m):
    """Act-order activations gathered through ``perm`` in the kernel, or permuted by an
    ``index_select`` before a plain kernel, as ``GATHER_MAX_ROWS`` decides: both give the
    reference's product and each other's to the accumulation's rounding, and only the second
    permutes x outside the kernel."""
    n, k, gs = 70, 200, 40
    mod = random_module(n, k, 4, gs, act_order=True, seed=11).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(11)).to(DEVICE, torch.float16)
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    layout = T._ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    assert layout.perm is not None
    selects = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: selects.append(1) or real(t, *a))
    got = {}
    for rows in (m, m - 1):
        monkeypatch.setattr(T, "GATHER_MAX_ROWS", rows)
        selects.clear()
        got[rows] = T.matmul_group_ordered(x, layout)
        assert rel_err(got[rows], want) <= MATMUL_REL[torch.float16]
        assert bool(selects) == (rows < m)
    assert rel_err(got[m], got[m - 1].float()) <= MATMUL_REL[torch.float16]


@pytest.mark.parametrize("act", [False, True], ids=["plain", "act-order"])
def test_batch_paths_match_reference(monkeypatch, act):
    """Above ``TILED_MAX_ROWS`` rows the weight is dequantized (in input order) and multiplied by
    ``F.linear``; both paths give the reference's product, with bias, and the default takes the
    dequantize path only there."""
    assert T.batch_path_for(T.TILED_MAX_ROWS) == "tiled" and T.batch_path_for(T.TILED_MAX_ROWS + 1) == "dequantize"
    m, n, k, gs = T.TILED_MAX_ROWS + 3, 40, 96, 32
    mod = random_module(n, k, 4, gs, act, seed=m).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float16)
    bias = torch.randn(n).to(DEVICE, torch.float32)  # another dtype than x: cast for F.linear
    want = reference.matmul_int_grouped(x.float(), mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4, bias)
    layout = T._ordered(mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4)
    dequantized = []
    real = T.dequantize_group_ordered
    monkeypatch.setattr(T, "dequantize_group_ordered", lambda *a, **kw: dequantized.append(1) or real(*a, **kw))
    for path, dequantizes in (("tiled", False), ("dequantize", True), (None, True)):
        dequantized.clear()
        got = T.matmul_group_ordered(x, layout, bias, batch_path=path)
        assert got.dtype == torch.float16 and got.shape == (m, n)
        assert rel_err(got, want) <= MATMUL_REL[torch.float16], path
        assert bool(dequantized) == dequantizes, path
    dequantized.clear()
    T.matmul_group_ordered(x[:T.TILED_MAX_ROWS], layout, bias)
    assert not dequantized
    with pytest.raises(ValueError, match="batch_path"):
        T.matmul_group_ordered(x, layout, batch_path="fused")
