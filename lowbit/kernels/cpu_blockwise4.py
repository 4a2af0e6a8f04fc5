"""NF4/FP4 weights on the CPU through PyTorch's int4 matmul, as two planes of 4-bit codes.

The reference (:func:`lowbit.kernels.reference.matmul_blockwise4`) dequantizes the whole weight at
every call. PyTorch's vectorized CPU int4 kernel (:mod:`lowbit.kernels.cpu_int4`) reads 4-bit
codes through an affine map per group and output, ``(q - 8) * s' + z'``, and NF4/FP4 code values are
not affine in their codes. Two codes are: every value of the 16-entry code table is written as

    quant_map[c] ~ a * i[c] + b * j[c] + c0        (i, j in 0..15; b about a / 20)

a coarse step and a fine one (:func:`two_plane_fit`). The weight is then held as two planes of
4-bit codes, ``i`` of every weight then ``j`` of every weight along K, each with the block's absmax
in its scale (``a * absmax``, ``b * absmax``), and x is repeated to meet them, as 8-bit grouped-int
codes are held (:class:`~lowbit.kernels.cpu_int4.CpuInt4` with two planes): a byte per weight,
beside the module's half-byte canonical buffers.

Precision. The fit is within :data:`FIT_TOLERANCE` of absmax of every table value (NF4 2.0e-3,
FP4 7.5e-4 of absmax; bf16 rounds a value in [0.5, 1) by up to 2.0e-3), and the kernel rounds x,
scales and offsets to bf16 (as for grouped-int weights): an fp32 layer's outputs are within about
0.5 % (norm-relative) of the reference's. ``LOWBIT_KERNEL=reference`` keeps the exact fp32 path, and
calibration passes over this kernel (:func:`lowbit.kernels.exact_kernels`).

The kernel's sub-groups of 32-256 inputs must each lie in one block: K a multiple of a sub-group
size that divides the block size (:func:`~lowbit.kernels.cpu_int4.kernel_group`). A block may span
rows (K = 96 in blocks of 64: sub-groups of 32).
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels.cpu_int4 import OUT_MULTIPLE, CpuInt4, kernel_group
from lowbit.kernels.cpu_int4 import available as cpu_int4_available
from lowbit.kernels.reference import blockwise4_absmax

FIT_TOLERANCE = 2.5e-3
"""The most a fitted code value may differ from the table's, as a fraction of absmax (the table's
values lie in [-1, 1]); :func:`two_plane_fit` refuses a table it cannot fit so closely."""

_COARSE_STEPS = 4001
"""Coarse steps tried by :func:`two_plane_fit`, between a sixteenth and a twelfth of the table's range."""


@functools.lru_cache(maxsize=8)
def _fit(values: tuple[float, ...],
         tolerance: float) -> tuple[float, float, float, tuple[int, ...], tuple[int, ...]] | None:
    v = torch.tensor(values, dtype=torch.float64)  # [16]
    lo, span = float(v.min()), float(v.max() - v.min())
    if span == 0:
        return None
    # The coarse step a leaves each value a residue mod a; the fine plane must cover the shortest
    # arc (of the circle of length a) that holds all 16 residues. Try many a, keep the shortest arc.
    a = torch.linspace(span / 16, span / 12, _COARSE_STEPS, dtype=torch.float64)  # [S]
    r, _ = torch.remainder(v - lo, a[:, None]).sort(dim=1)  # [S, 16]
    gaps = torch.cat([r[:, 1:] - r[:, :-1], r[:, :1] + a[:, None] - r[:, -1:]], dim=1)  # [S, 16]
    gap, after = gaps.max(dim=1)
    start = r.gather(1, ((after + 1) % 16)[:, None])[:, 0]  # the arc starts after its largest gap
    for s in (a - gap).argsort().tolist():
        step, c0 = float(a[s]), lo + float(start[s]) - float(a[s])
        i = torch.floor((v - c0) / step + 1e-9)
        c0, i = c0 + step * float(i.min()), i - i.min()
        if i.max() > 15:
            continue
        fine = float(a[s] - gap[s]) / 15
        j = torch.round((v - c0 - step * i) / fine).clamp(0, 15)
        # least squares for (a, b, c0) at these codes, the fine codes re-picked, a few times
        for _ in range(8):
            basis = torch.stack([i, j, torch.ones(16, dtype=torch.float64)], dim=1)  # [16, 3]
            step, fine, c0 = torch.linalg.lstsq(basis, v[:, None]).solution[:, 0].tolist()
            j = torch.round((v - c0 - step * i) / fine).clamp(0, 15)
        if (step * i + fine * j + c0 - v).abs().max() > tolerance:
            return None
        return step, fine, c0, tuple(i.long().tolist()), tuple(j.long().tolist())
    return None


def two_plane_fit(quant_map: torch.Tensor,
                  tolerance: float | None = None) -> tuple[float, float, float, torch.Tensor, torch.Tensor] | None:
    """``(a, b, c0, i, j)`` with ``a * i[c] + b * j[c] + c0`` within ``tolerance`` of
    ``quant_map[c]`` for every code ``c``, or None if no such fit is found.

    The search does not depend on the table being NF4's or FP4's: a table of 16 values drawn at
    random in [-1, 1] was fitted within 2.5e-3 too.

    Args:
        quant_map: fp32 ``[16]``, the code table (NF4's or FP4's; values in [-1, 1]).
        tolerance: the largest error allowed (None: :data:`FIT_TOLERANCE`).
    Returns:
        the coarse and fine steps ``a`` and ``b``, the offset ``c0``, and int32 ``[16]`` maps from a
        code to its coarse and fine codes ``i`` and ``j`` (0..15).
    """
    fit = _fit(tuple(quant_map.float().tolist()), FIT_TOLERANCE if tolerance is None else tolerance)
    if fit is None:
        return None
    step, fine, c0, i, j = fit
    return step, fine, c0, torch.tensor(i, dtype=torch.int32), torch.tensor(j, dtype=torch.int32)


def to_cpu_int4(weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int,
                shape: tuple[int, int], nested_absmax: torch.Tensor | None = None,
                nested_quant_map: torch.Tensor | None = None,
                nested_offset: torch.Tensor | None = None) -> CpuInt4 | None:
    """An NF4/FP4 weight (the buffers :func:`lowbit.kernels.reference.dequantize_blockwise4` takes,
    on the CPU) as two planes of 4-bit codes in the layout of PyTorch's CPU int4 kernel, or None
    where it cannot be held: no sub-group size (see the module docstring), or a code table
    :func:`two_plane_fit` cannot fit."""
    n, k = shape
    group = kernel_group(blocksize, k)
    fit = two_plane_fit(quant_map)
    # (a sub-group lies in one block: sub-groups and block sizes are powers of 2, and a sub-group
    # divides the block size, or K when a block is longer than a row)
    if group is None or fit is None or not cpu_int4_available():
        return None
    step, fine, c0, i_of, j_of = fit
    n16 = -(-n // OUT_MULTIPLE) * OUT_MULTIPLE
    data = weight.reshape(-1).view(torch.uint8)[: n * k // 2].view(n, k // 2).int()  # [N, K/2]: codes 2t, 2t+1
    codes = torch.full((n16, 2, k // 2, 2), 8, dtype=torch.int32)  # [N16, plane, K/2, 2]
    # (one tensor of 8 bytes a weight, temporaries of 2: on glibc large temporaries stay in the heap)
    for nibble, code in ((0, data >> 4), (1, data.bitwise_and_(15))):  # the codes of inputs 2t, then 2t + 1
        for plane, of in enumerate((i_of, j_of)):
            codes[:n, plane, :, nibble] = of.index_select(0, code.view(-1)).view(n, k // 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(n16, 2 * k), 1)  # [N16, K] uint8
    del codes
    scale = blockwise4_absmax(absmax, nested_absmax, nested_quant_map, nested_offset).double()  # [B]
    start = torch.arange(n)[:, None] * k + torch.arange(0, k, group)  # [N, K/group]: each sub-group's first value
    am = scale[start // blocksize].t()  # [K/group, N]
    sz = torch.cat([torch.stack([step * am, (c0 + 8 * step) * am], dim=-1),
                    torch.stack([fine * am, 8 * fine * am], dim=-1)])  # [2K/group, N, 2]
    sz = torch.nn.functional.pad(sz, (0, 0, 0, n16 - n))  # [2K/group, N16, 2]
    return CpuInt4(packed, sz.to(torch.bfloat16).contiguous(), group, None, n, planes=2)
