"""AQLM (additive codebook) weights on the CPU: table lookups for a few rows, a faster dequantize
above.

The reference (:func:`lowbit.kernels.reference.matmul_codebook`) gathers every codeword of the
weight by advanced indexing into a zeroed fp32 buffer, then multiplies. Two cheaper ways to the
same product, both in fp32 (no narrowing):

- **Dequantize**: the weight written in x's dtype a piece at a time into a buffer held per thread
  (:func:`lowbit.kernels.cpu_dequant.codebook_into`, one ``index_select`` per codebook), or, where
  autograd keeps the weight for the backward, as a new tensor (:func:`dequantize_codebook`: one
  ``F.embedding`` lookup per codebook, or for two codebooks of at most 2**8 entries one lookup in
  a table of every sum of two codewords). Either way the first codeword is the sum's start rather
  than added to zeros, then the row scales: the same sums of the same values as the reference, so
  the weight is equal to its own (the sign of a zero apart). The product is then ``F.linear`` in
  x's dtype, as the reference's.
- **Lookup tables** (:func:`lut_product`, codebooks of at most 2**8 entries, up to
  :data:`LUT_MAX_ROWS` rows): the products of each input group with every codeword,
  ``T[m, j, c, e] = x[m, group j] . codebook[c][e]`` (``M * K/ig * C * 2**nbits`` values), then each
  output is a sum of ``K/ig * C`` table entries picked by its codes (one ``F.embedding_bag``). That
  reads each code once and never forms the weight. It sums in another order than the reference:
  fp32 rounding apart.

Both take one output per group (``out_group_size = 1``, as every AQLM scheme transformers lists).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lowbit.kernels import cpu_dequant

LUT_MAX_ROWS = 8
"""The most rows the lookup tables take; above, dequantize and ``F.linear``. The tables' cost grows
with the rows, the dequantize's does not; where they cross depends on the shape (``bench/cpu.py
--format aqlm-2x8``, 2 cores: SmolLM2's 576x1536 between 8 and 16 rows, 4096x4096 above 16)."""

LUT_MAX_NBITS = 8
"""The largest codebooks (2**8 entries) the lookup tables take: at 2**16 a table per row would hold
``K/ig * 65536`` values, more than the weight."""


def supports(codebooks: torch.Tensor) -> bool:
    """Whether the weight has one output per group (``codebooks``: ``[C, 2**nbits, og, ig]``)."""
    return codebooks.shape[2] == 1


def _indices(codes: torch.Tensor, size: int) -> torch.Tensor:
    """Codebook indices as int32 ``[N, K/ig, C]`` (the signed storage of
    :func:`lowbit.kernels.reference.unpack_codes`, read modulo ``size``)."""
    if codes.dtype == torch.int8 and size == 256:
        return codes.view(torch.uint8).to(torch.int32)  # two's complement read unsigned: the index
    return codes.to(torch.int32, copy=True).bitwise_and_(size - 1)


def dequantize_codebook(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight as fp32 ``[N, K]``, equal to :func:`lowbit.kernels.reference.dequantize_codebook`.

    Args:
        codes: int8/int16 ``[N, K/ig, C]`` (AQLM's signed storage).
        codebooks: fp ``[C, 2**nbits, 1, ig]``.
        scales: fp ``[N, 1, 1, 1]``.
    """
    n_codebooks, size, _, ig = codebooks.shape
    n, gi, _ = codes.shape
    idx = _indices(codes, size)  # [N, K/ig, C]
    books = codebooks.float().view(n_codebooks, size, ig)  # (the reference's conversion)
    if n_codebooks == 2 and size <= 1 << LUT_MAX_NBITS:
        # every sum of two codewords once (size**2 rows, 2 MiB at 2x8): one lookup per group, not two and an add
        pairs = (books[0][:, None] + books[1][None, :]).view(size * size, ig)
        w = F.embedding(idx[..., 0].mul(size).add_(idx[..., 1]), pairs)  # [N, K/ig, ig]
    else:
        w = F.embedding(idx[..., 0], books[0])  # [N, K/ig, ig]
        for c in range(1, n_codebooks):
            w += F.embedding(idx[..., c], books[c])
    return w.view(n, gi * ig).mul_(scales.float().view(n, 1))


@functools.lru_cache(maxsize=64)
def table_offsets(count: int, size: int) -> torch.Tensor:
    """int32 ``[count]``: where each of ``count`` tables of ``size`` entries starts when they are
    stacked into one, ``i * size``."""
    return torch.arange(count, dtype=torch.int32) * size


def table_sums(products: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sums of table entries: fp32 ``[B, M]``, bag ``b`` the sum of the table rows ``rows[b]``.

    Args:
        products: fp32 ``[..., M]``, the tables (every dimension but the last is flattened into
            the table's rows), in any memory layout.
        rows: int32 ``[B, L]``.
    """
    # with the strides of a new tensor: a one-row table viewed from a product can have stride
    # (1, E), and F.embedding_bag then took 50x longer on this CPU
    table = products.reshape(-1).view(-1, products.shape[-1])  # [rows, M]
    return F.embedding_bag(rows, table, mode="sum")


def lut_applies(m: int, codebooks: torch.Tensor) -> bool:
    """Whether :func:`lut_product` takes ``m`` rows of this weight."""
    return m <= LUT_MAX_ROWS and codebooks.shape[1] <= 1 << LUT_MAX_NBITS


def lut_product(x2: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x2 @ W.T`` as fp32 ``[M, N]`` by table lookups.

    Args:
        x2: fp ``[M, K]``.
        codes, codebooks, scales: as :func:`dequantize_codebook` takes them.
    """
    n_codebooks, size, _, ig = codebooks.shape
    n, gi, _ = codes.shape
    m = x2.shape[0]
    xg = x2.float().view(m, gi, ig)  # [M, K/ig, ig]
    books = codebooks.float().view(n_codebooks, size, ig)  # [C, E, ig]
    products = torch.einsum("mji,cei->jcem", xg, books)  # [K/ig, C, E, M]: group j's table for codebook c
    offsets = table_offsets(gi * n_codebooks, size).view(gi, n_codebooks)
    idx = _indices(codes, size).add_(offsets)  # [N, K/ig, C]: rows of the stacked tables
    y = table_sums(products, idx.view(n, gi * n_codebooks))  # [N, M]
    return y.t() * scales.float().view(1, n)


def _weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight ``[N, K]`` in x's dtype for a product with x: written into the held buffer of
    :func:`lowbit.kernels.cpu_dequant.workspace` a piece at a time (a new full-size weight at every
    call costs page faults: a 4096x4096 AQLM weight took 32-36 ms to dequantize into a new fp32
    tensor, 6-7 ms into a held one, 2 cores), or a new tensor where autograd would keep it for the
    backward or ``torch.compile`` is tracing. The same values either way."""
    if not cpu_dequant.may_hold(x):
        return dequantize_codebook(codes, codebooks, scales).to(x.dtype)
    return cpu_dequant.codebook_weight(codes, codebooks, scales, x.dtype)


def matmul_codebook(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` (see :func:`lowbit.kernels.reference.matmul_codebook`).

    Args:
        x: fp ``[..., K]`` on the CPU.
        codes, codebooks, scales: as :func:`dequantize_codebook` takes them (:func:`supports`).
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if lut_applies(x2.shape[0], codebooks):
        y = lut_product(x2, codes, codebooks, scales).to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
    else:
        w = _weight(codes, codebooks, scales, x)  # [N, K] in x's dtype
        y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])
