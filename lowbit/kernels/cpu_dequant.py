"""Quantized weights on the CPU at many rows: dequantize to bf16 a cache-sized piece at a time, then
one bf16 matmul.

At one or a few rows a CPU product with a quantized weight is bound by reading the weight, and
PyTorch's int4 kernel (:mod:`lowbit.kernels.cpu_int4`) reads the fewest bytes. At many rows the
multiplies dominate, and there oneDNN's bf16 matmul is about twice as fast as the int4 kernel on
this project's CPU (``bench/cpu.py``, ``docs/performance.md``): past :data:`MIN_ROWS` rows
(:data:`PLANES_MIN_ROWS` for the weights it reads as two planes of codes), writing the weight out as
bf16 once per call and multiplying costs less than multiplying through the codes.
AQLM weights (``cpu-codebook`` above 8 rows dequantizes to fp32 and multiplies in fp32) take it from
:data:`CODEBOOK_MIN_ROWS` rows: the same dequantize, written to bf16, and a product of half the cost.

The weight is written :data:`PIECE` values at a time, so that a piece's temporaries (its unpacked
codes, in int32 and fp32) stay in cache instead of making full-size int32 and fp32 copies of the
weight, into a per-thread bf16 workspace that grows to the largest weight seen and is kept, as are
the pieces' temporaries: a new buffer of a large weight at every call costs page faults (a
4096x11008 weight: 39 ms into a new buffer against 15 ms into a held one, 2 cores). The workspace
holds the largest layer's weight in bf16, two bytes a weight, and 8 bytes a value of one piece
(8 MiB at most; 12 MiB with AQLM's second codebook).

Each dequantized value is computed in fp32 as the reference computes it and rounded once to bf16; x
is rounded to bf16 and the product accumulates in fp32 (oneDNN), so the result differs from the
reference by bf16 rounding, as the int4 kernel's does. No autograd, and eager only (the workspace is
Python state that ``torch.compile`` would not trace).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from lowbit.formats.group_order import in_group_order
from lowbit.formats.packing import unpack_int
from lowbit.kernels.reference import blockwise4_absmax, nibble_pairs

MIN_ROWS = 128
"""The fewest rows of x that this path takes for 2- to 4-bit grouped-int weights: below, the int4
kernel is faster (``bench/cpu.py``'s ``dequant + bf16`` column against its kernel column: on 2
cores the two cross between 64 and 128 rows at SmolLM2's and Llama-7B's shapes)."""

PLANES_MIN_ROWS = 64
"""The fewest rows for 8-bit grouped-int and NF4/FP4 weights, which the int4 kernel reads as two
planes of codes, twice the work of a 4-bit weight: there the two cross between 32 and 64 rows. On
2 cores a 64-token prompt of an NF4 SmolLM2 prefilled at 337-345 tokens/s this way against 270-272
through the planes, an 8-bit one at 272-362 against 237-251 (``lowbit bench e2e``, two runs each)."""

CODEBOOK_MIN_ROWS = 9
"""The fewest rows an AQLM weight takes this path at: above the 8 rows of ``cpu-codebook``'s table
lookups (:data:`lowbit.kernels.cpu_codebook.LUT_MAX_ROWS`), where that kernel dequantizes in fp32 and
multiplies in fp32 instead. Dequantizing costs about the same either way, the bf16 product about
half (``bench/cpu.py --format aqlm-2x8``)."""

PIECE = 1 << 20
"""Weight values dequantized per step (4 MiB of int32 codes, within the L3 of a server CPU). Every
op of a step costs a few µs beside its work, so smaller steps lose: 576x576, 1536x576 and
4096x4096 weights dequantized at 0.95, 0.81 and 0.36 ns a weight in steps of 2**17 values, at
0.54, 0.34 and 0.40 in steps of 2**20 (2 cores, ``python bench/cpu.py``'s layers)."""

DTYPES = (torch.float32, torch.bfloat16)
"""Input dtypes taken (fp32 rounded to bf16 for the product, as the int4 kernel does)."""

_local = threading.local()


def workspace(numel: int, dtype: torch.dtype = torch.bfloat16, slot: str = "weight") -> torch.Tensor:
    """A ``[numel]`` buffer of ``dtype`` of this thread under ``slot``, reused by every call (contents
    undefined); it grows to the largest size asked for and is kept."""
    key = (slot, dtype)
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs[key] = None  # free the old one before the larger one is allocated
        with torch.inference_mode(False):  # made in inference mode, it could not be written outside it
            buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def may_hold(x: torch.Tensor) -> bool:
    """Whether a product with x may take its weight from a :func:`workspace`: no gradient to record
    (autograd would keep the weight, which the next call overwrites) and not being traced."""
    return not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


def applies(x: torch.Tensor, in_features: int, min_rows: int = MIN_ROWS) -> bool:
    """Whether x (``[..., K]``) takes this path: on the CPU, fp32 or bf16, at least ``min_rows``
    rows, and :func:`may_hold`."""
    return x.is_cpu and x.dtype in DTYPES and x.numel() >= min_rows * in_features and may_hold(x)


def int_grouped_into(out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     g_idx: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Write the grouped-int weight, transposed, into ``out``: bf16 ``[K, N]``,
    ``out[k, n] = bf16((q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n])`` (the product in fp32).

    Args:
        out: bf16 ``[K, N]``, contiguous.
        qweight, scales, qzeros, g_idx, bits: the canonical buffers, as
            :func:`lowbit.kernels.reference.dequantize_int_grouped` takes them.
        group_size: inputs per group, -1 for one group per row (groups in order take a faster path).
    Returns:
        ``out``.
    """
    k, n = out.shape
    groups = scales.shape[0]
    size = k if group_size == -1 else group_size  # rows per group (the last may be shorter)
    in_order = in_group_order(g_idx, size)
    z = unpack_int(qzeros, bits, n, dim=1)  # [G, N] int32
    s = scales.float()  # [G, N]
    # a piece starts at a word boundary (3-bit codes fill 3 words per 32) and, with groups in order,
    # at a group's first row
    step = math.lcm(32, size) if in_order and groups > 1 else 32
    rows = max(step, PIECE // n // step * step)
    rows = min(rows, -(-k // 32) * 32)  # (whole words of the last piece's codes)
    codes = workspace(rows * n, torch.int32, "piece").view(rows, n)  # one piece's codes, then q - z
    values = workspace(rows * n, torch.float32, "piece").view(rows, n)  # one piece's fp32 values
    for k0 in range(0, k, rows):
        k1 = min(k, k0 + rows)
        r = k1 - k0
        q = _unpack_rows(qweight[k0 * bits // 32: -(-k1 * bits // 32)], bits, codes)[:r]  # [r, N]
        v = values[:r]
        if not in_order:  # act-order: each row's group gathered
            g = g_idx[k0:k1].long()
            v.copy_(q.sub_(z[g])).mul_(s[g])
        elif groups == 1:
            v.copy_(q.sub_(z)).mul_(s)
        else:  # each group's row broadcast over its rows (a shorter last group apart)
            g0, whole = k0 // size, r // size * size
            g1 = g0 + whole // size
            v[:whole].view(-1, size, n).copy_(q[:whole].view(-1, size, n).sub_(z[g0:g1, None])).mul_(s[g0:g1, None])
            if whole < r:
                v[whole:].copy_(q[whole:].sub_(z[g1])).mul_(s[g1])
        out[k0:k1].copy_(v)
    return out


_SHIFTS = {b: torch.arange(0, 32, b, dtype=torch.int32) for b in (2, 4, 8)}
"""The shift of each code in a word, for widths that fill words whole."""


def _unpack_rows(words: torch.Tensor, bits: int, codes: torch.Tensor) -> torch.Tensor:
    """Codes packed along K (int32 ``[W, N]``, as ``qweight``) into ``codes`` (int32 ``[>= R, N]``);
    returns its first ``R`` rows, ``R`` the codes the words hold (``32 * W / bits``; 3 bits: whole
    periods of 3 words, or :func:`unpack_int` of the last words). :func:`unpack_int` into a held
    buffer: a new buffer for every piece would cost what the held workspace saves."""
    w, n = words.shape
    if 32 % bits:
        r = w * 32 // bits
        return codes[:r].copy_(unpack_int(words, bits, r, dim=0))
    per = 32 // bits
    dst = codes[: w * per]
    torch.bitwise_right_shift(words[:, None, :], _SHIFTS[bits][:, None], out=dst.view(w, per, n))
    return dst.bitwise_and_((1 << bits) - 1)  # the other codes' bits, and an arithmetic shift's sign bits


def blockwise4_into(out: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                    blocksize: int) -> torch.Tensor:
    """Write an NF4/FP4 weight into ``out``: bf16 ``[N*K]``, ``out[i] = bf16(quant_map[code i] *
    absmax[i // blocksize])``, in the weight's row-major ``[N, K]`` order.

    Args:
        out: bf16 ``[N*K]``, contiguous; ``N*K`` a multiple of ``blocksize``.
        weight: the packed codes, as :func:`lowbit.kernels.reference.dequantize_blockwise4` takes them.
        absmax: fp32 ``[N*K / blocksize]``, decoded (:func:`~lowbit.kernels.reference.blockwise4_absmax`).
        quant_map: fp32 ``[16]``.
    Returns:
        ``out``.
    """
    data = weight.reshape(-1).view(torch.uint8)  # [N*K/2]: two codes a byte, the even element high
    # each byte's two fp32 values as one 8-byte word: a 1-D lookup of words took 0.55 of the time
    # of a lookup of [256, 2] rows here
    pairs = nibble_pairs(quant_map).view(torch.int64).view(256)  # [256]
    blocks = max(1, PIECE // blocksize)  # blocks per piece
    total = out.numel() // blocksize
    blocks = min(blocks, total)
    index = workspace(blocks * blocksize // 2, torch.int32, "piece")  # one piece's bytes
    values = workspace(blocks * blocksize, torch.float32, "piece")  # one piece's fp32 values
    for b0 in range(0, total, blocks):
        b1 = min(total, b0 + blocks)
        c = (b1 - b0) * blocksize
        i = index[: c // 2].copy_(data[b0 * blocksize // 2: b1 * blocksize // 2])
        v = torch.index_select(pairs, 0, i, out=values[:c].view(torch.int64)).view(torch.float32)  # [c]
        out[b0 * blocksize: b1 * blocksize].copy_(v.view(-1, blocksize).mul_(absmax[b0:b1, None]).view(-1))
    return out


def blockwise4_applies(shape: tuple[int, int], blocksize: int) -> bool:
    """Whether :func:`blockwise4_into` takes a weight of ``shape`` ``(N, K)``: whole blocks."""
    return shape[0] * shape[1] % blocksize == 0


def codebook_into(out: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                  scales: torch.Tensor) -> torch.Tensor:
    """Write an AQLM weight of one output per group into ``out`` (``[N*K]`` in the weight's row-major
    ``[N, K]`` order): each value ``scale * sum_c codeword_c`` with the sum and product in fp32,
    codebook by codebook, as :func:`lowbit.kernels.reference.dequantize_codebook` computes it, then
    rounded once to ``out``'s dtype (in fp32, the reference's weight itself).

    Each codebook is one ``index_select`` of ``ig``-value rows per piece. (A table of every sum of
    two codewords, one lookup for 2x8, was no faster: building it, 65,536 rows, took about 0.1 ms a
    call.)

    Args:
        out: bf16, fp16 or fp32 ``[N*K]``, contiguous.
        codes, codebooks, scales: as :func:`lowbit.kernels.cpu_codebook.dequantize_codebook` takes
            them (``codebooks`` ``[C, 2**nbits, 1, ig]``).
    Returns:
        ``out``.
    """
    n_codebooks, size, _, ig = codebooks.shape
    n, gi, _ = codes.shape
    k = gi * ig
    books = codebooks.float().view(n_codebooks, size, ig)
    rows = max(1, min(n, PIECE // k))  # output rows per piece
    index = workspace(rows * gi, torch.int32, "piece").view(rows, gi)  # one codebook's indices of a piece
    dst = out.view(n, k)
    direct = out.dtype == torch.float32  # the sums made in place: no piece buffer and no copy
    values = None if direct else workspace(rows * k, torch.float32, "piece").view(rows, k)  # the piece's sums
    extra = workspace(rows * k, torch.float32, "piece2").view(rows, k) if n_codebooks > 1 else None
    s = scales.float().view(n, 1)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        r = n1 - n0
        v = dst[n0:n1] if direct else values[:r]
        for c in range(n_codebooks):
            # AQLM's signed storage read modulo the codebook's size (int8 -1 is entry 255 of 2**8)
            i = index[:r].copy_(codes[n0:n1, :, c]).bitwise_and_(size - 1).view(-1)
            if c == 0:
                torch.index_select(books[0], 0, i, out=v.view(-1, ig))
            else:
                v += torch.index_select(books[c], 0, i, out=extra[:r].view(-1, ig)).view(r, k)
        v.mul_(s[n0:n1])
        if not direct:
            dst[n0:n1].copy_(v)
    return out


def codebook_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An AQLM weight ``[N, K]`` in ``dtype``, written into this thread's :func:`workspace` by
    :func:`codebook_into`: valid until the workspace is written again."""
    n, k = codes.shape[0], codes.shape[1] * codebooks.shape[3]
    return codebook_into(workspace(n * k, dtype), codes, codebooks, scales).view(n, k)


def matmul_int_grouped(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor, bits: int, group_size: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a grouped-int weight: dequantized to bf16 (:func:`int_grouped_into`),
    then one bf16 matmul.

    Args:
        x: fp32 or bf16 ``[..., K]`` on the CPU.
        qweight, scales, qzeros, g_idx, bits, group_size: as :func:`int_grouped_into`.
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    k, n = g_idx.numel(), scales.shape[1]
    w = int_grouped_into(workspace(k * n).view(k, n), qweight, scales, qzeros, g_idx, bits,
                         group_size)  # [K, N]
    x2 = x.reshape(-1, k).to(torch.bfloat16)  # [M, K]
    return _finish(torch.mm(x2, w), x, bias)


def matmul_blockwise4(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                      blocksize: int, shape: tuple[int, int], nested_absmax: torch.Tensor | None = None,
                      nested_quant_map: torch.Tensor | None = None, nested_offset: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an NF4/FP4 weight (the arguments of
    :func:`lowbit.kernels.reference.matmul_blockwise4`; :func:`blockwise4_applies`): dequantized to
    bf16 (:func:`blockwise4_into`), then one bf16 matmul; ``[..., N]`` in x's dtype."""
    n, k = shape
    decoded = blockwise4_absmax(absmax, nested_absmax, nested_quant_map, nested_offset)  # [B] fp32
    w = blockwise4_into(workspace(n * k), weight, decoded, quant_map.float(), blocksize).view(n, k)
    x2 = x.reshape(-1, k).to(torch.bfloat16)  # [M, K]
    return _finish(F.linear(x2, w), x, bias)


def matmul_codebook(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an AQLM weight of one output per group (the arguments of
    :func:`lowbit.kernels.reference.matmul_codebook`): dequantized to bf16 (:func:`codebook_into`),
    then one bf16 matmul; ``[..., N]`` in x's dtype."""
    w = codebook_weight(codes, codebooks, scales)  # [N, K]
    x2 = x.reshape(-1, w.shape[1]).to(torch.bfloat16)  # [M, K]
    return _finish(F.linear(x2, w), x, bias)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 ``y`` ``[M, N]`` -> x's dtype and shape, plus ``bias``."""
    y = y.to(x.dtype)
    if bias is not None:
        y += bias if bias.dtype == x.dtype else bias.to(x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])
