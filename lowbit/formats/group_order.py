"""The group-ordered layout of a grouped-int weight: what the Triton kernels read.

An act-order (``desc_act``) checkpoint stores codes in the model's input order with a permuted
``g_idx``, so neighbouring input columns belong to different groups and a kernel would have to
gather a scale and zero per column. Reordering the rows of ``qweight`` once, so that every group
is a contiguous run of ``group_size`` rows, and permuting the activations instead (``x[..., perm]``,
the exllama trick) lets act-order weights run at the speed of plain ones. The checkpoint keeps
the canonical layout: :func:`to_group_ordered` and :func:`from_group_ordered` convert exactly
both ways.

Worked example (K = 4, group_size = 2)::

    g_idx = [1, 0, 1, 0]          -> perm = [1, 3, 0, 2]   (stable argsort of g_idx)
    group-ordered row j holds canonical row perm[j]; its group is j // group_size = [0, 0, 1, 1]
    y = x @ W.T == x[..., perm] @ W_ordered.T
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.formats.packing import pack_int, unpack_int
from lowbit.kernels.held import HeldCalls


@dataclass(frozen=True)
class GroupOrdered:
    """A grouped-int weight whose groups are contiguous row runs.

    Attributes:
        qweight: int32 ``[ceil(K*bits/32), N]``, codes packed along K (as the canonical layout),
            row ``j`` holding input feature ``perm[j]``.
        scales: fp ``[G, N]``; group of row ``j`` is ``j // group_size``.
        qzeros: int32 ``[G, ceil(N*bits/32)]``, true zero points packed along N.
        perm: int32 ``[K]`` or None (identity: the canonical rows are already in group order).
        bits: 2, 3, 4 or 8.
        group_size: rows per group (the last group may be shorter); ``K`` for one group per row.
        held_calls: the Triton wrapper's held eager launches for this weight (see
            :class:`lowbit.kernels.held.HeldCall`); empty on a new layout, and not copied
            by ``dataclasses.replace``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int
    held_calls: HeldCalls = field(default_factory=HeldCalls, init=False, compare=False, repr=False)


def in_group_order(g_idx: torch.Tensor, size: int) -> bool:
    """Whether ``g_idx`` reads ``arange(K) // size``: groups of ``size`` columns in input order (no
    act-order permutation; the last group may be shorter)."""
    return torch.equal(g_idx.long(), torch.arange(g_idx.numel(), device=g_idx.device) // size)


def contiguous_group_size(g_idx: torch.Tensor, groups: int) -> int | None:
    """The run length that sorting ``g_idx`` gives, or None if the runs are unequal.

    Sorted, ``g_idx`` must read ``arange(K) // group_size`` with ``groups`` groups: every group
    ``group_size`` columns long except a shorter last one. GPTQ's act-order and static groups
    always give this; a hand-made ``g_idx`` may not.
    """
    k = g_idx.numel()
    counts = torch.bincount(g_idx.long().cpu(), minlength=groups)
    size = int(counts.max())
    if size == 0 or -(-k // size) != groups or counts.numel() != groups:
        return None
    want = torch.full((groups,), size, dtype=counts.dtype)
    want[-1] = k - size * (groups - 1)
    return size if torch.equal(counts, want) else None


def to_group_ordered(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> GroupOrdered | None:
    """Canonical grouped-int tensors -> :class:`GroupOrdered`, or None if groups are unequal.

    Args are the canonical buffers (see :mod:`lowbit.formats.int_grouped`). A ``g_idx`` already
    equal to ``arange(K) // group_size`` gives ``perm=None`` and shares ``qweight``; otherwise
    ``qweight``'s rows are unpacked, permuted and repacked (one copy, on ``qweight``'s device).
    """
    k = g_idx.numel()
    size = contiguous_group_size(g_idx, scales.shape[0])
    if size is None:
        return None
    if in_group_order(g_idx, size):
        return GroupOrdered(qweight, scales, qzeros, None, bits, size)
    perm = torch.argsort(g_idx.long(), stable=True)  # [K]
    q = unpack_int(qweight, bits, k, dim=0)  # [K, N]
    ordered = pack_int(q[perm], bits, dim=0)
    return GroupOrdered(ordered, scales, qzeros, perm.to(torch.int32), bits, size)


def from_group_ordered(layout: GroupOrdered, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_group_ordered`: the canonical ``(qweight, g_idx)`` for ``k`` inputs."""
    order = torch.arange(k, device=layout.qweight.device, dtype=torch.int32) // layout.group_size
    if layout.perm is None:
        return layout.qweight, order
    perm = layout.perm.long()
    q = unpack_int(layout.qweight, layout.bits, k, dim=0)  # [K, N], group order
    canonical = torch.empty_like(q)
    canonical[perm] = q
    g_idx = torch.empty_like(order)
    g_idx[perm] = order
    return pack_int(canonical, layout.bits, dim=0), g_idx
