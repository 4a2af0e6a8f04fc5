"""NF4/FP4 weights on the CPU at one row (decode): table lookups over the weight's bytes.

The reference (:func:`lowbit.kernels.reference.matmul_blockwise4`) dequantizes the whole weight at
every call. For one row this instead reads each byte of the weight once, as AQLM's tables do
(:mod:`lowbit.kernels.cpu_codebook`): a byte holds two codes, so it indexes the 256 pairs of code
values (:func:`lowbit.kernels.reference.nibble_pairs`). Per row ``m`` and byte position ``j``
(inputs ``2j`` and ``2j + 1``)::

    T[m, j, e] = x[m, 2j] * map[e >> 4] + x[m, 2j + 1] * map[e & 15]     (K/2 * 256 values)
    y[m, n] = sum_b absmax[n, b] * sum_{j in block b} T[m, j, byte[n, j]]

The inner sums are one ``F.embedding_bag`` (one bag per output and block), the rest a product and
a sum over the blocks. All in fp32, whatever the layer's compute dtype (the reference computes in
that dtype): the sums run in another order than the reference's, fp32 rounding apart.

The blocks must lie within rows (K a multiple of the block size), so that a bag is one block of
one output. Above :data:`LUT_MAX_ROWS` rows the tables cost about as much as the reference's
dequantize, or more. bitsandbytes' own compiled CPU code is much faster still (``docs/performance.md``).
"""

from __future__ import annotations

import torch

from lowbit.kernels.cpu_codebook import table_offsets, table_sums
from lowbit.kernels.reference import blockwise4_absmax, nibble_pairs

LUT_MAX_ROWS = 1
"""The most rows taken. ``bench/cpu.py --format nf4`` (2 cores): at one row the tables were
1.3-1.8x faster than the reference on SmolLM2's shapes and 4096x4096, at two 1.0-1.7x, at four
0.9-1.5x; the reference's dequantize costs the same at any row count."""


def supports(k: int, blocksize: int, rows: int) -> bool:
    """Whether a weight of ``k`` inputs in blocks of ``blocksize`` is taken at ``rows`` rows."""
    return k % blocksize == 0 and rows <= LUT_MAX_ROWS


def matmul_blockwise4(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                      blocksize: int, shape: tuple[int, int], nested_absmax: torch.Tensor | None = None,
                      nested_quant_map: torch.Tensor | None = None, nested_offset: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an NF4/FP4 weight (arguments as
    :func:`lowbit.kernels.reference.matmul_blockwise4` takes them, which :func:`supports` takes).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    n, k = shape
    x2 = x.reshape(-1, k).float()  # [M, K]
    m = x2.shape[0]
    groups, blocks = k // 2, k // blocksize
    products = torch.einsum("mjt,et->jem", x2.view(m, groups, 2), nibble_pairs(quant_map))  # [K/2, 256, M]
    data = weight.reshape(-1).view(torch.uint8)[: n * groups].view(n, groups)  # [N, K/2]
    idx = torch.add(data, table_offsets(groups, 256))  # int32 [N, K/2]: rows of the stacked tables
    sums = table_sums(products, idx.view(n * blocks, groups // blocks))  # [N * K/bs, M]
    scale = blockwise4_absmax(absmax, nested_absmax, nested_quant_map, nested_offset)[: n * blocks]  # [N * K/bs]
    y = (sums.view(n, blocks, m) * scale.view(n, blocks, 1)).sum(dim=1).t()  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
