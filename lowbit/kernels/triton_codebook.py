"""Triton kernels for the additive-codebook (AQLM) format: dequantize and fused dequant-matmul.

The weight is read as AQLM stores it (see :mod:`lowbit.formats.codebook`): for output row ``n``
and input column ``k``, ``W[n, k] = scales[n] * sum_c codebooks[c, codes[n, k // IG, c], 0, k % IG]``.
Each program gathers its tile's codewords from the codebooks, so the weight is read once, as
codes, and dequantized in registers. Codebooks of up to :data:`GATHER_MAX` elements (a 2x8 pair,
8 KiB) are loaded into the program once and indexed with ``tl.gather``; larger ones (1x16, 1 MiB)
are read from device memory (L2) per value. The per-row scale multiplies the accumulated product once,
after the K loop. Output groups of one row (``out_group_size == 1``, the published schemes) only.
One to four rows take tabulated codeword products instead (:mod:`lowbit.kernels.triton_codebook_lut`).

Reference twins: :func:`lowbit.kernels.reference.dequantize_codebook` and
:func:`lowbit.kernels.reference.matmul_codebook`, with the same arguments here. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the tests use that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import triton_codebook_lut as tabulated
from lowbit.kernels.held import HeldCall, HeldCalls
from lowbit.kernels.split_k import output_buffers
from lowbit.kernels.triton_common import (
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
def _book_values(books_ptr, table, idx, GATHER: tl.constexpr):
    """fp32 ``books.flatten()[idx]``: from ``table`` (the whole codebooks, loaded once) with
    ``tl.gather``, or one load from device memory per value."""
    if GATHER:
        v = tl.reshape(tl.gather(table, tl.reshape(idx, (idx.numel,)), 0), idx.shape)
    else:
        v = tl.load(books_ptr + idx)
    return v.to(tl.float32)


@triton.jit
def _codewords(codes_ptr, books_ptr, table, rows, cols, mask, GI,
               C: tl.constexpr, SIZE: tl.constexpr, IG: tl.constexpr, GATHER: tl.constexpr):
    """Unscaled fp32 weights at output ``rows`` x input ``cols`` (broadcasting against each other)."""
    group = cols // IG
    within = cols % IG
    code_at = codes_ptr + (rows * GI + group) * C
    w = tl.zeros(mask.shape, dtype=tl.float32)
    for c in tl.static_range(C):
        code = tl.load(code_at + c, mask=mask, other=0).to(tl.int32) & (SIZE - 1)  # signed storage -> index
        w += _book_values(books_ptr, table, (c * SIZE + code) * IG + within, GATHER)  # masked codes are 0: in range
    return w


@triton.jit
def _codeword_tile(codes_ptr, books_ptr, table, offs_n, k0, mask_n, GI,
                   C: tl.constexpr, SIZE: tl.constexpr, IG: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """Unscaled fp32 weights ``[BLOCK_K, BLOCK_N]`` at inputs ``k0 ..`` (``k0`` and ``BLOCK_K``
    multiples of ``IG``, a power of two): each code is loaded once and gathers a whole codeword."""
    groups = k0 // IG + tl.arange(0, BLOCK_K // IG)  # [BG]
    within = tl.arange(0, IG)
    mask = (groups < GI)[:, None] & mask_n[None, :]  # [BG, BN]
    code_at = codes_ptr + (offs_n[None, :] * GI + groups[:, None]) * C
    w = tl.zeros((BLOCK_K // IG, IG, BLOCK_N), dtype=tl.float32)
    for c in tl.static_range(C):
        code = tl.load(code_at + c, mask=mask, other=0).to(tl.int32) & (SIZE - 1)  # [BG, BN]
        w += _book_values(books_ptr, table, (c * SIZE + code[:, None, :]) * IG + within[None, :, None], GATHER)
    return tl.reshape(w, (BLOCK_K, BLOCK_N))


@triton.jit
def _codeword_rows(codes_ptr, books_ptr, table, offs_n, k0, mask_n, GI,
                   C: tl.constexpr, SIZE: tl.constexpr, IG: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """As :func:`_codeword_tile`, output rows first: ``[BLOCK_N, BLOCK_K]``, each row's inputs
    contiguous (for a store along K), each codeword's ``IG`` values adjacent in a thread."""
    groups = k0 // IG + tl.arange(0, BLOCK_K // IG)  # [BG]
    within = tl.arange(0, IG)
    mask = mask_n[:, None] & (groups < GI)[None, :]  # [BN, BG]
    code_at = codes_ptr + (offs_n[:, None] * GI + groups[None, :]) * C
    w = tl.zeros((BLOCK_N, BLOCK_K // IG, IG), dtype=tl.float32)
    for c in tl.static_range(C):
        code = tl.load(code_at + c, mask=mask, other=0).to(tl.int32) & (SIZE - 1)  # [BN, BG]
        w += _book_values(books_ptr, table, (c * SIZE + code[:, :, None]) * IG + within[None, None, :], GATHER)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _matmul_kernel(
    x_ptr, codes_ptr, books_ptr, scales_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, GI, stride_xm,
    C: tl.constexpr, SIZE: tl.constexpr, IG: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr, WHOLE_WORDS: tl.constexpr, TABLE: tl.constexpr, SWAP: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)``; with ``SPLIT_K > 1`` the splits meet in ``ws`` and the
    last one writes y (``_store_output``).

    ``WHOLE_WORDS``: ``IG`` is a power of two dividing ``BLOCK_K`` (see :func:`_codeword_tile`).
    ``TABLE``: the codebooks' element count ``C * SIZE * IG`` to hold them in the program and
    gather from there (:func:`gather_table`), or 0 to load each value from device memory.
    ``SWAP`` (with ``WHOLE_WORDS``): ``tl.dot`` tiles of ``y.T``, the decoded weight the dot's first
    operand (as :func:`lowbit.kernels.triton_int_grouped._matmul_kernel`'s), ``acc`` ``[BLOCK_N, BLOCK_M]``.
    """
    GATHER: tl.constexpr = TABLE > 0
    table = tl.load(books_ptr + tl.arange(0, TABLE if GATHER else 1))
    offs_m, offs_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _accumulator(K, BLOCK_M, BLOCK_N, BLOCK_K, SWAP)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if SWAP:
            w = _codeword_rows(codes_ptr, books_ptr, table, offs_n, k0, mask_n, GI, C, SIZE, IG, BLOCK_K, BLOCK_N,
                               GATHER)  # [BN, BK]
        elif WHOLE_WORDS:
            w = _codeword_tile(codes_ptr, books_ptr, table, offs_n, k0, mask_n, GI, C, SIZE, IG, BLOCK_K, BLOCK_N,
                               GATHER)
        else:
            w = _codewords(codes_ptr, books_ptr, table, offs_n[None, :], offs_k[:, None],
                           mask_k[:, None] & mask_n[None, :], GI, C, SIZE, IG, GATHER)  # [BK, BN]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        if SWAP:
            acc = _dot_weight_first(w, x, acc, DOT_FP32)
        else:
            acc += _product(x, w, BLOCK_M, DOT_FP32)
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SWAP:
        acc = acc * s[:, None]
    else:
        acc = acc * s[None, :]
    _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, acc, offs_m, offs_n, M, N, N, tl.program_id(0), HAS_BIAS, SPLIT_K,
                  SWAP)


@triton.jit
def _dequantize_kernel(codes_ptr, books_ptr, scales_ptr, out_ptr, N, K, GI,
                       C: tl.constexpr, SIZE: tl.constexpr, IG: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TABLE: tl.constexpr,
                       WHOLE_WORDS: tl.constexpr):
    """``out[N, K]``, one ``[BLOCK_N, BLOCK_K]`` tile per program; ``TABLE`` as in
    :func:`_matmul_kernel`. ``WHOLE_WORDS`` (``IG`` a power of two dividing ``BLOCK_K``): each code
    is loaded once and decodes its whole codeword (:func:`_codeword_rows`); otherwise each value
    looks up its own code."""
    GATHER: tl.constexpr = TABLE > 0
    table = tl.load(books_ptr + tl.arange(0, TABLE if GATHER else 1))
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    if WHOLE_WORDS:
        w = _codeword_rows(codes_ptr, books_ptr, table, offs_n, k0, mask_n, GI, C, SIZE, IG, BLOCK_K, BLOCK_N, GATHER)
    else:
        w = _codewords(codes_ptr, books_ptr, table, offs_n[:, None], offs_k[None, :], mask, GI, C, SIZE, IG,
                       GATHER)  # [BN, BK]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], (w * s[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)


def supports(codebooks: torch.Tensor) -> bool:
    """The kernels handle one output row per group (``out_group_size == 1``)."""
    return codebooks.dim() == 4 and codebooks.shape[2] == 1


def _geometry(codes: torch.Tensor, codebooks: torch.Tensor) -> tuple[int, int, int, int, int]:
    if not supports(codebooks):
        raise ValueError(f"the Triton codebook kernels need out_group_size 1, not {codebooks.shape[2]} "
                         "(use the reference kernel)")
    n_codebooks, size, _, ig = codebooks.shape
    n, gi, _ = codes.shape
    return n, gi * ig, gi, n_codebooks, size


def dequantize_codebook(codes, codebooks, scales, dtype: torch.dtype = torch.float16,
                        gather: bool | None = None, whole_words: bool | None = None) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.dequantize_codebook`: ``[N, K]`` in ``dtype``;
    ``gather``: see :func:`gather_table` (None: :data:`DEFAULT_DEQUANT_GATHER`); ``whole_words``:
    decode a codeword per code where the group size allows (None: :data:`DEFAULT_WHOLE_WORDS`)."""
    n, k, gi, n_codebooks, size = _geometry(codes, codebooks)
    out = torch.empty(n, k, device=codes.device, dtype=dtype)
    block_n, block_k = 32, 64
    ig = codebooks.shape[3]
    words = (DEFAULT_WHOLE_WORDS if whole_words is None else whole_words) and ig & (ig - 1) == 0 and ig <= block_k
    launch(_dequantize_kernel, (cdiv(k, block_k), cdiv(n, block_n)),
        codes.contiguous(), codebooks.contiguous(), scales.contiguous(), out, n, k, gi,
        C=n_codebooks, SIZE=size, IG=ig, BLOCK_N=block_n, BLOCK_K=block_k,
        TABLE=gather_table(codebooks, DEFAULT_DEQUANT_GATHER if gather is None else gather), WHOLE_WORDS=words,
        num_warps=4)
    return out


DEFAULT_WHOLE_WORDS = True
"""Whether the dequantize kernel decodes a whole codeword per code (as the tiled matmul does)
rather than a value at a time: on an H100 (``bench/lookup.py``, ``docs/performance.md``) 2x8
dequantized 4.9-5.2x faster so (codebooks read from memory). Eight 32x64 tiles a program, to
share one load of held codebooks, gained nothing beside it and were removed."""

DEFAULT_DEQUANT_GATHER = False
"""Whether the dequantize kernel gathers from held codebooks by default: with whole codewords,
reading them from device memory was 12-16 % faster on an H100 (the matmul kernels gather:
:data:`DEFAULT_GATHER`)."""


GATHER_MAX = 4096
"""The most codebook elements a program holds to gather from (``C * SIZE * IG``: 2x8 with groups
of 8 is 4096, 8 KiB in fp16); larger codebooks (1x16: 1 MiB) are read from device memory."""

DEFAULT_GATHER = True
"""Whether the matmul kernels gather from codebooks held in the program when they fit. On an H100
(``bench/lookup.py``, ``docs/performance.md``) gathering made AQLM 2x8 1.1x faster for one token
and 3.8-4.2x for 16 and 128 rows."""


def gather_table(codebooks: torch.Tensor, gather: bool | None = None) -> int:
    """The kernels' ``TABLE``: the codebooks' element count when they are gathered from (``gather``,
    None: :data:`DEFAULT_GATHER`, and at most :data:`GATHER_MAX` elements), else 0."""
    numel = codebooks.numel()
    want = DEFAULT_GATHER if gather is None else gather
    return numel if want and numel <= GATHER_MAX and numel & (numel - 1) == 0 else 0


DOT_SWAP = False
"""Whether the tiled kernel's ``tl.dot`` tiles (16 rows or more, groups of a power of two) compute
``y.T``, the decoded weight the dot's first operand, as grouped int's ``DOT_SWAP`` (whose docstring
and ``docs/performance.md`` give the sm_90 code's reasons). Not yet timed on a GPU, so off;
``bench/kernels.py`` times it beside the default."""


def batch_path_for(n_codebooks: int) -> str:
    """How 16 rows or more are multiplied: ``"tiled"`` (the fused kernel) for one codebook (1x16),
    ``"dequantize"`` (the weight dequantized to x's dtype, then ``F.linear``) for several (2x8).

    In one H100 run (``docs/performance.md``, "Kernels at the new defaults") 2x8's tiled kernel
    took 46.7 and 87.7 µs at 16 and 128 rows of 4096x4096 (125.1 and 260.1 on 4096x11008), its
    whole-codeword dequantize 30.5 (74.5) and fp16 ``F.linear`` 15.5-16.6 (35.9-37.8): dequantizing
    is ahead everywhere but 16 rows of 4096x4096, where the two are within 1 %. For 1x16 the
    tiled kernel is ahead (68.7 against 94.5 µs for its dequantize alone at 128 rows)."""
    return "tiled" if n_codebooks == 1 else "dequantize"


def matmul_codebook(x, codes, codebooks, scales, bias=None, batch_path: str | None = None,
                    gather: bool | None = None, lut: bool | None = None,
                    held: HeldCalls | None = None) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.matmul_codebook` (fp16/bf16; fp32 runs in tf32 dots).

    Args:
        x: ``[..., K]``; the product accumulates in fp32; the result has x's dtype, ``[..., N]``.
        batch_path: for 16 rows or more (None: :func:`batch_path_for`).
        gather: gather from codebooks held in the program where they fit (:func:`gather_table`).
        lut: few rows multiply through tabulated codeword products
            (:func:`lowbit.kernels.triton_codebook_lut.lut_applies`).
        held: the weight's held calls (the module's): an eager call of fewer than 16 rows with
            none of ``batch_path``, ``gather`` and ``lut`` is held there and repeated from there
            (:class:`~lowbit.kernels.held.HeldCall`; the tabulated path still makes its
            table each call).
    """
    key = (held_call_key(x, *tabulated.switches(), DEFAULT_GATHER, GATHER_MAX, DOT_SWAP)
           if held is not None and batch_path is None and gather is None and lut is None else None)
    sources = (codes, codebooks, scales, bias)
    if key is not None:
        call = held.find(key, sources)
        if call is not None:
            return call(input_rows(x))
    n, k, gi, n_codebooks, size = _geometry(codes, codebooks)
    x2 = input_rows(x)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    # held calls pass the buffers themselves: not copies made contiguous for one call
    key = key if m < 16 and codes.is_contiguous() and codebooks.is_contiguous() and scales.is_contiguous() else None
    if tabulated.lut_applies(m, codebooks, lut):
        y, call = tabulated.matmul_tabulated(x2, codes, codebooks, scales, bias, n, gi, out_shape, sources)
        if key is not None and call is not None:
            held.hold(key, call)
        return y.reshape(out_shape)
    check_batch_path(batch_path)
    if m >= 16 and (batch_path or batch_path_for(n_codebooks)) == "dequantize":
        w = dequantize_codebook(codes, codebooks, scales, dtype=x2.dtype, gather=gather)
        b = bias.to(x2.dtype) if bias is not None else None
        return torch.nn.functional.linear(x2, w, b).reshape(*x.shape[:-1], n)
    block_k = min(128, max(16, next_power_of_2(k)))
    ig = codebooks.shape[3]
    cfg = launch_config(m, n, k, block_k, x.device)
    y, ws, locks = output_buffers(cfg, m, n, x2)
    args = (x2, codes.contiguous(), codebooks.contiguous(), scales.contiguous(),
            bias if bias is not None else scales, y, ws, locks, m, n, k, gi, x2.stride(0))
    words = ig & (ig - 1) == 0 and ig <= block_k
    launched = launch(_matmul_kernel, cfg.grid(m, n), *args,
        C=n_codebooks, SIZE=size, IG=ig, HAS_BIAS=bias is not None, WHOLE_WORDS=words,
        TABLE=gather_table(codebooks, gather), SWAP=DOT_SWAP and words and cfg.block_m >= 16,
        **cfg.kernel_options(x.dtype),
    )
    if key is not None and launched is not None:
        held.hold(key, HeldCall(launched, args, 5, out_shape, sources))
    return y.reshape(out_shape)
