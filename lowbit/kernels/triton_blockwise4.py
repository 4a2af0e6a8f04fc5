"""Triton kernels for bitsandbytes' 4-bit format (NF4/FP4): dequantize and fused dequant-matmul.

The weight is read as bitsandbytes stores it (see :mod:`lowbit.formats.blockwise4`): the
row-major ``[N, K]`` codes as one stream of nibbles, element ``i`` in byte ``i // 2`` (even
elements in the high nibble), scaled by ``absmax[i // blocksize]``. With double quant the
absmax is decoded in the kernel: ``nested_quant_map[code] * nested_absmax[b // 256] +
nested_offset``. The 16-entry code table is read one of two ways (``LOOKUPS``; see
:func:`_decode`). Reference twins: :func:`lowbit.kernels.reference.dequantize_blockwise4` and
:func:`lowbit.kernels.reference.matmul_blockwise4`, with the same arguments here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import prmt
from lowbit.kernels.held import HeldCall, HeldCalls
from lowbit.kernels.split_k import output_buffers
from lowbit.kernels.triton_common import (
    INTERPRET,
    MatmulConfig,
    _accumulator,
    _dot_weight_first,
    _output_tile,
    _product,
    _store_output,
    cdiv,
    check_batch_path,
    device_sms,
    held_call_key,
    input_rows,
    launch,
    launch_config,
    split_for,
)


LOOKUPS = ("global", "gather")
"""How the kernels read the 16-entry code table (the ``LOOKUP`` constexpr is the index here):
``global``, a load from the table in device memory per value; ``gather``, the table loaded
once per program and indexed with ``tl.gather`` (warp shuffles on an H100). Two others lost to
these on an H100 and were removed: a tree of 15 selects, and for one token a 256-entry table of
both codes' values per byte (0.67-0.71x the one-token default, ``docs/performance.md``)."""

GEMV_LOOKUPS = (*LOOKUPS, "prmt")
"""The one-token kernel's lookups: also ``prmt``, four codes a byte permutation from the table
rounded to fp16 (:mod:`lowbit.kernels.prmt`; PTX, so NVIDIA GPUs only). Not the default: on an
H100 (2026-11-27) it took 12.8 µs against the gather's 14.4 on 4096x4096, but 27.9 against 27.0
on 4096x11008."""

PRMT_ASM = tl.constexpr(prmt.ptx())
PRMT_CONSTRAINTS = tl.constexpr(prmt.constraints())


@triton.jit
def _table(qmap_ptr):
    """The code table, fp32 ``[16]``, for :func:`_decode`'s ``gather`` (where that is not the lookup,
    the value is unused and the compiler drops the load)."""
    return tl.load(qmap_ptr + tl.arange(0, 16))


@triton.jit
def _decode(qmap_ptr, table, code, AXIS: tl.constexpr, LOOKUP: tl.constexpr):
    """fp32 ``qmap[code]`` for int32 codes in [0, 16) of a 2-D tile; ``table`` from :func:`_table`.

    ``gather`` indexes the table broadcast along the tile's other axis (``tl.gather`` takes a
    source of the index's rank), ``AXIS`` being the one the codes index.
    """
    if LOOKUP == 1:
        if AXIS == 0:
            src = tl.broadcast_to(table[:, None], (16, code.shape[1]))
        else:
            src = tl.broadcast_to(table[None, :], (code.shape[0], 16))
        return tl.gather(src, code, AXIS)
    else:
        return tl.load(qmap_ptr + code)


@triton.jit
def _prmt_planes(qmap_ptr):
    """The code table's byte planes for :func:`_decode_prmt`: eight int32 scalars ``L0..L3,
    H0..H3``, the low and high bytes of the 16 values in fp16, four a word (as
    :func:`lowbit.kernels.prmt.planes`)."""
    idx = tl.arange(0, 16)
    bits = tl.load(qmap_ptr + idx).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    shift = 8 * (idx % 4)
    lo = tl.sum(tl.reshape((bits & 0xFF) << shift, (4, 4)), axis=1)  # disjoint bytes: the sum is their OR
    hi = tl.sum(tl.reshape((bits >> 8) << shift, (4, 4)), axis=1)
    r = tl.arange(0, 4)
    return (tl.sum(tl.where(r == 0, lo, 0)), tl.sum(tl.where(r == 1, lo, 0)), tl.sum(tl.where(r == 2, lo, 0)),
            tl.sum(tl.where(r == 3, lo, 0)), tl.sum(tl.where(r == 0, hi, 0)), tl.sum(tl.where(r == 1, hi, 0)),
            tl.sum(tl.where(r == 2, hi, 0)), tl.sum(tl.where(r == 3, hi, 0)))


@triton.jit
def _decode_prmt(raw, planes):
    """fp16 table values of the high and low nibble of each uint8 in ``raw`` (a tensor of packed
    bytes), by :data:`PRMT_ASM` four bytes at a time; ``planes`` from :func:`_prmt_planes`."""
    return tl.inline_asm_elementwise(PRMT_ASM, PRMT_CONSTRAINTS, [raw, planes[0], planes[1], planes[2], planes[3],
                                     planes[4], planes[5], planes[6], planes[7]],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _values(w_ptr, absmax_ptr, qmap_ptr, table, nabs_ptr, nmap_ptr, noff_ptr, i, mask,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOOKUP: tl.constexpr):
    """fp32 weight values at flat element indices ``i`` (int64, ``[BK, BN]``); nested blocks are 256."""
    byte = tl.load(w_ptr + (i >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (i & 1)) * 4).to(tl.int32)) & 15
    value = _decode(qmap_ptr, table, code, 0, LOOKUP)
    return value * _block_scale(absmax_ptr, nabs_ptr, nmap_ptr, noff_ptr, i // BLOCKSIZE, mask, NESTED)


@triton.jit
def _block_scale(absmax_ptr, nabs_ptr, nmap_ptr, noff_ptr, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of blocks ``block`` (decoded from its 8-bit code with double quant)."""
    if NESTED:
        acode = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = (tl.load(nmap_ptr + acode, mask=mask, other=0.0)
                 * tl.load(nabs_ptr + block // 256, mask=mask, other=0.0) + tl.load(noff_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _row_codes(w_ptr, row, k0, K, mask_n, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes of weights ``k0 .. k0 + BLOCK_K`` of the rows starting at flat ``row`` [BN], as int32
    ``[BLOCK_K, BLOCK_N]``; ``K`` and ``k0`` even, so each byte (two codes) is loaded once."""
    pairs = tl.arange(0, BLOCK_K // 2)
    mask = (k0 + 2 * pairs < K)[:, None] & mask_n[None, :]
    byte = tl.load(w_ptr + (row[None, :] + k0) // 2 + pairs[:, None], mask=mask, other=0).to(tl.int32)
    shifts = 4 - 4 * tl.arange(0, 2)  # even element in the high nibble
    codes = (byte[:, None, :] >> shifts[None, :, None]) & 15  # [BK/2, 2, BN]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _row_codes_t(w_ptr, offs_n, k0, K, mask_n, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_row_codes` of rows ``offs_n`` as ``[BLOCK_N, BLOCK_K]``: each row's bytes loaded along K
    (its ``K // 2`` bytes, so loads are as wide as K's divisibility allows) and split with
    ``tl.join``, so a thread holds consecutive codes of one row (the K-contiguous tile
    :func:`~lowbit.kernels.triton_common._dot_weight_first` takes)."""
    pairs = tl.arange(0, BLOCK_K // 2)
    mask = mask_n[:, None] & (k0 + 2 * pairs < K)[None, :]
    at = w_ptr + offs_n[:, None].to(tl.int64) * (K // 2) + k0 // 2 + pairs[None, :]
    byte = tl.load(at, mask=mask, other=0).to(tl.int32)  # [BN, BK/2]
    return tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_N, BLOCK_K))  # even element: the high nibble


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr, ROW_BLOCKS: tl.constexpr, LOOKUP: tl.constexpr, SWAP: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)``; with ``SPLIT_K > 1`` the splits meet in ``ws`` and the
    last one writes y (``_store_output``).

    ``ROW_BLOCKS``: ``K`` is a multiple of ``BLOCKSIZE == BLOCK_K``, so each tile column is one
    block: codes are read a byte at a time and the block's scale multiplies after the product.
    Otherwise blocks may straddle rows and every value is decoded with its own scale.

    ``SWAP`` (with ``ROW_BLOCKS``): ``tl.dot`` tiles of ``y.T``, the decoded and scaled weight the
    dot's first operand (as :func:`lowbit.kernels.triton_int_grouped._matmul_kernel`'s), ``acc``
    ``[BLOCK_N, BLOCK_M]``.
    """
    offs_m, offs_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row = offs_n.to(tl.int64) * K  # [BN] flat index of each output row's first weight
    acc = _accumulator(K, BLOCK_M, BLOCK_N, BLOCK_K, SWAP)
    table = _table(qmap_ptr)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        if ROW_BLOCKS and SWAP:
            codes = _row_codes_t(w_ptr, offs_n, k0, K, mask_n, BLOCK_K, BLOCK_N)
            v = _decode(qmap_ptr, table, codes, 1, LOOKUP)  # [BN, BK]
            scale = _block_scale(absmax_ptr, nabs_ptr, nmap_ptr, noff_ptr, (row + k0) // BLOCKSIZE, mask_n, NESTED)
            acc = _dot_weight_first(v * scale[:, None], x, acc, DOT_FP32)
        elif ROW_BLOCKS:
            codes = _row_codes(w_ptr, row, k0, K, mask_n, BLOCK_K, BLOCK_N)
            v = _decode(qmap_ptr, table, codes, 0, LOOKUP)  # [BK, BN]; codes < 16, always in the table
            scale = _block_scale(absmax_ptr, nabs_ptr, nmap_ptr, noff_ptr, (row + k0) // BLOCKSIZE, mask_n, NESTED)
            acc += _product(x, v, BLOCK_M, DOT_FP32) * scale[None, :]
        else:
            i = row[None, :] + offs_k[:, None]  # [BK, BN]
            w = _values(w_ptr, absmax_ptr, qmap_ptr, table, nabs_ptr, nmap_ptr, noff_ptr, i,
                        mask_k[:, None] & mask_n[None, :], BLOCKSIZE, NESTED, LOOKUP)
            acc += _product(x, w, BLOCK_M, DOT_FP32)
    _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, acc, offs_m, offs_n, M, N, N, tl.program_id(0), HAS_BIAS, SPLIT_K,
                  SWAP)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, N, K,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, LOOKUP: tl.constexpr, STEP_BLOCKS: tl.constexpr,
):
    """``y[N] = W @ x[K] (+ bias)`` for one token, ``K`` a multiple of ``BLOCKSIZE`` (each row a
    whole number of blocks); with ``SPLIT_K > 1`` the splits meet in ``ws`` and the last one writes y.

    A program walks ``BLOCK_N`` rows ``STEP_BLOCKS`` blocks at a time: a row's ``STEP_BLOCKS *
    BLOCKSIZE / 2`` bytes are one contiguous load, x's matching inputs one contiguous load split
    into even (high nibble) and odd (low nibble) inputs in registers (``tl.split``), and the
    blocks' scales one ``[BLOCK_N, STEP_BLOCKS]`` load. Products accumulate in an fp32 tile,
    summed once after the loop."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    WIDTH: tl.constexpr = STEP_BLOCKS * HALF  # bytes of a row per step
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    j = tl.arange(0, WIDTH)
    nb = tl.arange(0, STEP_BLOCKS)
    blocks_per_row = K // BLOCKSIZE
    first = offs_n.to(tl.int64) * blocks_per_row  # [BN] each row's first block
    acc = tl.zeros((BLOCK_N, STEP_BLOCKS, HALF), dtype=tl.float32)
    table = _table(qmap_ptr)
    if LOOKUP == 2:
        planes = _prmt_planes(qmap_ptr)
    for b0 in range(tl.program_id(1) * STEP_BLOCKS, blocks_per_row, STEP_BLOCKS * SPLIT_K):
        in_row = b0 + j // HALF < blocks_per_row  # [WIDTH]
        raw = tl.load(w_ptr + (first[:, None] + b0) * HALF + j[None, :], mask=mask_n[:, None] & in_row[None, :],
                      other=0)  # [BN, WIDTH] uint8
        offs_x = b0 * BLOCKSIZE + tl.arange(0, 2 * WIDTH)  # the inputs of this step's bytes
        xs = tl.load(x_ptr + offs_x, mask=offs_x < K, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(xs, (WIDTH, 2)))  # [WIDTH] each
        if LOOKUP == 2:
            v_hi, v_lo = _decode_prmt(raw, planes)
            v = v_hi.to(tl.float32) * x_even[None, :] + v_lo.to(tl.float32) * x_odd[None, :]
        else:
            byte = raw.to(tl.int32)
            v = (_decode(qmap_ptr, table, byte >> 4, 1, LOOKUP) * x_even[None, :]
                 + _decode(qmap_ptr, table, byte & 15, 1, LOOKUP) * x_odd[None, :])
        blk = b0 + nb
        scale = _block_scale(absmax_ptr, nabs_ptr, nmap_ptr, noff_ptr, first[:, None] + blk[None, :],
                             mask_n[:, None] & (blk < blocks_per_row)[None, :], NESTED)  # [BN, NB]
        acc += tl.reshape(v, (BLOCK_N, STEP_BLOCKS, HALF)) * scale[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, y[None, :], tl.arange(0, 1), offs_n, 1, N, N, tl.program_id(0),
                  HAS_BIAS, SPLIT_K)


@triton.jit
def _dequantize_kernel(w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, out_ptr, numel,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
                       LOOKUP: tl.constexpr):
    """``out`` for ``BLOCKS`` whole blocks (``BLOCKSIZE`` even; the last block may be short): each
    byte is loaded once, each block's scale decoded once; the high (even) and low (odd) nibbles'
    values are interleaved in registers and stored as one contiguous run per block."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [NB]
    byte_at = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [NB, HALF]
    byte = tl.load(w_ptr + byte_at, mask=2 * byte_at < numel, other=0).to(tl.int32)
    scale = _block_scale(absmax_ptr, nabs_ptr, nmap_ptr, noff_ptr, blocks, blocks * BLOCKSIZE < numel, NESTED)
    table = _table(qmap_ptr)
    hi = _decode(qmap_ptr, table, byte >> 4, 1, LOOKUP) * scale[:, None]
    lo = _decode(qmap_ptr, table, byte & 15, 1, LOOKUP) * scale[:, None]
    values = tl.reshape(tl.join(hi, lo), (BLOCKS, BLOCKSIZE))  # [NB, HALF, 2] -> element 2h is hi, 2h+1 lo
    i = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [NB, BLOCKSIZE] flat index
    tl.store(out_ptr + i, values.to(out_ptr.dtype.element_ty), mask=i < numel)


DEFAULT_LOOKUP = {"gemv": "gather", "tiled": "gather", "dequantize": "global"}
"""The lookup each kernel takes when none is named, from ``bench/lookup.py`` on an H100
(``docs/performance.md``): ``gather`` makes the tiled kernel 1.35-1.4x faster at 16 rows and
4.7-5x at 128, and the one-token kernel 1.05-1.34x; it is 3-5 % slower in the dequantize kernel."""


def lookup_index(lookup: str | None, kernel: str) -> int:
    """The ``LOOKUP`` constexpr for ``lookup`` in ``kernel`` (None: :data:`DEFAULT_LOOKUP`)."""
    lookup = lookup or DEFAULT_LOOKUP[kernel]
    allowed = GEMV_LOOKUPS if kernel == "gemv" else LOOKUPS
    if lookup not in allowed:
        only = " (prmt: the one-token kernel only, one row of whole blocks)" if lookup == "prmt" else ""
        raise ValueError(f"lookup must be one of {allowed}, not {lookup!r}{only}")
    if lookup == "prmt" and (INTERPRET or torch.version.hip):
        raise ValueError("lookup='prmt' is PTX: it runs on NVIDIA GPUs, not under the Triton interpreter or ROCm")
    return GEMV_LOOKUPS.index(lookup)


def _operands(weight, absmax, nested_absmax, nested_quant_map, nested_offset):
    """Pointers for the kernels: the packed bytes as uint8, and placeholders where not nested."""
    w = weight.reshape(-1).view(torch.uint8)
    nested = nested_absmax is not None
    if not nested:
        return w, (absmax, absmax, absmax), False
    return w, (nested_absmax, nested_quant_map, nested_offset.reshape(1)), True


def dequantize_blockwise4(weight, absmax, quant_map, blocksize, shape, nested_absmax=None, nested_quant_map=None,
                          nested_offset=None, dtype: torch.dtype = torch.float16,
                          lookup: str | None = None) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.dequantize_blockwise4`: ``[N, K]`` in ``dtype``;
    ``lookup``: one of :data:`LOOKUPS` (None: the kernel's :data:`DEFAULT_LOOKUP`)."""
    table_lookup = lookup_index(lookup, "dequantize")
    w, nested_ptrs, nested = _operands(weight, absmax, nested_absmax, nested_quant_map, nested_offset)
    numel = shape[0] * shape[1]
    out = torch.empty(shape, device=w.device, dtype=dtype)
    blocks = max(1, 2048 // blocksize)  # blocksize: a power of two (BLOCKSIZES)
    launch(_dequantize_kernel, (cdiv(numel, blocks * blocksize),),
        w, absmax, quant_map, *nested_ptrs, out, numel, BLOCKSIZE=blocksize, NESTED=nested, BLOCKS=blocks,
        LOOKUP=table_lookup, num_warps=4)
    return out


GEMV_STEP_BYTES = 128
"""Bytes of each row a one-token step loads (4 blocks of 64 codes; one block of 256). On an H100
this step with the gathered table ran 1.05-1.34x faster than one block of 64 a step with x read
as two strided halves (``docs/performance.md``), which it replaced."""


def gemv_step_blocks(blocksize: int) -> int:
    """Blocks of each row per one-token step: :data:`GEMV_STEP_BYTES` worth, at least one."""
    return max(1, GEMV_STEP_BYTES // (blocksize // 2))


GEMV_WARPS = 4
"""Warps of a one-token program. With the gathered table and 128-byte steps the sm_90 code takes
168 registers a thread at 4 warps (3 programs, 12 warps a multiprocessor) and 128 at 8 (16 warps),
where the grouped-int GEMV that reaches the read probe takes 51 at 2 (``bench/ptx.py``);
``bench/lookup.py`` times 8 warps and 64-byte steps beside the default, not yet run."""


def _gemv_config(n: int, k: int, blocksize: int, device: torch.device, step_blocks: int) -> MatmulConfig:
    """Launch of the GEMV kernel: 64 rows a program, :data:`GEMV_WARPS` warps, K split until about
    8 programs per multiprocessor or two steps of ``step_blocks`` blocks per split."""
    split = split_for(cdiv(n, 64), cdiv(k // blocksize, step_blocks), device_sms(device), 8, 16, steps_per_split=2)
    return MatmulConfig(1, 64, blocksize, split, GEMV_WARPS, 3)


DOT_SWAP = False
"""Whether the ``tl.dot`` tiles (16 rows or more, rows of whole blocks) compute ``y.T``, the decoded
and scaled weight the dot's first operand, as grouped int's ``DOT_SWAP`` (whose docstring and
``docs/performance.md`` give the sm_90 code's reasons). Not yet timed on a GPU, so off;
``bench/kernels.py`` times it beside the default at 16 rows and, with the tiled path forced, above."""


def batch_path_for(m: int) -> str:
    """How ``m >= 16`` rows are multiplied: ``"tiled"`` (the fused kernel) at 16 rows,
    ``"dequantize"`` (the weight dequantized to the compute dtype, then ``F.linear``) above. On an
    H100 (``docs/performance.md``) the two were within 12 % of each other at 16 rows (each ahead on
    one of two shapes); at 128 rows the dequantize path took 29 µs on 4096x4096 against 80 µs for
    the tiled kernel, whose cost grows with the rows."""
    return "tiled" if m <= 16 else "dequantize"


def matmul_blockwise4(x, weight, absmax, quant_map, blocksize, shape, nested_absmax=None, nested_quant_map=None,
                      nested_offset=None, bias=None, compute_dtype=None, batch_path: str | None = None,
                      lookup: str | None = None, held: HeldCalls | None = None) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.matmul_blockwise4` (fp16/bf16 compute).

    One token with rows of whole blocks takes the GEMV kernel; 16 rows or more take
    ``batch_path`` (None: :func:`batch_path_for`); other shapes the tiled kernel. ``lookup``:
    how the code table is read, one of :data:`LOOKUPS` (None: each kernel's :data:`DEFAULT_LOOKUP`).

    Args:
        x: ``[..., K]``; cast to ``compute_dtype`` (None: x's dtype) for the product, which
            accumulates in fp32; the result has x's dtype, shape ``[..., N]``.
        held: the weight's held calls (the module's): an eager call of fewer than 16 rows with
            neither ``batch_path`` nor ``lookup`` is held there and repeated from there
            (:class:`~lowbit.kernels.held.HeldCall`).
    """
    n, k = shape
    dtype = compute_dtype or x.dtype
    key = (held_call_key(x, dtype, blocksize, n, k, GEMV_STEP_BYTES, GEMV_WARPS, DEFAULT_LOOKUP["gemv"],
                         DEFAULT_LOOKUP["tiled"], DOT_SWAP)
           if held is not None and batch_path is None and lookup is None else None)
    if key is not None:
        sources = (weight, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, bias)
        viewed = (weight, nested_offset)  # passed as views (:func:`_operands`)
        call = held.find(key, sources, viewed)
        if call is not None:
            y = call(input_rows(x, dtype))
            return y if y.dtype == x.dtype else y.to(x.dtype)
    x2 = input_rows(x, dtype)
    m = x2.shape[0]
    check_batch_path(batch_path)
    if m >= 16 and (batch_path or batch_path_for(m)) == "dequantize":
        w = dequantize_blockwise4(weight, absmax, quant_map, blocksize, shape, nested_absmax, nested_quant_map,
                                  nested_offset, dtype=dtype, lookup=lookup)
        y = torch.nn.functional.linear(x2, w, bias.to(dtype) if bias is not None else None)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    w, nested_ptrs, nested = _operands(weight, absmax, nested_absmax, nested_quant_map, nested_offset)
    row_blocks = k % blocksize == 0 and blocksize <= 256
    if m == 1 and row_blocks:
        step = gemv_step_blocks(blocksize)
        cfg = _gemv_config(n, k, blocksize, x.device, step)
        y, ws, locks = output_buffers(cfg, m, n, x2)
        args = (x2, w, absmax, quant_map, *nested_ptrs, bias if bias is not None else quant_map, y, ws, locks, n, k)
        launched = launch(_gemv_kernel, cfg.grid(m, n), *args,
            BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
            SPLIT_K=cfg.split_k, LOOKUP=lookup_index(lookup, "gemv"), STEP_BLOCKS=step, num_warps=cfg.num_warps)
    else:
        cfg = launch_config(m, n, k, blocksize if row_blocks else 64, x.device)
        y, ws, locks = output_buffers(cfg, m, n, x2)
        args = (x2, w, absmax, quant_map, *nested_ptrs, bias if bias is not None else quant_map, y, ws, locks,
                m, n, k, x2.stride(0))
        launched = launch(_matmul_kernel, cfg.grid(m, n), *args,
            BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=bias is not None, ROW_BLOCKS=row_blocks,
            LOOKUP=lookup_index(lookup, "tiled"), SWAP=DOT_SWAP and row_blocks and cfg.block_m >= 16,
            **cfg.kernel_options(dtype),
        )
    out_shape = (*x.shape[:-1], n)
    if key is not None and launched is not None and m < 16:
        held.hold(key, HeldCall(launched, args, 8, out_shape, sources, viewed))  # y is argument 8 of both
    return (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(out_shape)
