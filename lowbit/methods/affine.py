"""Group-wise affine integer quantization: the math shared by RTN, GPTQ and AWQ.

A weight ``W`` (fp, ``[N, K]``: N output rows, K input columns) is split along K into
groups; each (row, group) gets a scale ``s`` and an integer zero point ``z`` with::

    q = clamp(round(w / s) + z, 0, 2**bits - 1)      # quantize
    w_hat = (q - z) * s                               # dequantize

Parameters follow the GPTQ reference (IST-DASLab ``quant.py``): asymmetric ranges always
include 0 (``xmin <= 0 <= xmax``); symmetric ranges use ``s = 2*max|w| / (2**bits - 1)``
with ``z = 2**(bits-1)``. A group of all zeros gets the range ``[-1, 1]`` so ``s > 0``.
All functions are pure and work on any device.
"""

from __future__ import annotations

import torch


def choose_qparams(
    w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16, zero_min: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w``.

    Args:
        w: fp tensor ``[..., n]``; one (scale, zero) per leading index, over the last dim.
        bits: integer width.
        sym: symmetric (zero fixed at ``2**(bits-1)``) or asymmetric range.
        scale_dtype: the scale is rounded to this dtype, the dtype it is stored in, so that
            quantizing with it matches what dequantization will use.
        zero_min: smallest asymmetric zero point (1 where a layout stores ``z - 1``, as GPTQ v1
            does; the grid then starts one step below 0 for groups with no negative weight).

    Returns:
        ``scale`` fp32 ``[...]`` (values representable in ``scale_dtype``) and ``zero``
        int32 ``[...]`` in ``[zero_min, 2**bits - 1]``.
    """
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf; cannot choose quantization parameters")
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = torch.clamp(w.amin(dim=-1), max=0)
    xmax = torch.clamp(w.amax(dim=-1), min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.finfo(scale_dtype).tiny)  # fp16 underflow guard
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), zero_min, maxq).to(torch.int32)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``; broadcasting shapes; int32 result."""
    maxq = (1 << bits) - 1
    q = torch.round(w.float() / scale) + zero
    return torch.clamp(q, 0, maxq).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` in fp32; broadcasting shapes."""
    return (q.float() - zero.float()) * scale.float()


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """Default ``g_idx``: int32 ``[K]`` with ``g_idx[k] = k // group_size``."""
    return torch.arange(in_features, dtype=torch.int32) // group_size


def quantize_grouped(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of a whole weight, contiguous groups along K.

    Args:
        w: fp ``[N, K]``.
        group_size: columns per group (``K`` for one group per row); the last group may be
            shorter when ``group_size`` does not divide ``K``.

    Returns:
        ``q`` int32 ``[N, K]``, ``scales`` fp32 ``[G, N]``, ``zeros`` int32 ``[G, N]``, with
        ``G = ceil(K / group_size)`` (the checkpoint orientation: groups first).
    """
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    for start in range(0, k, group_size):
        block = w[:, start : start + group_size]  # [N, g]
        s, z = choose_qparams(block, bits, sym, scale_dtype)  # [N], [N]
        q[:, start : start + group_size] = quantize(block, s[:, None], z[:, None], bits)
        scales.append(s)
        zeros.append(z)
    return q, torch.stack(scales), torch.stack(zeros)  # [N, K], [G, N], [G, N]


def fake_quantize_grouped(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                          scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``w`` fp ``[N, K]`` quantized and dequantized group-wise (as :func:`quantize_grouped`): fp32 ``[N, K]``."""
    q, scales, zeros = quantize_grouped(w, bits, group_size, sym, scale_dtype)  # [N,K] [G,N] [G,N]
    g = group_index(w.shape[1], group_size).long().to(w.device)
    return dequantize(q, scales[g].t(), zeros[g].t())
