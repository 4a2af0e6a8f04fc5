"""Triton kernels for the grouped-int format: dequantize and fused dequant-matmul.

One source for NVIDIA CUDA and AMD ROCm. Both kernels read the :class:`GroupOrdered` layout
(canonical packing, rows in group order, optional ``perm`` gathered from the activations), so
act-order weights take the same path as plain ones. The reference twins are
:func:`lowbit.kernels.reference.dequantize_int_grouped` and
:func:`lowbit.kernels.reference.matmul_int_grouped`; :func:`dequantize_int_grouped` and
:func:`matmul_int_grouped` here take the same arguments.

The matmul has two inner products chosen by a compile-time flag: ``tl.dot`` on tiles of at least
16 rows (prefill, batched decode), and a broadcast multiply-sum for ``BLOCK_M < 16`` (single-token
decode, where the tensor cores would idle on padding). ``SPLIT_K > 1`` spreads K over programs so
that a skinny product still fills the GPU; each split writes fp32 partial sums, and the last split
of each output tile to finish adds them in split order and writes the output (serial split-K:
deterministic, one launch, and the output needs no zero-fill).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the tests use that.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from lowbit.formats.group_order import GroupOrdered, to_group_ordered
from lowbit.kernels.held import HeldCall
from lowbit.kernels.split_k import output_buffers
from lowbit.kernels.triton_common import (
    MatmulConfig,
    _accumulator,
    _dot_weight_first,
    _output_tile,
    _product,
    _store_output,
    cdiv,
    check_batch_path,
    held_call_key,
    input_rows,
    launch,
    launch_config,
    next_power_of_2,
)


@triton.jit
def _unpack(base, idx, other, stride_word, stride_other, n_words, mask, BITS: tl.constexpr):
    """Values ``idx`` along a packed dimension (see :mod:`lowbit.formats.packing`), as int32.

    ``idx`` and ``other`` broadcast against each other; word ``w`` of line ``o`` is at
    ``base + w * stride_word + o * stride_other``. A 3-bit value may straddle two words.
    """
    bit = idx * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    lo = tl.load(base + word * stride_word + other * stride_other, mask=mask, other=0)
    v = lo.to(tl.uint32, bitcast=True) >> shift
    if BITS == 3:
        nxt = mask & (word + 1 < n_words)
        hi = tl.load(base + (word + 1) * stride_word + other * stride_other, mask=nxt, other=0)
        spill = hi.to(tl.uint32, bitcast=True) << ((32 - shift) & 31)
        v = v | tl.where(shift > 29, spill, 0)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _unpack_rows(base, k0, offs_n, stride_word, n_words, mask_n, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Rows ``k0 .. k0 + BLOCK_K`` of columns ``offs_n`` of a matrix packed along its rows, as int32
    ``[BLOCK_K, BLOCK_N]``; ``k0`` is a multiple of the values per word and ``32 % BITS == 0``.

    Each 32-bit word is loaded once and split with shifts (``word >> BITS * j`` is row
    ``word_index * 32 // BITS + j``), instead of one load per value. Rows past the last word read 0.
    """
    PER: tl.constexpr = 32 // BITS
    rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
    mask = (rows < n_words)[:, None] & mask_n[None, :]
    words = tl.load(base + rows[:, None] * stride_word + offs_n[None, :], mask=mask, other=0)  # [BK/PER, BN]
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
    v = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(v, (BLOCK_K, BLOCK_N)).to(tl.int32)


@triton.jit
def _unpack_tile(base, k0, offs_k, offs_n, stride_word, n_words, mask_kn, mask_n, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``offs_k = k0 + arange(BLOCK_K)`` of columns ``offs_n`` as int32 ``[BLOCK_K, BLOCK_N]``:
    a word at a time (:func:`_unpack_rows`), or a value at a time for 3 bits (values straddle words)."""
    if BITS == 3:
        q = _unpack(base, offs_k[:, None], offs_n[None, :], stride_word, 1, n_words, mask_kn, BITS)
    else:
        q = _unpack_rows(base, k0, offs_n, stride_word, n_words, mask_n, BITS, BLOCK_K, BLOCK_N)
    return q


@triton.jit
def _field(u, i: tl.constexpr, BITS: tl.constexpr):
    """Value ``i`` of the uint32 words ``u`` (``32 % BITS == 0``)."""
    return (u >> (i * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _fields2(u, s: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    """Values ``s`` and ``s + step`` of each word, as a new last dimension of 2."""
    return tl.join(_field(u, s, BITS), _field(u, s + step, BITS))


@triton.jit
def _fields4(u, s: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    """Values ``s + step * i`` for ``i < 4``, as new last dimensions ``[2, 2]`` that flatten to ``i``."""
    return tl.join(_fields2(u, s, 2 * step, BITS), _fields2(u, s + step, 2 * step, BITS))


@triton.jit
def _fields8(u, s: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_fields4(u, s, 2 * step, BITS), _fields4(u, s + step, 2 * step, BITS))


@triton.jit
def _fields16(u, s: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_fields8(u, s, 2 * step, BITS), _fields8(u, s + step, 2 * step, BITS))


@triton.jit
def _unpack_cols(base, k0, offs_n, stride_word, n_words, mask_n, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """:func:`_unpack_rows` transposed: ``[BLOCK_N, BLOCK_K]`` int32 (``BITS`` 2, 4 or 8).

    Each word's values are split by ``tl.join`` (:func:`_fields8`), which keeps them in the
    thread that loaded the word, in K order. So the thread holds ``32 // BITS`` consecutive K
    values of one column, and a dequantized fp16 tile goes to the K-contiguous shared memory
    ``tl.dot`` reads in 16-byte stores; splitting with a broadcast shift (``_unpack_rows``) spreads
    a word's values over threads, and the sm_90 PTX stored that tile 2 bytes at a time (64
    ``st.shared.b16`` per thread and K step for a 64x128 tile, against 8 ``st.shared.v4.b32``).
    """
    PER: tl.constexpr = 32 // BITS
    rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
    mask = mask_n[:, None] & (rows < n_words)[None, :]
    words = tl.load(base + rows[None, :] * stride_word + offs_n[:, None], mask=mask, other=0)  # [BN, BK/PER]
    u = words.to(tl.uint32, bitcast=True)
    if PER == 16:
        v = _fields16(u, 0, 1, BITS)
    elif PER == 8:
        v = _fields8(u, 0, 1, BITS)
    else:
        v = _fields4(u, 0, 1, BITS)  # [BN, BK/PER, 2, ..., 2]
    return tl.reshape(v, (BLOCK_N, BLOCK_K)).to(tl.int32)


@triton.jit
def _matmul_kernel(
    x_ptr, qw_ptr, s_ptr, qz_ptr, perm_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym, qw_words, qz_words,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr, DOT_FP32: tl.constexpr, SWAP: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)``; with ``SPLIT_K > 1`` the splits meet in ``ws`` and the
    last one writes y (``_store_output``). ``SWAP`` (2, 4 and 8 bits, one group a tile): ``tl.dot``
    tiles of ``y.T`` (:func:`_dot_weight_first`), the weight dequantized K-contiguous
    (:func:`_unpack_cols`) with its scale, ``acc`` ``[BLOCK_N, BLOCK_M]``."""
    offs_m, offs_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _accumulator(K, BLOCK_M, BLOCK_N, BLOCK_K, SWAP)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            src_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            src_k = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        if TILE_IN_GROUP:
            # one group per tile: one scale and zero per column, applied after the product
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
            z = _unpack(qz_ptr + g * qz_words, offs_n, 0, 1, 0, qz_words, mask_n, BITS)  # [BN]
            if SWAP:
                q = _unpack_cols(qw_ptr, k0, offs_n, N, qw_words, mask_n, BITS, BLOCK_K, BLOCK_N)  # [BN, BK]
                acc = _dot_weight_first((q - z[:, None]).to(tl.float32) * s[:, None], x, acc, DOT_FP32)
            else:
                q = _unpack_tile(qw_ptr, k0, offs_k, offs_n, N, qw_words, mask_kn, mask_n, BITS, BLOCK_K, BLOCK_N)
                w = (q - z[None, :]).to(tl.float32)  # |q - z| < 256: exact in fp16 and bf16
                acc += _product(x, w, BLOCK_M, DOT_FP32) * s[None, :]
        else:
            q = _unpack_tile(qw_ptr, k0, offs_k, offs_n, N, qw_words, mask_kn, mask_n, BITS, BLOCK_K, BLOCK_N)
            g = offs_k // GROUP  # [BK]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
            z = _unpack(qz_ptr, offs_n[None, :], g[:, None], 1, qz_words, qz_words, mask_kn, BITS)
            acc += _product(x, (q - z).to(tl.float32) * s.to(tl.float32), BLOCK_M, DOT_FP32)
    _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, tl.program_id(0), HAS_BIAS,
                  SPLIT_K, SWAP)


@triton.jit
def _dequantize_kernel(
    qw_ptr, s_ptr, qz_ptr, perm_ptr, out_ptr,
    N, K, qw_words, qz_words,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[N, K]`` (canonical column order) from the group-ordered codes."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_kn = mask_k[:, None] & (offs_n < N)[None, :]
    if BITS == 3:
        q = _unpack(qw_ptr, offs_k[:, None], offs_n[None, :], N, 1, qw_words, mask_kn, BITS)  # [BK, BN]
    else:
        q = _unpack_rows(qw_ptr, pid_k * BLOCK_K, offs_n, N, qw_words, offs_n < N, BITS, BLOCK_K, BLOCK_N)
    g = offs_k // GROUP
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
    z = _unpack(qz_ptr, offs_n[None, :], g[:, None], 1, qz_words, qz_words, mask_kn, BITS)
    w = (q - z).to(tl.float32) * s.to(tl.float32)
    if HAS_PERM:
        dst_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    else:
        dst_k = offs_k
    tl.store(out_ptr + offs_n[None, :] * K + dst_k[:, None], w.to(out_ptr.dtype.element_ty), mask=mask_kn)


# --- launch configuration ----------------------------------------------------------------

DOT_SWAP = False
"""Whether the ``tl.dot`` tiles (16 rows or more) compute ``y.T = W @ x.T``, the dequantized and
scaled weight the dot's first operand (:func:`~lowbit.kernels.triton_common._dot_weight_first`), for
2, 4 and 8 bits with tiles inside groups. In the sm_90 code the dots then overlap the next tile's
dequantize, where ``x @ W.T`` waits for each (``bench/ptx.py``). Not yet timed on a GPU, so off;
``bench/kernels.py`` and ``bench/sweep.py`` time it beside the default.
An earlier variant kept ``x @ W.T`` with the weight dequantized K-contiguous as the second operand:
fewer instructions, but slower on an H100 (2026-11-27, w4g128, graphs, cold L2: 23.9 against 18.8
µs at 16 rows of 4096x4096, 28.3 against 27.3 µs at 128 rows), and it was removed."""


def block_k_for(group: int, k: int, cap: int = 128) -> tuple[int, bool]:
    """The K tile and whether each tile lies inside one group.

    The largest power of two up to ``cap`` that divides ``group`` keeps tiles inside groups (so
    scales apply after the product); ``group >= K`` (one group per row) allows any tile. A group
    with no such divisor of at least 16 (``tl.dot``'s minimum) takes 32-wide tiles that span
    groups and dequantize per element.
    """
    if group >= k:
        return min(cap, max(16, next_power_of_2(k))), True
    bk = cap
    while bk >= 16 and group % bk:
        bk //= 2
    return (bk, True) if bk >= 16 else (32, False)


TILED_MAX_ROWS = 256
"""The most rows the fused kernel takes by default; more (prefill) dequantize the weight once, then
``F.linear`` (:func:`batch_path_for`)."""


ACT_ORDER_GEMV_TILE = (128, 4)
"""(columns, warps) of a one-token program that gathers x through ``perm``, on NVIDIA: half as many
programs gather as with the plain kernel's 64 columns. On an H100 (2026-11-27, ``bench/sweep.py
--act-order --m 1 --quick``, graphs, cold L2) 8.7 / 16.4 µs on 4096x4096 / 4096x11008 against 10.2 /
20.5 µs with the plain kernel's (64, 2), where plain weights take 8.8 / 16.3 µs. The plain kernel's
one-token tile stays: (128, 4) was within 4 % of it either way on the H100 and the H200."""

GATHER_MAX_ROWS = 1
"""Up to how many rows the activations of an act-order weight are gathered through ``perm`` in the
kernel (every program gathers its slice of x) rather than permuted by one ``index_select`` launch
before a plain kernel (0: never gathered). On an H100 (2026-11-27) permuting one token first took
15.9 / 23.1 µs against 10.3 / 20.6 µs on 4096x4096 / 4096x11008; at 16 rows, where the
``index_select`` is the default, act-order took 25.0 / 35.6 µs against 18.9 / 29.4 µs for plain
weights. ``bench/kernels.py`` times the gather at 16 rows beside it (not yet run)."""


def batch_path_for(m: int) -> str:
    """How ``m`` rows are multiplied: ``"tiled"`` (the fused kernel) up to :data:`TILED_MAX_ROWS`,
    ``"dequantize"`` (the weight dequantized to x's dtype, then ``F.linear``) above.

    The fused kernel dequantizes every weight tile once per 64-row tile of x, so its cost grows
    with the rows; the dequantize path's extra cost is fixed: one write and read of the fp16
    weight (on an H100, 17.3 µs for 4096x4096 at 95 % of the copy probe, against 25.3 µs for the
    fused kernel at 128 rows and 15.5 for fp16 ``F.linear``; ``docs/performance.md``). The
    threshold is that model's, not a measured crossover; ``bench/kernels.py`` times both paths.
    """
    return "tiled" if m <= TILED_MAX_ROWS else "dequantize"


# --- wrappers ----------------------------------------------------------------------------

def matmul_group_ordered(x: torch.Tensor, w: GroupOrdered, bias: torch.Tensor | None = None,
                         cfg: MatmulConfig | None = None, batch_path: str | None = None,
                         hold: bool = True) -> torch.Tensor:
    """``x @ W.T + bias`` from the group-ordered layout.

    An act-order weight's permutation is applied to the activations: gathered in the kernel for
    one token, and by one ``index_select`` before it for more (coalesced tile loads instead of a
    scattered gather in every program). The dequantize path writes the weight in group order too
    (contiguous stores; the standalone dequantize scatters its columns back to input order).

    Args:
        x: fp16/bf16 ``[..., K]`` (fp32 works too; its dot runs in tf32 on GPUs).
        w: the weight in group order.
        bias: ``[N]`` or None.
        cfg: launch configuration of the fused kernel (None: the heuristic's; benches pass others
            to compare). Given, the fused kernel runs whatever ``batch_path`` says.
        batch_path: for 16 rows or more, ``"tiled"`` or ``"dequantize"`` (None: :func:`batch_path_for`).
        hold: whether an eager call of fewer than 16 rows with neither ``cfg`` nor ``batch_path``
            is held in ``w.held_calls`` and repeated from there (:class:`~lowbit.kernels.held.HeldCall`);
            False for a layout made for one call.
    Returns:
        ``[..., N]`` in x's dtype, accumulated in fp32.
    """
    key = (held_call_key(x, ACT_ORDER_GEMV_TILE, GATHER_MAX_ROWS, DOT_SWAP)
           if hold and cfg is None and batch_path is None else None)
    if key is not None:
        call = w.held_calls.find(key, (bias,))
        if call is not None:
            return call(input_rows(x))
    k = x.shape[-1]
    n = w.scales.shape[1]
    x2 = input_rows(x)
    m = x2.shape[0]
    check_batch_path(batch_path)
    if cfg is None and m >= 16 and (batch_path or batch_path_for(m)) == "dequantize":
        if w.perm is not None:  # the weight in group order (contiguous stores), x permuted to match
            x2, w = x2.index_select(1, w.perm), dataclasses.replace(w, perm=None)
        weight = dequantize_group_ordered(w, k, x2.dtype)
        b = bias.to(x2.dtype) if bias is not None else None
        return torch.nn.functional.linear(x2, weight, b).reshape(*x.shape[:-1], n)
    perm = w.perm
    if perm is not None and m > GATHER_MAX_ROWS:
        x2, perm = x2.index_select(1, perm), None
    cfg, grid, options = _plan(m, n, k, w.bits, w.group_size, perm is not None, bias is not None, x.dtype, x.device,
                               cfg, DOT_SWAP, ACT_ORDER_GEMV_TILE if perm is not None else None)
    y, ws, locks = output_buffers(cfg, m, n, x, grid[0])
    args = (x2, w.qweight, w.scales, w.qzeros, perm if perm is not None else w.qweight,
            bias if bias is not None else w.scales, y, ws, locks,
            m, n, k, x2.stride(0), n, w.qweight.shape[0], w.qzeros.shape[1])
    launched = launch(_matmul_kernel, grid, *args, **options)
    out_shape = (*x.shape[:-1], n)
    if key is not None and launched is not None and m < 16 and perm is w.perm:  # x2: x's rows, not permuted
        w.held_calls.hold(key, HeldCall(launched, args, 6, out_shape, (bias,)))
    return y.reshape(out_shape)


@functools.lru_cache(maxsize=4096)  # each prefill length is a plan of its own
def _plan(m: int, n: int, k: int, bits: int, group_size: int, has_perm: bool, has_bias: bool, dtype: torch.dtype,
          device: torch.device, cfg: MatmulConfig | None, swap: bool,
          gemv_tile: tuple[int, int] | None = None) -> tuple[MatmulConfig, tuple[int, int], dict]:
    """The launch of :func:`_matmul_kernel` for ``[m, k]`` rows and a ``[n, k]`` weight: its
    configuration (``cfg``, or None for the heuristic's, with ``gemv_tile`` for one token), grid,
    and constexprs with launch options. The module's switches come in as arguments, so the cache
    follows them.
    Cached, so that an eager call skips the tile choice and the options' dict (about 1.6 µs of CPU
    a call here, ``bench/dispatch.py``); callers must not change the dict."""
    block_k, in_group = block_k_for(group_size, k, cfg.block_k if cfg is not None else 128)
    can_swap = in_group and bits != 3
    if cfg is None:
        cfg = launch_config(m, n, k, block_k, device, gemv_tile)
        if swap and can_swap and cfg.block_m >= 16:
            cfg = dataclasses.replace(cfg, swap=True)
    elif cfg.block_k != block_k:
        raise ValueError(f"block_k {cfg.block_k} does not fit group size {group_size} (use {block_k})")
    elif cfg.swap and not can_swap:
        raise ValueError(f"swapped tiles need 2, 4 or 8 bits and tiles inside groups, not {bits} bits in groups of "
                         f"{group_size}")
    elif cfg.swap and cdiv(k, block_k) < cfg.split_k:  # the kernel assumes every split has a K tile
        raise ValueError(f"split_k {cfg.split_k} leaves a split without a K tile ({cdiv(k, block_k)} tiles of "
                         f"{block_k})")
    options = dict(BITS=bits, GROUP=group_size, HAS_PERM=has_perm, HAS_BIAS=has_bias, TILE_IN_GROUP=in_group,
                   SWAP=cfg.swap, **cfg.kernel_options(dtype))
    return cfg, cfg.grid(m, n), options


def dequantize_group_ordered(w: GroupOrdered, k: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype``, columns in the canonical (input) order."""
    n = w.scales.shape[1]
    out = torch.empty(n, k, device=w.qweight.device, dtype=dtype)
    block_n, block_k = 64, 64
    grid = (cdiv(k, block_k), cdiv(n, block_n))
    launch(_dequantize_kernel, grid,
        w.qweight, w.scales, w.qzeros, w.perm if w.perm is not None else w.qweight, out,
        n, k, w.qweight.shape[0], w.qzeros.shape[1],
        BITS=w.bits, GROUP=w.group_size, HAS_PERM=w.perm is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def _ordered(qweight, scales, qzeros, g_idx, bits) -> GroupOrdered:
    w = to_group_ordered(qweight, scales, qzeros, g_idx, bits)
    if w is None:
        raise ValueError("g_idx does not sort into equal contiguous groups; the Triton kernels need that "
                         "(use the reference kernel)")
    return w


def dequantize_int_grouped(qweight, scales, qzeros, g_idx, bits, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.dequantize_int_grouped` (returns ``dtype``, not fp32)."""
    return dequantize_group_ordered(_ordered(qweight, scales, qzeros, g_idx, bits), g_idx.numel(), dtype)


def matmul_int_grouped(x, qweight, scales, qzeros, g_idx, bits, bias=None) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.matmul_int_grouped` (reorders act-order on each call)."""
    return matmul_group_ordered(x, _ordered(qweight, scales, qzeros, g_idx, bits), bias)
