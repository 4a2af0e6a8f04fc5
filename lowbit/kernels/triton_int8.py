"""Triton kernel for LLM.int8: the row-wise int8 product and its floating-point outlier columns, fused.

Twin of :func:`lowbit.kernels.reference.matmul_int8_outlier`, and the same arithmetic: input
columns holding any ``|x| >= threshold`` are outliers; every other column is quantized per row of
``x`` to ``CA = round(x * 127 / absmax_row)`` (half to even, as ``torch.round``), multiplied with
the weight codes ``CB`` in int32, and scaled by ``absmax_row * SCB / 127**2``; the outlier columns
are multiplied with ``CB`` in fp32 and scaled by ``SCB / 127``.

Two launches. The first reduces the activations to the statistics the product needs: which
columns are outliers, and each row's absmax over the others
(:func:`~lowbit.kernels.triton_int8_activations.activation_stats`: a Triton kernel up to
:data:`~lowbit.kernels.triton_int8_activations.STATS_ROWS` rows, PyTorch reductions above; when
all of x's rows fit one tile the matmul kernel can find them itself instead: ``ROW_STATS``,
:data:`FUSED_ROW_STATS`, off since it ran slower on an H100). The matmul kernel then takes each
row's maximum over the partials and ``127 / absmax`` (computed as PyTorch's ``127.0 / t`` is,
``127 * (1 / t)``), reads each weight tile once, quantizes the matching ``x`` tile to int8 in registers,
and multiplies in integers: ``tl.dot`` on int8 tiles of 16 rows or more, integer multiply-sums on
the vector units below (one token). A tile that holds an outlier column also multiplies those
columns of ``x`` with the codes in fp32; tiles without one skip that product. With ``prequantize`` a
launch between the two writes x's int8 codes once
(:func:`~lowbit.kernels.triton_int8_activations.quantize_activations`), and the matmul
loads them instead of quantizing in every program. Nothing depends on the data's shape and nothing
waits for the host, so the launches record in a CUDA graph (the reference gathers the outlier
columns, which synchronizes).

Above :data:`TILED_MAX_ROWS` rows (prefill) the product is instead one ``F.linear`` of the
activations on their int8 grid (:func:`grid_activations`, the outlier columns as they are) with
the weight dequantized to x's dtype (:func:`batch_path_for`).

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

from lowbit.kernels.held import HeldCalls, HeldLaunch, HeldSources
from lowbit.kernels.split_k import output_buffers
from lowbit.kernels.triton_common import (
    MatmulConfig,
    _output_tile,
    _product,
    _store_output,
    check_batch_path,
    held_call_key,
    input_rows,
    launch,
    launch_config,
    next_power_of_2,
)
from lowbit.kernels.triton_int8_activations import (
    STATS_ROWS,
    _codes,
    _launch_stats,
    _row_absmax,
    _row_stats,
    activation_stats,
    dequantize_int8_rows,
    grid_activations,
    quantize_activations,
)

BLOCK_K_CAP = 128


@triton.jit
def _matmul_kernel(
    x_ptr, ca_ptr, w_ptr, scb_ptr, outlier_ptr, part_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, n_parts, threshold,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, PREQUANTIZED: tl.constexpr, WEIGHT_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr, ROW_STATS: tl.constexpr = False,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)``, W = ``CB * SCB / 127``; with ``SPLIT_K > 1`` the splits
    meet in ``ws`` and the last one writes y (``_store_output``). Each row's absmax is the largest
    of ``part[n_parts, M]``.

    ``PREQUANTIZED``: x's codes were written once by :func:`_quantize_kernel` to ``CA[M, K]`` and
    are loaded as int8; x itself is read only in K tiles that hold an outlier column. Otherwise
    every program quantizes its x tiles in registers (``ca_ptr`` unused).

    ``WEIGHT_ONLY``: x is not quantized: each x tile multiplies the codes (as x's dtype, which
    holds them exactly) with fp32 accumulation, scaled by ``SCB / 127`` at the end (``ca_ptr``,
    ``outlier_ptr`` and ``part_ptr`` unused).

    ``ROW_STATS`` (all of x's rows in one tile, not prequantized): no statistics launch before this
    one. Every program finds the row absmaxes from the whole of x (:func:`_row_stats`), and an x
    tile's outlier columns from the tile itself (``outlier_ptr`` and ``part_ptr`` unused)."""
    offs_m, offs_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if WEIGHT_ONLY:
        row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    elif ROW_STATS:
        row = _row_stats(x_ptr, offs_m, mask_m, K, stride_xm, threshold, HAS_OUTLIERS, BLOCK_M, 1024 // BLOCK_M)
    else:
        row = _row_absmax(part_ptr, n_parts, offs_m, mask_m, M, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_at = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        mask_x = mask_m[:, None] & mask_k[None, :]
        cb = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0)  # int8 [BK, BN]
        if WEIGHT_ONLY:
            acc_out += _product(tl.load(x_at, mask=mask_x, other=0.0), cb.to(tl.float32), BLOCK_M, DOT_FP32)
        else:
            if PREQUANTIZED:  # outlier columns are already 0
                ca = tl.load(ca_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask_x, other=0)
            else:
                x = tl.load(x_at, mask=mask_x, other=0.0)  # [BM, BK]
                ca = _codes(x, row)  # integers in [-127, 127]
            if HAS_OUTLIERS:
                if ROW_STATS:  # any |x| >= threshold in the column, as _stats_kernel decides it
                    outlier = tl.max(tl.abs(x.to(tl.float32)), axis=0) >= threshold  # [BK]
                else:
                    outlier = tl.load(outlier_ptr + offs_k, mask=mask_k, other=0) != 0  # [BK]
                if not PREQUANTIZED:
                    ca = tl.where(outlier[None, :], 0.0, ca)
                if tl.max(outlier.to(tl.int32), axis=0) > 0:
                    if PREQUANTIZED:
                        xt = tl.load(x_at, mask=mask_x, other=0.0)
                    else:
                        xt = x
                    xo = tl.where(outlier[None, :], xt, tl.zeros_like(xt))
                    acc_out += _product(xo, cb.to(tl.float32), BLOCK_M, DOT_FP32)
            if BLOCK_M >= 16:
                acc += tl.dot(ca.to(tl.int8), cb)
            else:
                acc += tl.sum(ca.to(tl.int32)[:, :, None] * cb.to(tl.int32)[None, :, :], axis=1)
    scb = tl.load(scb_ptr + offs_n, mask=mask_n, other=0.0)
    if WEIGHT_ONLY:
        out = acc_out * (scb / 127.0)[None, :]
    else:
        out = acc.to(tl.float32) * (row[:, None] * scb[None, :]) / 16129.0
        if HAS_OUTLIERS:
            out += acc_out * (scb / 127.0)[None, :]
    _store_output(y_ptr, ws_ptr, lock_ptr, b_ptr, out, offs_m, offs_n, M, N, stride_ym, tl.program_id(0), HAS_BIAS,
                  SPLIT_K)


FUSED_ROW_STATS = False
"""Whether a launch whose rows all fit one tile (decode: up to :data:`STATS_ROWS` rows), with x not
prequantized, finds the activation statistics in the matmul kernel itself (``ROW_STATS``): one
launch instead of two, each program reading the whole of x once more. Off: on an H100 (2026-11-27,
``bench/kernels.py``, graphs, cold L2) the statistics launch was ahead at one token (15.2 against
15.8 µs on 4096x4096, 31.7 against 35.9 µs on 4096x11008) and far ahead at 16 rows (25.6 against
252.7 µs, 38.1 against 235.2 µs), where every program's pass over x is serial. The bench keeps a
row for it."""

TILED_MAX_ROWS = 128
"""The most rows the fused kernel takes by default (:func:`batch_path_for`)."""


def batch_path_for(m: int, dtype: torch.dtype) -> str:
    """How ``m`` rows in ``dtype`` are multiplied: ``"tiled"`` (the fused int8 kernel) up to
    :data:`TILED_MAX_ROWS` and for bf16, ``"dequantize"`` above: the weight dequantized to x's dtype
    (:func:`dequantize_int8_rows`) and multiplied by ``F.linear`` with the activations on their int8
    grid (:func:`grid_activations`; weight-only: as they are).

    On the H100 (``docs/performance.md``, 2026-11-27) the fused kernel's best variants ran at
    0.2-0.47x fp16 ``F.linear`` from 128 rows: Triton's int8 ``tl.dot`` tiles are far from cuBLAS's
    fp16 speed there. The dequantize path costs a pass over the weight (16 MiB read and 32 MiB
    written for 4096x4096) and one over x, then runs at cuBLAS's speed. The threshold is that
    estimate's, not a measured crossover; ``bench/kernels.py`` times both paths.

    The dequantize path rounds the grid values and the weight to x's dtype before a floating-point
    product (the fused kernel sums the codes exactly in int32): the difference is the dtype's
    rounding, within the fused-matmul tolerance for fp16. bf16 keeps 8 bits of each grid value,
    which about doubles the fused kernel's error against the exact product; it stays on the fused
    kernel unless asked.
    """
    return "tiled" if m <= TILED_MAX_ROWS or dtype == torch.bfloat16 else "dequantize"


DEFAULT_PREQUANTIZE = True
"""Whether :func:`matmul_int8_outlier` quantizes the activations in a launch of their own (once per
call) rather than in every program that reads them, above :data:`STATS_ROWS` rows (fewer rows save
the launch instead). Each program then loads int8 codes instead of quantizing an fp16 tile on the
vector units for every N tile it covers (by ``bench/ptx.py``, a 64x64 tile's K step issues 102
instructions per thread instead of 581). On the H100 (``docs/performance.md``, 2026-11-27) it was
1.2-2.2x faster at 128, 512 and 2,048 rows on 4096x4096 and 4096x11008."""

WIDE_TILES_ROWS = 512
"""From this many rows a prequantized launch on CUDA takes :data:`WIDE_TILES` instead of the shared
heuristic's tiles: on the H100 they were 1.15-1.25x faster at 512 and 2,048 rows, and slower on
4096x4096 at 128 rows (``docs/performance.md``, 2026-11-27). Untimed on AMD, which keeps the
heuristic."""

WIDE_TILES = MatmulConfig(128, 128, 128, 1, 8, 3)


def int8_config(m: int, n: int, k: int, block_k: int, device: torch.device, prequantized: bool) -> MatmulConfig:
    """The launch of :func:`matmul_int8_outlier`'s kernel: :data:`WIDE_TILES` for a prequantized
    launch of :data:`WIDE_TILES_ROWS` rows or more on CUDA with 128-wide K tiles, else the shared
    heuristic's."""
    if prequantized and m >= WIDE_TILES_ROWS and block_k == WIDE_TILES.block_k and device.type == "cuda" \
            and torch.version.hip is None:
        return WIDE_TILES
    return launch_config(m, n, k, block_k, device)


def block_k_for(k: int) -> int:
    """K tile: up to 128, at least 32 (int8 ``tl.dot``'s minimum)."""
    return min(BLOCK_K_CAP, max(32, next_power_of_2(k)))


class _HeldInt8(HeldSources):
    """An eager call of fewer than 16 rows, held (see :class:`~lowbit.kernels.held.HeldCall`):
    the statistics launch (None where the matmul needs no statistics: weight-only, or found in the
    matmul), then the matmul, each with the tensors made for this call in their slots."""

    __slots__ = ("stats", "matmul", "outlier_cols", "parts", "out_shape", "dtype")

    def __init__(self, stats: HeldLaunch | None, matmul: HeldLaunch, outlier_cols: int, parts: int,
                 out_shape: tuple[int, ...], dtype: torch.dtype, sources: tuple) -> None:
        super().__init__(sources)
        self.stats, self.matmul, self.outlier_cols, self.parts = stats, matmul, outlier_cols, parts
        self.out_shape, self.dtype = out_shape, dtype

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch.empty(self.out_shape, dtype=self.dtype, device=x2.device)
        if self.stats is None:
            self.matmul(x2, y)
            return y
        part = torch.empty(self.parts, x2.shape[0], device=x2.device, dtype=torch.float32)
        if self.outlier_cols:
            outliers = torch.empty(self.outlier_cols, device=x2.device, dtype=torch.uint8)
            self.stats(x2, outliers, part)
            self.matmul(x2, outliers, part, y)
        else:
            self.stats(x2, part, part)
            self.matmul(x2, part, y)
        return y


def matmul_int8_outlier(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                        bias: torch.Tensor | None = None, cfg: MatmulConfig | None = None,
                        prequantize: bool | None = None, weight_only: bool = False,
                        batch_path: str | None = None, held: HeldCalls | None = None) -> torch.Tensor:
    """LLM.int8 ``x @ W.T + bias``.

    Args:
        x: fp16/bf16/fp32 ``[..., K]``.
        weight: int8 ``[N, K]`` (``CB``, unit stride along K); scb: fp32 ``[N]``.
        threshold: outlier threshold (0: no outlier columns).
        bias: ``[N]`` or None.
        cfg: launch configuration of the fused kernel (None: the heuristic's; benches pass others
            to compare). Given, the fused kernel runs whatever ``batch_path`` says.
        prequantize: quantize x in a launch of its own (None: :data:`DEFAULT_PREQUANTIZE` above
            :data:`STATS_ROWS` rows).
        batch_path: for 16 rows or more, ``"tiled"`` or ``"dequantize"`` (None: :func:`batch_path_for`).
        weight_only: leave x in floating point (the twin of
            :func:`~lowbit.kernels.reference.matmul_int8_weight_only`; one launch, ``threshold``
            and ``prequantize`` unused).
        held: the weight's held calls (the module's): an eager call of fewer than 16 rows with none
            of ``cfg``, ``prequantize`` and ``batch_path`` is held there and repeated from there,
            its statistics launch included (:class:`~lowbit.kernels.held.HeldCall`).
    Returns:
        ``[..., N]`` in x's dtype, accumulated in int32 and fp32.
    """
    key = (held_call_key(x, float(threshold), weight_only, FUSED_ROW_STATS, STATS_ROWS, DEFAULT_PREQUANTIZE)
           if held is not None and cfg is None and prequantize is None and batch_path is None else None)
    if key is not None:
        entry = held.find(key, (weight, scb, bias))
        if entry is not None:
            return entry(input_rows(x))
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.stride(-1) != 1:
        raise ValueError("the int8 weight must have unit stride along K")
    x2 = input_rows(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    check_batch_path(batch_path)
    if cfg is None and m >= 16 and (batch_path or batch_path_for(m, x2.dtype)) == "dequantize":
        w = dequantize_int8_rows(weight, scb, x2.dtype)
        xin = x2 if weight_only else grid_activations(x2, *activation_stats(x2, threshold))
        b = bias.to(x2.dtype) if bias is not None else None
        return torch.nn.functional.linear(xin, w, b).reshape(*x.shape[:-1], n)
    if weight_only:
        prequantize = False
    elif prequantize is None:
        prequantize = DEFAULT_PREQUANTIZE and m > STATS_ROWS
    block_k = block_k_for(k)
    if cfg is None:
        cfg = int8_config(m, n, k, block_k, x.device, prequantize)
    elif cfg.block_k < 32:
        raise ValueError(f"block_k {cfg.block_k} is under 32, int8 tl.dot's minimum")
    row_stats = FUSED_ROW_STATS and not (weight_only or prequantize) and m <= min(cfg.block_m, STATS_ROWS)
    stats = None  # the statistics launch's (arguments, held launch), for a held call
    if weight_only or row_stats:  # part: a placeholder, unread; outliers found by the kernel
        outliers, part = None, scb.view(1, -1)
    elif m <= STATS_ROWS:
        outliers, part, *stats = _launch_stats(x2, threshold)
    else:
        outliers, part = activation_stats(x2, threshold)
    y, ws, locks = output_buffers(cfg, m, n, x)
    codes = quantize_activations(x2, outliers, part) if prequantize else None
    args = (x2, codes if codes is not None else weight, weight, scb, outliers if outliers is not None else weight,
            part, bias if bias is not None else scb, y, ws, locks,
            m, n, k, x2.stride(0), weight.stride(0), n, part.shape[0], float(threshold))
    launched = launch(_matmul_kernel, cfg.grid(m, n), *args,
        HAS_OUTLIERS=outliers is not None or (row_stats and threshold > 0), HAS_BIAS=bias is not None,
        PREQUANTIZED=codes is not None, WEIGHT_ONLY=weight_only, ROW_STATS=row_stats, enable_fp_fusion=False,
        **cfg.kernel_options(x.dtype),
    )
    out_shape = (*x.shape[:-1], n)
    if key is not None and m < 16 and codes is None and launched is not None and (stats is None or stats[1]):
        if stats is None:
            entry = _HeldInt8(None, HeldLaunch(launched, args, (0, 7)), 0, 0, out_shape, y.dtype, (weight, scb, bias))
        else:  # the statistics' tensors are made each call: x, then the outlier columns (or part), part
            slots = (0, 4, 5, 7) if outliers is not None else (0, 5, 7)
            entry = _HeldInt8(HeldLaunch(stats[1], stats[0], (0, 1, 2)), HeldLaunch(launched, args, slots),
                              k if outliers is not None else 0, part.shape[0], out_shape, y.dtype, (weight, scb, bias))
        held.hold(key, entry)
    return y.reshape(out_shape)
