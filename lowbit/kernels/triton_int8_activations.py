"""LLM.int8's activations in Triton: their statistics, their int8 codes, and the weight's rows
dequantized, for :mod:`lowbit.kernels.triton_int8`'s product.

The product needs two statistics of ``x [M, K]``: which input columns are outliers (any
``|x| >= threshold``), and each row's absmax over the other columns. Up to :data:`STATS_ROWS` rows
:func:`_stats_kernel` finds them, one program per block of :data:`STATS_BLOCK_K` columns writing
its partial row maxima (:func:`_row_absmax` takes each row's largest; :func:`_row_stats` finds
them from the whole of x inside one program); above, a few PyTorch reductions. From them
:func:`_codes` rounds a tile of x to its int8 codes, ``round(x * 127 / absmax_row)`` half to even,
as the reference does (:func:`lowbit.kernels.reference.matmul_int8_outlier`).
:func:`quantize_activations` writes the codes of the whole of x once and
:func:`grid_activations` the values they stand for; :func:`dequantize_int8_rows` is the weight
``CB * SCB / 127`` in a float dtype.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the tests use that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import cdiv, launch, next_power_of_2


ROUND_MAGIC = tl.constexpr(12582912.0)
"""1.5 * 2**23: ``(v + ROUND_MAGIC) - ROUND_MAGIC`` is ``v`` rounded to an integer, half to even,
for ``|v| < 2**22`` in fp32 (portable to every backend and the interpreter, unlike ``libdevice.rint``)."""

STATS_ROWS = 16
"""Rows up to which the activation statistics are a Triton kernel (above, PyTorch reductions)."""

STATS_BLOCK_K = 512
"""Columns per program of :func:`_stats_kernel`."""


@triton.jit
def _stats_kernel(x_ptr, outlier_ptr, part_ptr, M, K, stride_xm, threshold,
                  HAS_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """For this program's block of columns, all ``M <= BLOCK_M`` rows in one tile: the outlier
    columns (any ``|x| >= threshold``) as uint8 ``outlier[K]``, and each row's absmax over the
    block's other columns, ``part[pid, M]`` fp32."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    xa = tl.abs(tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m < M)[:, None] & mask_k[None, :], other=0.0).to(tl.float32))  # [BM, BK]
    if HAS_OUTLIERS:
        outlier = tl.max(xa, axis=0) >= threshold  # [BK]
        tl.store(outlier_ptr + offs_k, outlier.to(tl.uint8), mask=mask_k)
        xa = tl.where(outlier[None, :], 0.0, xa)
    tl.store(part_ptr + pid * M + offs_m, tl.max(xa, axis=1), mask=offs_m < M)


@triton.jit
def _row_absmax(part_ptr, n_parts, offs_m, mask_m, M, BLOCK_M: tl.constexpr):
    """fp32 ``[BLOCK_M]``: each row's absmax, the largest of its partials ``part[n_parts, M]``."""
    row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, n_parts):
        row = tl.maximum(row, tl.load(part_ptr + j * M + offs_m, mask=mask_m, other=0.0))
    return row


@triton.jit
def _row_stats(x_ptr, offs_m, mask_m, K, stride_xm, threshold, HAS_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr,
               CHUNK: tl.constexpr):
    """fp32 ``[BLOCK_M]``: each row's absmax over the columns that are not outliers, from the whole
    of x (every row of it: ``M <= BLOCK_M``), what :func:`_stats_kernel` and :func:`_row_absmax`
    give in two steps. A running elementwise maximum, reduced once at the end."""
    run = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        offs_k = k0 + tl.arange(0, CHUNK)
        xa = tl.abs(tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32))
        if HAS_OUTLIERS:
            xa = tl.where((tl.max(xa, axis=0) >= threshold)[None, :], 0.0, xa)
        run = tl.maximum(run, xa)
    return tl.max(run, axis=1)


@triton.jit
def _codes(x, row):
    """``round(x * 127 / row)`` of an ``x [BM, BK]`` tile as fp32 integers in [-127, 127], half to
    even; ``127 / row`` computed as PyTorch's ``127.0 / t`` is (``127 * (1 / t)``)."""
    one = tl.full(row.shape, 1.0, tl.float32)
    inv = 127.0 * tl.div_rn(one, tl.maximum(row, 1e-30))
    return (x.to(tl.float32) * inv[:, None] + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def _quantize_kernel(x_ptr, outlier_ptr, part_ptr, ca_ptr, M, K, stride_xm, n_parts,
                     HAS_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     GRID: tl.constexpr = False):
    """``CA[M, K]`` int8 (row-major): :func:`_codes` of ``x``, 0 in the outlier columns. ``GRID``:
    instead, in ``ca_ptr``'s float dtype, the value each code stands for, ``CA * absmax_row / 127``,
    and ``x`` itself in the outlier columns (what :func:`grid_activations` returns)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    row = _row_absmax(part_ptr, n_parts, offs_m, mask_m, M, BLOCK_M)
    ca = _codes(x, row)
    if GRID:
        ca = ca * (row / 127.0)[:, None]
    if HAS_OUTLIERS:
        outlier = tl.load(outlier_ptr + offs_k, mask=offs_k < K, other=0) != 0
        ca = tl.where(outlier[None, :], x.to(tl.float32) if GRID else 0.0, ca)
    tl.store(ca_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], ca.to(ca_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(w_ptr, scb_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[N, K] = CB * (SCB / 127)`` in fp32, stored in out's dtype (the reference's arithmetic)."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    cb = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask, other=0)
    scale = tl.load(scb_ptr + offs_n, mask=offs_n < N, other=0.0) / 127.0
    out = cb.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)



def activation_stats(x2: torch.Tensor, threshold: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What the matmul kernel needs of the activations ``x2 [M, K]``.

    Returns:
        the outlier columns as uint8 ``[K]`` (None when ``threshold == 0``), and partial row
        absmaxes over the other columns, fp32 ``[P, M]``: each row's absmax is the largest of its
        ``P`` values (one per block of :data:`STATS_BLOCK_K` columns up to :data:`STATS_ROWS` rows,
        ``P = 1`` above).
    """
    m, k = x2.shape
    if m > STATS_ROWS:
        xa = x2.abs()
        outliers = None
        if threshold > 0:
            outliers = xa.amax(dim=0) >= threshold  # [K]: any |x| >= threshold in the column
            xa = xa.masked_fill(outliers, 0)
            outliers = outliers.view(torch.uint8)
        return outliers, xa.amax(dim=1).float().unsqueeze(0)  # [1, M]
    return _launch_stats(x2, threshold)[:2]


def _launch_stats(x2: torch.Tensor, threshold: float) -> tuple[torch.Tensor | None, torch.Tensor, tuple, tuple | None]:
    """:func:`activation_stats` through :func:`_stats_kernel` (up to :data:`STATS_ROWS` rows):
    ``(outliers, part, the kernel's arguments, the held launch)`` (x at argument 0, the outliers or
    else ``part`` at 1, ``part`` at 2)."""
    m, k = x2.shape
    parts = cdiv(k, STATS_BLOCK_K)
    outliers = torch.empty(k, device=x2.device, dtype=torch.uint8) if threshold > 0 else None
    part = torch.empty(parts, m, device=x2.device, dtype=torch.float32)
    args = (x2, outliers if outliers is not None else part, part, m, k, x2.stride(0), float(threshold))
    launched = launch(_stats_kernel, (parts,), *args,
        HAS_OUTLIERS=outliers is not None, BLOCK_M=next_power_of_2(m), BLOCK_K=STATS_BLOCK_K, num_warps=4)
    return outliers, part, args, launched


QUANTIZE_BLOCK = (16, 256)
"""Rows and columns of x per program of :func:`_quantize_kernel`."""


def quantize_activations(x2: torch.Tensor, outliers: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """int8 ``CA [M, K]`` of ``x2 [M, K]`` with the statistics of :func:`activation_stats`: each
    row scaled by 127 / its absmax and rounded half to even, the outlier columns 0 (the codes the
    reference multiplies)."""
    return _quantize(x2, outliers, part, torch.int8)


def grid_activations(x2: torch.Tensor, outliers: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` rounded to LLM.int8's grid, in x's dtype: each column that is not an outlier
    holds ``CA * absmax_row / 127`` (the value its code stands for; :func:`quantize_activations`),
    the outlier columns hold ``x``. ``grid_activations(x) @ W.T`` with the dequantized weight
    ``W = CB * SCB / 127`` is LLM.int8's product: the int8 part and the outlier part in one matmul."""
    return _quantize(x2, outliers, part, x2.dtype)


def _quantize(x2: torch.Tensor, outliers: torch.Tensor | None, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_quantize_kernel` over ``x2``: the int8 codes, or (a float ``dtype``) their grid values."""
    m, k = x2.shape
    out = torch.empty(m, k, device=x2.device, dtype=dtype)
    bm, bk = QUANTIZE_BLOCK
    launch(_quantize_kernel, (cdiv(m, bm), cdiv(k, bk)),
        x2, outliers if outliers is not None else out, part, out, m, k, x2.stride(0), part.shape[0],
        HAS_OUTLIERS=outliers is not None, BLOCK_M=bm, BLOCK_K=bk, GRID=dtype.is_floating_point,
        enable_fp_fusion=False, num_warps=4)
    return out


def dequantize_int8_rows(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.dequantize_int8_rows`: ``[N, K]`` in ``dtype``
    (the same fp32 values, cast)."""
    n, k = weight.shape
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    block_n, block_k = 32, 128
    launch(_dequantize_kernel, (cdiv(k, block_k), cdiv(n, block_n)),
        weight, scb, out, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
