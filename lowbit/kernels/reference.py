"""Plain-PyTorch reference kernels: the specification, the CPU path and the test oracle.

Every accelerated kernel has a twin here with the same signature; tests compare against
these. Nothing here is tuned for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats.group_order import in_group_order
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
    return _dequantize_int_grouped_kn(qweight, scales, qzeros, g_idx, bits).t().contiguous()  # [N, K]


def _dequantize_int_grouped_kn(qweight, scales, qzeros, g_idx, bits) -> torch.Tensor:
    """:func:`dequantize_int_grouped` as fp32 ``[K, N]`` (the packed order; no transpose copy)."""
    k = g_idx.shape[0]
    n = scales.shape[1]
    q = unpack_int(qweight, bits, k, dim=0)  # [K, N]
    z = unpack_int(qzeros, bits, n, dim=1)  # [G, N]
    g = g_idx.long()
    n_groups = z.shape[0]
    in_order = (not torch.compiler.is_compiling() and k % n_groups == 0  # (a data-dependent test: eager only)
                and in_group_order(g, k // n_groups))
    if in_order:
        # groups in order and equal: broadcast each group's row instead of gathering K rows (same values)
        w = q.float().view(n_groups, k // n_groups, n)  # [G, K/G, N]
        return w.sub_(z[:, None]).mul_(scales.float()[:, None]).view(k, n)
    return q.float().sub_(z[g]).mul_(scales[g].float())  # [K, N]


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
    w = _dequantize_int_grouped_kn(qweight, scales, qzeros, g_idx, bits).to(x.dtype)  # [K, N]
    out = x @ w  # [..., N]
    return out if bias is None else out + bias.to(x.dtype)


def dequantize_blockwise8(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Blockwise 8-bit codes -> fp32: ``out[i] = code[codes[i]] * absmax[i // blocksize]``.

    Args:
        codes: uint8 ``[L]``.
        absmax: fp32 ``[ceil(L / blocksize)]``.
        code: fp32 ``[256]`` map (e.g. the dynamic map).
    Returns:
        fp32 ``[L]``.
    """
    v = code[codes.reshape(-1).long()]  # [L]
    return v * absmax.repeat_interleave(blocksize)[: v.numel()]


def blockwise4_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The blocks' absmax as dequantization uses it: fp32 ``[B]``, decoded from its 8-bit codes
    when double-quantized (see :func:`dequantize_blockwise4` for the arguments)."""
    if nested_absmax is None:
        return absmax.float()
    return dequantize_blockwise8(absmax, nested_absmax, nested_quant_map, 256) + nested_offset


def nibble_pairs(quant_map: torch.Tensor) -> torch.Tensor:
    """fp32 ``[256, 2]``: for each byte of a packed 4-bit weight, the code values of its high nibble
    (the even element) and its low nibble, from ``quant_map`` ``[16]``."""
    q = quant_map.float()
    return torch.stack([q.repeat_interleave(16), q.repeat(16)], dim=1)


def dequantize_blockwise4(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize an NF4/FP4 weight (bitsandbytes' 4-bit format, see
    :mod:`lowbit.formats.blockwise4`).

    Args:
        weight: ``[ceil(N*K/2)/itemsize, 1]`` of any storage dtype; as bytes, two 4-bit codes per
            byte, the even element in the high nibble.
        absmax: fp32 ``[B]``, or uint8 ``[B]`` codes of ``nested_quant_map`` when double-quantized.
        quant_map: fp32 ``[16]``.
        shape: ``(N, K)``.
        nested_absmax: fp32 ``[ceil(B/256)]`` (double quant only), with ``nested_quant_map``
            fp32 ``[256]`` and ``nested_offset`` fp32 ``[]``.
    Returns:
        fp32 ``[N, K]``.
    """
    absmax = blockwise4_absmax(absmax, nested_absmax, nested_quant_map, nested_offset)
    n = shape[0] * shape[1]
    data = weight.reshape(-1).view(torch.uint8)  # [ceil(N*K/2)]
    # one lookup per byte, the same values as quant_map[unpack_nibbles(weight, n)]
    w = torch.index_select(nibble_pairs(quant_map), 0, data.int()).view(-1)[:n]  # [N*K]
    if n % blocksize == 0:
        return w.view(-1, blocksize).mul_(absmax.float()[:, None]).view(shape)
    return (w * absmax.float().repeat_interleave(blocksize)[:n]).view(shape)


def matmul_blockwise4(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for an NF4/FP4 weight (see :func:`dequantize_blockwise4`), computed in
    ``compute_dtype`` (None: x's dtype); the result has x's dtype, shape ``[..., N]``."""
    dtype = compute_dtype or x.dtype
    w = dequantize_blockwise4(weight, absmax, quant_map, blocksize, shape,
                              nested_absmax, nested_quant_map, nested_offset).to(dtype)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype)).to(x.dtype)


def dequantize_int8_rows(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """Row-wise int8 -> fp32: ``W[n, k] = CB[n, k] * SCB[n] / 127``.

    Args:
        weight: int8 ``[N, K]`` (``CB``).
        scb: fp32 ``[N]``, absmax of each row.
    """
    return weight.float() * (scb / 127.0).unsqueeze(1)


def matmul_int8_weight_only(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8's weights with floating-point activations: ``x @ W.T + bias`` with the dequantized
    weight ``W = CB * SCB / 127`` (:func:`dequantize_int8_rows`) cast to x's dtype (what
    bitsandbytes' ``MatMul8bitFp`` computes, which it runs only while training on a CPU).
    ``[..., N]`` in x's dtype."""
    w = dequantize_int8_rows(weight, scb).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


EXACT_FP32_K = 1024
"""Columns per fp32 partial product in :func:`int_matmul_exact`: 1024 * 127 * 127 < 2**24, so every
partial sum of int8 products is an integer that fp32 holds exactly, in any summation order."""


def int_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [N, K].T`` -> int32 ``[M, N]``, exactly.

    Runs as fp32 matmuls over chunks of at most :data:`EXACT_FP32_K` columns whose results are
    exact integers, summed in int32 (on CPU this is ~10x faster than ``torch._int_mm``).
    """
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for k in range(0, a.shape[1], EXACT_FP32_K):
        acc += (a[:, k : k + EXACT_FP32_K].float() @ b[:, k : k + EXACT_FP32_K].float().t()).to(torch.int32)
    return acc


def int8_activation_codes(xf: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8's side of the activations ``xf`` (fp32 ``[M, K]``): the outlier columns (bool
    ``[K]``: any ``|x| >= threshold``; none when ``threshold == 0``), each row's absmax over the
    other columns (``[M]``), and the int8 codes ``CA = round(127 * x / absmax_row)`` (half to even,
    outlier columns 0)."""
    k = xf.shape[-1]
    outliers = (xf.abs() >= threshold).any(dim=0) if threshold > 0 else torch.zeros(k, dtype=torch.bool, device=xf.device)
    xi = xf.masked_fill(outliers, 0.0)
    row = xi.abs().amax(dim=1)  # [M]
    ca = torch.round(xi * (127.0 / row.clamp(min=1e-30)).unsqueeze(1)).to(torch.int8)  # [M, K]
    return outliers, row, ca


def int8_input_grad(grad: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """The gradient of LLM.int8's product with respect to its input, as bitsandbytes' ``MatMul8bitLt``
    takes it: ``grad @ W`` with the dequantized weight (rounding the activations to int8 has no
    useful gradient)."""
    return grad @ dequantize_int8_rows(weight, scb).to(grad.dtype)


def matmul_int8_outlier(
    x: torch.Tensor,
    weight: torch.Tensor,
    scb: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None = None,
    int_matmul=int_matmul_exact,
) -> torch.Tensor:
    """LLM.int8 ``x @ W.T + bias`` with mixed-precision outlier decomposition.

    Input columns where any row has ``|x| >= threshold`` (none when ``threshold == 0``) are
    multiplied in fp32 with the dequantized weight columns (under ``torch.compile``, as a masked
    product over all columns, so the graph has no data-dependent shapes). The rest of ``x`` is quantized per
    row, ``CA = round(127 * x / absmax_row)``, multiplied with ``CB`` in int32 and scaled by
    ``absmax_row * SCB / 127**2``.

    Args:
        x: fp ``[..., K]``.
        weight: int8 ``[N, K]``; scb: fp32 ``[N]``.
        bias: ``[N]`` or None.
        int_matmul: ``(int8 [M, K], int8 [N, K]) -> int32 [M, N]``; a kernel passes its own.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    xf = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    outliers, row, ca = int8_activation_codes(xf, threshold)
    acc = int_matmul(ca, weight).float()  # [M, N]
    out = acc * (row.unsqueeze(1) * scb.unsqueeze(0)) / (127.0 * 127.0)
    if torch.compiler.is_compiling():
        # no shape that depends on the data under torch.compile: the outlier columns as a mask over
        # a full fp32 product (the same nonzero terms; the sums may round differently)
        out = out + xf.masked_fill(~outliers, 0.0) @ dequantize_int8_rows(weight, scb).t()
    elif outliers.any():
        w_out = dequantize_int8_rows(weight[:, outliers], scb)  # [N, K_outlier]
        out = out + xf[:, outliers] @ w_out.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codebook indices as int64 in ``[0, 2**nbits)``.

    AQLM stores ``nbits``-bit indices in the smallest signed int dtype that holds them, indices
    of ``2**(nbits-1)`` and up as their two's-complement negatives (``idx - 2**nbits``);
    reading takes them modulo ``2**nbits``.
    """
    return codes.long() & ((1 << nbits) - 1)


def dequantize_codebook(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize the additive-codebook (AQLM) weight.

    Args:
        codes: int8/int16 ``[N/og, K/ig, C]``, one index per codebook for each group of ``og``
            outputs x ``ig`` inputs (stored as :func:`unpack_codes` reads them).
        codebooks: fp ``[C, 2**nbits, og, ig]``.
        scales: fp ``[N/og, 1, 1, 1]``, one per output group.

    Returns:
        fp32 ``[N, K]``: group ``(o, i)`` is ``scales[o] * sum_c codebooks[c, codes[o, i, c]]``.
    """
    n_codebooks, size, og, ig = codebooks.shape
    go, gi, _ = codes.shape
    idx = unpack_codes(codes, size.bit_length() - 1)  # [Go, Gi, C]
    groups = torch.zeros(go, gi, og, ig, dtype=torch.float32, device=codes.device)
    for c in range(n_codebooks):
        groups += codebooks[c].float()[idx[..., c]]  # [Go, Gi, og, ig]
    groups *= scales.float()  # [Go, 1, 1, 1]
    return groups.permute(0, 2, 1, 3).reshape(go * og, gi * ig)


def matmul_codebook(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the additive-codebook weight (see :func:`dequantize_codebook`).

    Args:
        x: fp ``[..., K]``; the result has x's dtype, shape ``[..., N]``.
        bias: ``[N]`` or None.
    """
    w = dequantize_codebook(codes, codebooks, scales).to(x.dtype)  # [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
