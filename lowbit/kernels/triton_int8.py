"""Triton kernel for LLM.int8: the row-wise int8 product and its floating-point outlier columns, fused.

Twin of :func:`lowbit.kernels.reference.matmul_int8_outlier`, and the same arithmetic: input
columns holding any ``|x| >= threshold`` are outliers; every other column is quantized per row of
``x`` to ``CA = round(x * 127 / absmax_row)`` (half to even, as ``torch.round``), multiplied with
the weight codes ``CB`` in int32, and scaled by ``absmax_row * SCB / 127**2``; the outlier columns
are multiplied with ``CB`` in fp32 and scaled by ``SCB / 127``.

Two launches (three with split-K). The first reduces the activations to the statistics the
product needs: which columns are outliers, and each row's absmax over the others. Up to
:data:`STATS_ROWS` rows (decode) that is :func:`_stats_kernel`, one program per block of columns
writing its partial row maxima; for more rows, a few PyTorch reductions, whose launches matter
less there. The matmul kernel then takes each row's maximum over the partials and
``127 / absmax`` (computed as PyTorch's ``127.0 / t`` is, ``127 * (1 / t)``), reads each weight
tile once, quantizes the matching ``x`` tile to int8 in registers, and multiplies in integers:
``tl.dot`` on int8 tiles of 16 rows or more, integer multiply-sums on the vector units below (one
token). A tile that holds an outlier column also multiplies those columns of ``x`` with the codes
in fp32; tiles without one skip that product. Nothing depends on the data's shape and nothing
waits for the host, so the launches record in a CUDA graph (the reference gathers the outlier
columns, which synchronizes).

The integer sums are exact, as in the reference. The scaling and the outlier sums are fp32 in
another order, so the output matches the reference to fp32 rounding before its final cast. The
kernel is compiled without floating-point contraction (``enable_fp_fusion=False``): a fused
multiply-add would round ``x * 127 / absmax`` differently at a tie.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors; the tests use that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    MatmulConfig,
    _output_tile,
    _product,
    _store_output,
    cdiv,
    finish_split_k,
    input_rows,
    launch_config,
    next_power_of_2,
    output_buffer,
)

ROUND_MAGIC = tl.constexpr(12582912.0)
"""1.5 * 2**23: ``(v + ROUND_MAGIC) - ROUND_MAGIC`` is ``v`` rounded to an integer, half to even,
for ``|v| < 2**22`` in fp32 (portable to every backend and the interpreter, unlike ``libdevice.rint``)."""

BLOCK_K_CAP = 128

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
def _matmul_kernel(
    x_ptr, w_ptr, scb_ptr, outlier_ptr, part_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, n_parts,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)``, W = ``CB * SCB / 127``; with ``SPLIT_K > 1``, fp32
    partials ``y[SPLIT_K, M, N]``. Each row's absmax is the largest of ``part[n_parts, M]``."""
    offs_m, offs_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, n_parts):
        row = tl.maximum(row, tl.load(part_ptr + j * M + offs_m, mask=mask_m, other=0.0))
    one = tl.full((BLOCK_M,), 1.0, tl.float32)
    inv = 127.0 * tl.div_rn(one, tl.maximum(row, 1e-30))  # [BM], as PyTorch's 127.0 / row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        cb = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0)  # int8 [BK, BN]
        ca = (x.to(tl.float32) * inv[:, None] + ROUND_MAGIC) - ROUND_MAGIC  # integers in [-127, 127]
        if HAS_OUTLIERS:
            outlier = tl.load(outlier_ptr + offs_k, mask=mask_k, other=0) != 0  # [BK]
            ca = tl.where(outlier[None, :], 0.0, ca)
            if tl.max(outlier.to(tl.int32), axis=0) > 0:
                xo = tl.where(outlier[None, :], x, tl.zeros_like(x))
                acc_out += _product(xo, cb.to(tl.float32), BLOCK_M, DOT_FP32)
        if BLOCK_M >= 16:
            acc += tl.dot(ca.to(tl.int8), cb)
        else:
            acc += tl.sum(ca.to(tl.int32)[:, :, None] * cb.to(tl.int32)[None, :, :], axis=1)
    scb = tl.load(scb_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * (row[:, None] * scb[None, :]) / 16129.0
    if HAS_OUTLIERS:
        out += acc_out * (scb / 127.0)[None, :]
    _store_output(y_ptr, b_ptr, out, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, SPLIT_K)


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
    parts = cdiv(k, STATS_BLOCK_K)
    outliers = torch.empty(k, device=x2.device, dtype=torch.uint8) if threshold > 0 else None
    part = torch.empty(parts, m, device=x2.device, dtype=torch.float32)
    _stats_kernel[(parts,)](
        x2, outliers if outliers is not None else part, part, m, k, x2.stride(0), float(threshold),
        HAS_OUTLIERS=outliers is not None, BLOCK_M=next_power_of_2(m), BLOCK_K=STATS_BLOCK_K, num_warps=4)
    return outliers, part


def block_k_for(k: int) -> int:
    """K tile: up to 128, at least 32 (int8 ``tl.dot``'s minimum)."""
    return min(BLOCK_K_CAP, max(32, next_power_of_2(k)))


def matmul_int8_outlier(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                        bias: torch.Tensor | None = None, cfg: MatmulConfig | None = None) -> torch.Tensor:
    """LLM.int8 ``x @ W.T + bias``.

    Args:
        x: fp16/bf16/fp32 ``[..., K]``.
        weight: int8 ``[N, K]`` (``CB``, unit stride along K); scb: fp32 ``[N]``.
        threshold: outlier threshold (0: no outlier columns).
        bias: ``[N]`` or None.
        cfg: launch configuration (None: the heuristic's; benches pass others to compare).
    Returns:
        ``[..., N]`` in x's dtype, accumulated in int32 and fp32.
    """
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.stride(-1) != 1:
        raise ValueError("the int8 weight must have unit stride along K")
    x2 = input_rows(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    outliers, part = activation_stats(x2, threshold)
    block_k = block_k_for(k)
    if cfg is None:
        cfg = launch_config(m, n, k, block_k, x.device)
    elif cfg.block_k < 32:
        raise ValueError(f"block_k {cfg.block_k} is under 32, int8 tl.dot's minimum")
    y = output_buffer(cfg, m, n, x)
    _matmul_kernel[cfg.grid(m, n)](
        x2, weight, scb, outliers if outliers is not None else weight, part,
        bias if bias is not None else scb, y,
        m, n, k, x2.stride(0), weight.stride(0), n, part.shape[0],
        HAS_OUTLIERS=outliers is not None, HAS_BIAS=bias is not None, enable_fp_fusion=False,
        **cfg.kernel_options(x.dtype),
    )
    return finish_split_k(y, cfg, bias, x.dtype).reshape(*x.shape[:-1], n)
