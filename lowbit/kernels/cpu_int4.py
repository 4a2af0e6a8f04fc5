"""Grouped-int weights (2, 3, 4 and 8 bits) on the CPU through PyTorch's int4 matmul.

The reference path dequantizes the whole weight at every call, which on a CPU costs far more than
the product: a 4-bit SmolLM2 decoded at 0.18-0.24x the fp32 model's speed that way
(``docs/performance.md``). PyTorch ships a vectorized CPU kernel that reads 4-bit codes and
multiplies in bf16 with fp32 accumulation (``aten._weight_int4pack_mm_for_cpu``). This module
converts a grouped-int weight to its layout once (a load-time layout, held by the module beside its
canonical buffers) and calls it.

What the kernel computes, per output ``n`` and input ``k`` in group ``g``::

    y[m, n] = sum_k bf16(x[m, k]) * ((q[k, n] - 8) * s'[g, n] + z'[g, n])

with ``s' = bf16(s)`` and ``z' = bf16((8 - zero) * s)``, so ``(q - 8) * s' + z'`` is the canonical
``(q - zero) * s`` up to bf16 rounding of the scale and offset. x is rounded to bf16 and the result
is returned in x's dtype: an fp32 model's quantized layers run in bf16 on this path
(``LOWBIT_KERNEL=reference`` keeps them in fp32). The tests hold it to a relative error of 1e-2
against the reference (``CPU_INT4_REL``).

The kernel takes groups of 32, 64, 128 or 256 inputs and a multiple of 16 outputs. A weight's
groups are split into sub-groups of the largest such size that divides both the group size and K
(K = 576 at group size 128 gives sub-groups of 64, each with its group's scale); outputs are padded
to a multiple of 16 with zero columns that are cut from the result. An act-order weight is taken in
its group order (:func:`lowbit.formats.group_order.to_group_ordered`) and x is permuted to match.
2- and 3-bit codes are held as 4-bit ones (the same affine formula over fewer values), so the layout
takes half a byte per weight at up to 4 bits.

8-bit codes are held as two *planes* of 4-bit codes, ``q = 16 * h + l``: the high nibbles ``h`` with
the scale ``16 * s`` and offset ``(128 - zero) * s``, then the low nibbles ``l`` with ``s`` and ``8 * s``,
laid one after the other along K (``2K`` codes per output, a byte per weight), and x is repeated to
meet them::

    y[m, n] = sum_k bf16(x[m, k]) * (((h - 8) * 16 s' + z'_h) + ((l - 8) * s' + z'_l))

which is ``(q - zero) * s`` up to the same bf16 rounding of scales and offsets (``16 s'`` is exact;
a symmetric weight, zero 128, has ``z'_h = 0``). The same planes hold NF4/FP4 code values
(:mod:`lowbit.kernels.cpu_blockwise4`).
The packed codes are in PyTorch's own blocked order (``_convert_weight_to_int4pack_for_cpu``), which
only PyTorch's kernel reads; the canonical buffers stay the module's state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.formats.group_order import to_group_ordered
from lowbit.formats.packing import unpack_int

GROUPS = (256, 128, 64, 32)
"""The group sizes PyTorch's kernel takes, largest first."""

OUT_MULTIPLE = 16
"""PyTorch's layout holds outputs in blocks of 16."""

BITS = (2, 3, 4, 8)
"""Code widths the layout holds (as 4-bit codes, 8 as two planes of them)."""

DTYPES = (torch.float32, torch.bfloat16)
"""Input dtypes taken: fp32 (rounded to bf16 for the product) and bf16. PyTorch's fp16 and fp32
kernels are not vectorized (35-45x slower than its bf16 one at one token on SmolLM2's shapes here)."""


@dataclass(frozen=True)
class CpuInt4:
    """A grouped-int weight of 2 to 4 bits in the layout of PyTorch's CPU int4 kernel.

    Attributes:
        packed: uint8 ``[N16, P*K/2]``, ``N16`` = N rounded up to a multiple of 16: the codes in
            group order, ``P`` planes of them one after the other along K, in PyTorch's blocked
            layout (``_convert_weight_to_int4pack_for_cpu``).
        scales_zeros: bf16 ``[P*K/group, N16, 2]``: per sub-group of ``group`` inputs, ``s'`` and
            ``z'`` (see the module docstring); zero in the padding columns.
        group: inputs per sub-group (32, 64, 128 or 256).
        perm: int64 ``[K]`` or None: the input order of the codes (``x[..., perm]`` meets them).
        out_features: N.
        planes: ``P``, 4-bit codes per weight (1; 2 for 8-bit codes and NF4/FP4): x is repeated
            ``P`` times along K.
    """

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    group: int
    perm: torch.Tensor | None
    out_features: int
    planes: int = 1


@functools.cache
def available() -> bool:
    """Whether this PyTorch has the CPU int4 kernel and its packing op."""
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def kernel_group(group_size: int, k: int) -> int | None:
    """The largest sub-group size the kernel takes that divides ``group_size`` (or, when one group
    spans all of K, K itself) and K; None if there is none."""
    for g in GROUPS:
        if k % g == 0 and (group_size >= k or group_size % g == 0):
            return g
    return None


def to_cpu_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor,
                bits: int) -> CpuInt4 | None:
    """Canonical grouped-int buffers (see :mod:`lowbit.formats.int_grouped`) -> :class:`CpuInt4`,
    or None when the kernel cannot hold the weight: bits not in :data:`BITS`, groups of unequal
    size, or no sub-group size (:func:`kernel_group`). The buffers must be on the CPU."""
    if bits not in BITS or not available():
        return None
    k, n = g_idx.numel(), scales.shape[1]
    ordered = to_group_ordered(qweight, scales, qzeros, g_idx, bits)
    if ordered is None:
        return None
    group = kernel_group(ordered.group_size, k)
    if group is None:
        return None
    n16 = -(-n // OUT_MULTIPLE) * OUT_MULTIPLE
    codes = _codes_nk(ordered.qweight, bits, k, n16)  # [N16, P*K] int32: P = 2 planes for 8 bits
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # [N16, P*K/2] uint8
    del codes
    of_sub = torch.arange(0, k, group) // ordered.group_size  # [K/group]: each sub-group's group
    s = ordered.scales.float()[of_sub]  # [K/group, N]
    zero = unpack_int(ordered.qzeros, bits, n, dim=1)[of_sub].float()  # [K/group, N]
    if bits == 8:
        sz = torch.cat([torch.stack([16 * s, (128 - zero) * s], dim=-1),
                        torch.stack([s, 8 * s], dim=-1)])  # [2K/group, N, 2]
    else:
        sz = torch.stack([s, (8 - zero) * s], dim=-1)  # [K/group, N, 2]
    sz = torch.nn.functional.pad(sz, (0, 0, 0, n16 - n))  # [P*K/group, N16, 2]
    perm = None if ordered.perm is None else ordered.perm.long()
    return CpuInt4(packed, sz.to(torch.bfloat16).contiguous(), group, perm, n, 2 if bits == 8 else 1)


def _codes_nk(qweight: torch.Tensor, bits: int, k: int, rows: int) -> torch.Tensor:
    """The codes of ``qweight`` (int32 ``[ceil(K*bits/32), N]``, packed along K, LSB first; K a
    multiple of 32) as the int32 ``[rows, K]`` that PyTorch's packing takes, rows past N padded
    with code 8; 8-bit codes as ``[rows, 2K]``, their high nibbles then their low ones.

    One tensor of the result's size is allocated, and temporaries are smaller: this runs once per
    layer, and on glibc larger temporaries stay in the process's heap once freed. 2-, 4- and 8-bit
    codes come whole out of their words (one shift writes the result, the mask works in place); 3-bit
    ones straddle words, 32 codes in every 3 words, and are read one position of the 32 at a time."""
    n = qweight.shape[1]
    width = 2 * k if bits == 8 else k
    codes = torch.full((rows, width), 8, dtype=torch.int32) if rows != n else torch.empty(n, width, dtype=torch.int32)
    first = codes[:n, :k]  # [N, K]: the codes (8 bits: their high nibbles, once split)
    if 32 % bits:
        words = qweight.view(-1, bits, n)  # [K/32, bits, N]: each period's words
        out = first.view(n, -1, 32)  # [N, K/32, 32]
        for j in range(32):
            word, shift = divmod(j * bits, 32)
            v = words[:, word] >> shift  # [K/32, N]
            if shift + bits > 32:  # the code's high bits are the next word's low ones
                v = (v & ((1 << (32 - shift)) - 1)) | (words[:, word + 1] << (32 - shift))
            out[:, :, j] = (v & ((1 << bits) - 1)).t()
        return codes
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [32/bits]
    words = qweight.t()[:, :, None]  # [N, K*bits/32, 1], a view
    torch.bitwise_right_shift(words, shifts, out=first.view(n, -1, 32 // bits))  # -> rows of codes
    first.bitwise_and_((1 << bits) - 1)  # the other codes' bits, and the arithmetic shift's sign bits
    if bits == 8:  # q = 16 * h + l: the low nibbles to the second plane, the high ones stay
        torch.bitwise_and(first, 15, out=codes[:n, k:])
        first.bitwise_right_shift_(4)
    return codes


def matmul_cpu_int4(x: torch.Tensor, w: CpuInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with PyTorch's CPU int4 kernel.

    Args:
        x: fp32 or bf16 ``[..., K]`` on the CPU.
        w: the weight (:func:`to_cpu_int4`).
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in x's dtype (computed in bf16 with fp32 accumulation).
    """
    shape = x.shape
    x2 = x if len(shape) == 2 else x.reshape(-1, shape[-1])  # [M, K]
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    if x2.dtype != torch.bfloat16:  # (each test skips a call that would return its input: a decode step makes ~200)
        x2 = x2.to(torch.bfloat16)
    if w.planes > 1:
        x2 = x2.repeat(1, w.planes)  # [M, P*K]
    elif not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group, w.scales_zeros)  # [M, N16] bf16
    n = w.out_features
    if y.shape[1] != n:
        y = y[:, :n]
    if x.dtype != torch.bfloat16:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + (bias if bias.dtype == x.dtype else bias.to(x.dtype))
    return y if len(shape) == 2 else y.reshape(*shape[:-1], n)
