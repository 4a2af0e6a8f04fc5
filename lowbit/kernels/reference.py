"""Plain-PyTorch reference kernels: the specification, the CPU path and the test oracle.

Every accelerated kernel has a twin here with the same signature; tests compare against
these. Nothing here is tuned for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats.packing import unpack_int


def dequantize_int_grouped(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Dequantize the canonical grouped-integer weight.

    Args:
        qweight: int32 ``[ceil(K*bits/32), N]``, ``bits``-bit codes packed along K, lowest K
            index in the lowest bits (see :mod:`lowbit.formats.packing`).
        scales: fp16/bf16/fp32 ``[G, N]``.
        qzeros: int32 ``[G, ceil(N*bits/32)]``, zero points packed along N, stored as the
            true zero (no AutoGPTQ "v1" offset).
        g_idx: int32 ``[K]``, group of each input column (``k // group_size`` unless
            act-order permuted it).
        bits: 2, 3, 4 or 8.

    Returns:
        fp32 ``[N, K]``: ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``.
    """
    k = g_idx.shape[0]
    n = scales.shape[1]
    q = unpack_int(qweight, bits, k, dim=0)  # [K, N]
    z = unpack_int(qzeros, bits, n, dim=1)  # [G, N]
    g = g_idx.long()
    w = (q.float() - z[g].float()) * scales[g].float()  # [K, N]
    return w.t().contiguous()  # [N, K]


def matmul_int_grouped(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the grouped-integer weight (see :func:`dequantize_int_grouped`).

    Args:
        x: fp ``[..., K]``; the result has x's dtype, shape ``[..., N]``.
        bias: ``[N]`` or None.
    """
    w = dequantize_int_grouped(qweight, scales, qzeros, g_idx, bits).to(x.dtype)  # [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
