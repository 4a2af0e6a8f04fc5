"""Triton kernels for AQLM's product of one to four rows through tabulated codeword products.

For few rows the codes are cheaper to look up than to decode: ``lut[m, g, c * SIZE + s]``, input
group ``g`` of row ``m`` dotted with codeword ``s`` of codebook ``c`` (:func:`codeword_products`,
one small matmul), turns each code into one lookup and one add, and the weight is read once, as
codes. :func:`lowbit.kernels.triton_codebook.matmul_codebook` takes this path where
:func:`lut_applies`; its reference twin is :func:`lowbit.kernels.reference.matmul_codebook`.

By default :func:`_lut_gemv_kernel` gathers each entry from the table in device memory. Two
variants, off until timed on a GPU, hold each program's slices of the table in the program
(:data:`LUT_SLICES`, :func:`_lut_slice_kernel`) and make those slices there from x and the
codebooks (:data:`LUT_SLICE_PRODUCTS`, :func:`_lut_products_kernel`: one launch).
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the tests use that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.held import HeldCall
from lowbit.kernels.split_k import output_buffers
from lowbit.kernels.triton_common import MatmulConfig, _store_output, cdiv, device_sms, launch, split_for


@triton.jit
def _lut_codes(codes_ptr, offs_n, mask_n, j0, J, BLOCK_J: tl.constexpr):
    """Codes ``j0 .. j0 + BLOCK_J`` of rows ``offs_n`` as int32 indices ``[BLOCK_N, BLOCK_J]`` (0 past ``J``)."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    mask = mask_n[:, None] & (offs_j < J)[None, :]
    code = tl.load(codes_ptr + offs_n[:, None] * J + offs_j[None, :], mask=mask, other=0).to(tl.int32)
    return code


@triton.jit
def _slice_sum(table, codes_ptr, offs_n, mask_n, j0, J, SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_J: tl.constexpr):
    """fp32 ``[BLOCK_N]``: each row's sum of its entries for codes ``j0 .. j0 + BLOCK_J``, gathered with
    one ``tl.gather`` from ``table``, that slice's ``BLOCK_J * SIZE`` entries (0 past ``J``)."""
    code = _lut_codes(codes_ptr, offs_n, mask_n, j0, J, BLOCK_J) & (SIZE - 1)  # [BN, BJ]
    index = tl.reshape(tl.arange(0, BLOCK_J)[None, :] * SIZE + code, (BLOCK_N * BLOCK_J,))
    return tl.sum(tl.reshape(tl.gather(table, index, 0), (BLOCK_N, BLOCK_J)).to(tl.float32), axis=1)


@triton.jit
def _store_row(y_ptr, ws_ptr, lock_ptr, b_ptr, y, offs_n, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """fp32 ``y [BLOCK_N]`` (``+ bias``) into row ``m = program_id(2)`` of the ``[M, N]`` output, M the
    programs along axis 2: output tile ``(m, program_id(0))``, whose splits meet as
    :func:`~lowbit.kernels.triton_common._store_output` has them."""
    m = tl.program_id(2)
    _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, y[None, :], m + tl.arange(0, 1), offs_n, tl.num_programs(2), N, N,
                  m * tl.num_programs(0) + tl.program_id(0), HAS_BIAS, SPLIT_K)


@triton.jit
def _lut_gemv_kernel(codes_ptr, lut_ptr, scales_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, N, GI,
                     C: tl.constexpr, SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr):
    """``y[m, n] = scales[n] * sum_(g, c) lut[m, g, c, codes[n, g, c]]`` for the rows ``m`` of axis 2.

    ``lut[m, g, c, s]`` is the dot product of input group ``g`` of row ``m`` with codeword ``s`` of
    codebook ``c`` (:func:`codeword_products`), so each code costs one lookup and one add instead
    of a codeword's worth of lookups and multiply-adds. A row's codes ``[GI, C]`` are contiguous;
    ``j = g * C + c`` walks them ``BLOCK_J`` at a time, and ``lut[m].flatten()[j * SIZE + code]`` is
    the entry. With ``SPLIT_K > 1`` the splits of output tile ``(m, program_id(0))`` meet in
    ``ws[SPLIT_K, M, N]`` and the last one writes y (:func:`_store_output`).

    The lookups of a step need its codes, so a step waits on two dependent loads. ``PREFETCH``
    loads the next step's codes before this step's lookups, so that their latency overlaps.
    """
    m = tl.program_id(2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    J = GI * C
    STRIDE: tl.constexpr = BLOCK_J * SPLIT_K
    lut_row = lut_ptr + m.to(tl.int64) * J * SIZE
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    code = _lut_codes(codes_ptr, offs_n, mask_n, tl.program_id(1) * BLOCK_J, J, BLOCK_J)
    for j0 in range(tl.program_id(1) * BLOCK_J, J, STRIDE):
        if PREFETCH:
            ahead = _lut_codes(codes_ptr, offs_n, mask_n, j0 + STRIDE, J, BLOCK_J)
        else:
            code = _lut_codes(codes_ptr, offs_n, mask_n, j0, J, BLOCK_J)
            ahead = code
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask = mask_n[:, None] & (offs_j < J)[None, :]
        index = offs_j[None, :] * SIZE + (code & (SIZE - 1))  # signed storage -> index
        acc += tl.load(lut_row + index, mask=mask, other=0.0).to(tl.float32)
        code = ahead
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_row(y_ptr, ws_ptr, lock_ptr, b_ptr, tl.sum(acc, axis=1) * s, offs_n, N, HAS_BIAS, SPLIT_K)


@triton.jit
def _lut_slice_kernel(codes_ptr, lut_ptr, scales_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, N, GI,
                      C: tl.constexpr, SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr):
    """:func:`_lut_gemv_kernel`'s product with each program's slice of the table held in the
    program: for ``BLOCK_J`` codes of its rows at a time it loads their ``BLOCK_J * SIZE`` table
    entries once (contiguous), then gathers every code's entry from there with one ``tl.gather``,
    which Triton places in shared memory (``bench/ptx.py``; each ``tl.gather`` stores its table
    there again, so a slice takes one), rather than from device memory. Slices ``program_id(1), +
    SPLIT_K, ...`` of the ``J = GI * C`` codes are this program's; the splits meet as in
    :func:`_lut_gemv_kernel`."""
    m = tl.program_id(2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    J = GI * C
    lut_row = lut_ptr + m.to(tl.int64) * J * SIZE
    entries = tl.arange(0, BLOCK_J * SIZE)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(tl.program_id(1) * BLOCK_J, J, BLOCK_J * SPLIT_K):
        table = tl.load(lut_row + j0 * SIZE + entries, mask=entries < (J - j0) * SIZE, other=0.0)  # past J: 0
        acc += _slice_sum(table, codes_ptr, offs_n, mask_n, j0, J, SIZE, BLOCK_N, BLOCK_J)
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_row(y_ptr, ws_ptr, lock_ptr, b_ptr, acc * s, offs_n, N, HAS_BIAS, SPLIT_K)


@triton.jit
def _lut_products_kernel(codes_ptr, x_ptr, books_ptr, scales_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, N, GI, stride_xm,
                         C: tl.constexpr, SIZE: tl.constexpr, IG: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr, EXACT: tl.constexpr):
    """:func:`_lut_slice_kernel` with each slice's products made in the program: the slice's
    ``BLOCK_J // C`` input groups of row ``m`` (``IG <= 16`` inputs each, padded with zeros to 16)
    times every codeword, one ``tl.dot`` of ``[BLOCK_J // C, 16] @ [16, C * SIZE]`` whose result,
    flattened, is the slice's table (entry ``(g * C + c) * SIZE + s``). So no table is written to or
    read from memory, and the call is one launch. ``EXACT``: the dot in fp32 (bf16 and fp32 inputs,
    as :func:`codeword_products` makes their table); fp16 inputs multiply in fp16 with fp32 sums."""
    m = tl.program_id(2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    J = GI * C
    G: tl.constexpr = BLOCK_J // C
    inputs = tl.arange(0, 16)
    words = tl.arange(0, C * SIZE)
    books = tl.load(books_ptr + words[None, :] * IG + inputs[:, None], mask=(inputs < IG)[:, None], other=0.0)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(tl.program_id(1) * BLOCK_J, J, BLOCK_J * SPLIT_K):
        groups = j0 // C + tl.arange(0, G)
        xg = tl.load(x_row + groups[:, None] * IG + inputs[None, :],
                     mask=(groups < GI)[:, None] & (inputs < IG)[None, :], other=0.0)  # [G, 16]; past GI: 0
        if EXACT:
            products = tl.dot(xg.to(tl.float32), books.to(tl.float32), input_precision="ieee")
        else:
            products = tl.dot(xg, books.to(xg.dtype))  # [G, C * SIZE]
        acc += _slice_sum(tl.reshape(products, (BLOCK_J * SIZE,)), codes_ptr, offs_n, mask_n, j0, J, SIZE, BLOCK_N,
                          BLOCK_J)
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_row(y_ptr, ws_ptr, lock_ptr, b_ptr, acc * s, offs_n, N, HAS_BIAS, SPLIT_K)


LUT_MAX_SIZE = 256
"""The largest codebook (entries) whose codeword products are tabulated: 2x8's 256. A 1x16
codebook's 65,536 products per input group would outweigh the codes they replace."""

LUT_MAX_ROWS = 4
"""The most input rows that take the tabulated path: its table, ``rows * K / in_group * C * SIZE``
values, grows with the rows while the codes it saves reading do not (for 2x8 and N = 4096, one
row's fp16 table is an eighth of the codes' bytes)."""

DEFAULT_LUT = True
"""Whether rows up to :data:`LUT_MAX_ROWS` take the tabulated path by default: for one token on
an H100 (``bench/lookup.py``, ``docs/performance.md``) it took 17.8 µs against the gathering
GEMV's 18.4 on 4096x4096, and 21.8 against 42.6 on 4096x11008."""


def lut_applies(m: int, codebooks: torch.Tensor, lut: bool | None = None) -> bool:
    """Whether ``m`` rows multiply through tabulated codeword products (``lut``; None: :data:`DEFAULT_LUT`)."""
    want = DEFAULT_LUT if lut is None else lut
    return bool(want) and m <= LUT_MAX_ROWS and codebooks.shape[1] <= LUT_MAX_SIZE


def codeword_products(x2: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """``lut[m, g, c * SIZE + s]``: input group ``g`` of row ``m`` (``in_group`` values) dotted with
    codeword ``s`` of codebook ``c``, as one ``[M * GI, IG] @ [IG, C * SIZE]`` matmul. fp16 inputs
    give an fp16 table (fp32 accumulation inside the matmul), others fp32."""
    n_codebooks, size, _, ig = codebooks.shape
    dtype = torch.float16 if x2.dtype == torch.float16 else torch.float32
    books = codebooks.reshape(n_codebooks * size, ig).to(dtype)
    return (x2.reshape(-1, ig).to(dtype) @ books.t()).reshape(x2.shape[0], -1, n_codebooks * size)


LUT_BLOCK_J = 64
"""Codes a row of :func:`_lut_gemv_kernel` takes a step (``BLOCK_J``), 16 rows a program. On an H100
(2026-11-27, ``bench/kernels.py``, one token, graphs, cold L2, µs on 4096x4096 / 4096x11008), with
the next step's codes loaded ahead (:data:`LUT_PREFETCH`): 64 codes 16.8 / 21.3, 256 codes 18.7 /
39.9; without: 32 codes 19.4 / 26.8, 64 codes 17.3 / 22.6, 128 codes 18.2 / 20.6."""

LUT_PREFETCH = True
"""Whether :func:`_lut_gemv_kernel` loads the next step's codes before this step's lookups (3-6 %
faster at 64 codes a step in the run above)."""


def _lut_config(m: int, n: int, j: int, device: torch.device, block_j: int | None = None) -> MatmulConfig:
    """Launch of :func:`_lut_gemv_kernel` over ``j`` codes a row: 16 rows by ``block_j`` codes a step
    (None: :data:`LUT_BLOCK_J`), 4 warps, K split while the programs stay under about 4 a
    multiprocessor and every split keeps a step."""
    block_n, block_j = 16, block_j or LUT_BLOCK_J
    split = split_for(cdiv(n, block_n) * m, cdiv(j, block_j), device_sms(device), 4, 8)
    return MatmulConfig(1, block_n, block_j, split, 4, 1)


LUT_SLICES = False
"""Whether the tabulated path gathers from slices of the table held in each program
(:func:`_lut_slice_kernel`) rather than from device memory (:func:`_lut_gemv_kernel`). A gather from
device memory reads a 32-byte sector for each 2-byte entry: for one token of a 2x8 4096x4096
weight, 2M lookups move about 64 MiB from L2, against 4 MiB of codes. The slices move about twice
the codes' bytes (a slice's table is ``2 * SIZE`` bytes a code against ``BLOCK_N`` rows of
codes). Not yet timed on a GPU, so off; ``bench/kernels.py`` times it beside the default."""

LUT_SLICE_ROWS = 256
"""Rows a program of :func:`_lut_slice_kernel` takes (8 warps): each slice's table, loaded once, serves them all."""

LUT_SLICE_BYTES = 1 << 16
"""The most bytes of table a program of :func:`_lut_slice_kernel` holds (64 KiB, in shared memory)."""


def _lut_slice_config(m: int, n: int, j: int, size: int, entry_bytes: int, device: torch.device) -> MatmulConfig:
    """Launch of :func:`_lut_slice_kernel` over ``j`` codes a row and a table of ``size`` entries a
    code (``entry_bytes`` each): :data:`LUT_SLICE_ROWS` rows a program (8 warps), slices of up to 64
    codes within :data:`LUT_SLICE_BYTES` (``block_k``), split over programs while they stay under 2
    a multiprocessor, up to 16 ways."""
    block_j = min(64, LUT_SLICE_BYTES // (size * entry_bytes))
    split = split_for(cdiv(n, LUT_SLICE_ROWS) * m, cdiv(j, block_j), device_sms(device), 2, 16)
    return MatmulConfig(1, LUT_SLICE_ROWS, block_j, split, 8, 1)


LUT_SLICE_PRODUCTS = False
"""With :data:`LUT_SLICES`, whether each program makes its slices' products itself, from x and the
codebooks (:func:`_lut_products_kernel`, where :func:`products_in_program` applies): one launch, no
table written to or read from memory, and no matmul launch before it. Not yet timed on a GPU, so
off; ``bench/kernels.py`` times it beside the default."""


def products_in_program(codebooks: torch.Tensor) -> bool:
    """Whether :func:`_lut_products_kernel` takes these codebooks: groups of up to 16 inputs, and a
    power-of-two count of codebooks of which a slice of 64 codes holds at least 16 groups (``tl.dot``'s
    least M)."""
    n_codebooks, _size, _, ig = codebooks.shape
    return ig <= 16 and n_codebooks & (n_codebooks - 1) == 0 and 64 // n_codebooks >= 16


class HeldTabulated(HeldCall):
    """The tabulated one-token path, held: each call makes its table of codeword products from its
    rows (:func:`codeword_products`, with the codebooks the call was made from), then launches."""

    __slots__ = ()

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return super().__call__(codeword_products(x2, self.sources[1]))  # sources: codes, codebooks, ...


def matmul_tabulated(x2, codes, codebooks, scales, bias, n: int, gi: int, out_shape: tuple,
                     sources: tuple) -> tuple[torch.Tensor, HeldCall | None]:
    """The tabulated product of rows ``x2`` (``[M, K]``, M at most :data:`LUT_MAX_ROWS`) with an
    ``[n, gi * in_group]`` weight: ``y [M, N]``, and the call that repeats it (its output shaped
    ``out_shape``, its buffers ``sources``), or None where the launch was not held."""
    m = x2.shape[0]
    n_codebooks, size, _, ig = codebooks.shape
    j = gi * n_codebooks
    b = bias if bias is not None else scales
    if LUT_SLICES and LUT_SLICE_PRODUCTS and products_in_program(codebooks):
        cfg = _lut_slice_config(m, n, j, size, 4, x2.device)  # the products in fp32
        y, ws, locks = output_buffers(cfg, m, n, x2, tiles=cdiv(n, cfg.block_n) * m)
        args = (codes.contiguous(), x2, codebooks.contiguous(), scales.contiguous(), b, y, ws, locks, n, gi,
                x2.stride(0))
        launched = launch(_lut_products_kernel, (cdiv(n, cfg.block_n), cfg.split_k, m), *args,
            C=n_codebooks, SIZE=size, IG=ig, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_k,
            SPLIT_K=cfg.split_k, EXACT=x2.dtype != torch.float16, num_warps=cfg.num_warps)
        return y, HeldCall(launched, args, 5, out_shape, sources, x_at=1) if launched is not None else None
    lut = codeword_products(x2, codebooks)
    if LUT_SLICES:
        cfg = _lut_slice_config(m, n, j, size, lut.element_size(), x2.device)
        kernel, options = _lut_slice_kernel, {}
    else:
        cfg = _lut_config(m, n, j, x2.device)
        kernel, options = _lut_gemv_kernel, dict(PREFETCH=LUT_PREFETCH)
    y, ws, locks = output_buffers(cfg, m, n, x2, tiles=cdiv(n, cfg.block_n) * m)
    args = (codes.contiguous(), lut, scales.contiguous(), b, y, ws, locks, n, gi)
    launched = launch(kernel, (cdiv(n, cfg.block_n), cfg.split_k, m), *args,
        C=n_codebooks, SIZE=size, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_k,
        SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, **options)
    return y, HeldTabulated(launched, args, 4, out_shape, sources, x_at=1) if launched is not None else None


def switches() -> tuple:
    """The module constants that change a tabulated launch (for held calls' keys), read at each call."""
    return DEFAULT_LUT, LUT_MAX_ROWS, LUT_MAX_SIZE, LUT_BLOCK_J, LUT_PREFETCH, LUT_SLICES, LUT_SLICE_PRODUCTS
