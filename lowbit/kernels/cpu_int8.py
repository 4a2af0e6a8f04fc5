"""LLM.int8 weights on the CPU through PyTorch's int8-weight matmul.

The reference path multiplies the int8 codes as fp32 matmuls over chunks of K, converting the
whole weight to fp32 at every call (:func:`lowbit.kernels.reference.int_matmul_exact`), so an
LLM.int8 SmolLM2 on a CPU decoded at 0.60x its fp32 original's speed (``docs/performance.md``).
PyTorch ships a vectorized CPU kernel that reads an int8 weight and multiplies it with a bf16
input in fp32 accumulation, rounding each output to bf16
(``aten._weight_int8pack_mm``, ``y = x @ W.T * scales``). It reads the module's own weight
buffer as it is: no held layout.

With int8 activations (LLM.int8 proper) the kernel takes the place of the integer product only.
The activation codes ``CA`` (integers of at most 127 in magnitude, exact in bf16) multiply the
weight codes ``CB`` with unit scales; the outlier columns, the row and column scaling and the bias
are the reference's, in fp32. With a gradient to record, the module runs the reference's function
(:func:`lowbit.kernels.reference.matmul_int8_outlier`) with :func:`int8_product` as its
``int_matmul``; without, :func:`matmul_int8_outlier` takes the same steps in fewer operations
(14-18 % less time per one-token call than the reference's function with the kernel's product).
The one difference from the reference is that each integer sum comes back rounded to bf16, eight
significant bits: a relative error of at most ``2**-8`` of that output (bf16's unit roundoff),
where the reference's sums are exact.

Weight-only (``int8_activations=False``): ``y = bf16(x) @ CB.T`` in the kernel, then
``* SCB / 127`` and the bias in fp32.

PyTorch's kernel (``aten/src/ATen/native/cpu/int8mm_kernel.cpp``) reads K in steps of 16 with
aligned vector loads: the input's rows 32 bytes at a time (AVX512; 16 on AVX2), the weight's rows
16 bytes at a time. Misaligned rows crash the process (K = 8, 24 or 100; a weight 8 bytes off, as
safetensors returned them before the loader realigned them). So the kernel takes a weight only
when K is a multiple of 16 and its rows are 16-byte aligned (:func:`weight_supported`), and the
inputs it passes are its own 64-byte aligned copies (:func:`_aligned`).
"""

from __future__ import annotations

import functools

import torch

K_MULTIPLE = 16
"""The kernel's step along K: layers taken have K a multiple of this."""

WEIGHT_ALIGN = 16
"""Bytes: the kernel loads each weight row from an address that is a multiple of this."""

INPUT_ALIGN = 32
"""Bytes: the kernel loads each input row from an address that is a multiple of this."""


@functools.cache
def available() -> bool:
    """Whether this PyTorch has the int8-weight matmul."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def weight_supported(weight: torch.Tensor) -> bool:
    """Whether the kernel can read ``weight`` (int8 ``[N, K]``) in place: K a multiple of
    :data:`K_MULTIPLE`, contiguous, at an address that is a multiple of :data:`WEIGHT_ALIGN`
    (so every row is)."""
    return (weight.shape[1] % K_MULTIPLE == 0 and weight.is_contiguous()
            and weight.data_ptr() % WEIGHT_ALIGN == 0)


@functools.lru_cache(maxsize=256)
def _unit_scales(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16)  # [N] (read only)


def _aligned(a: torch.Tensor) -> torch.Tensor:
    """``a`` as a contiguous bf16 tensor at an address that is a multiple of :data:`INPUT_ALIGN`
    (a new one from PyTorch's CPU allocator, which aligns to 64 bytes, unless ``a`` already is)."""
    a = a.to(torch.bfloat16)
    if a.is_contiguous() and a.data_ptr() % INPUT_ALIGN == 0:
        return a
    return a.clone(memory_format=torch.contiguous_format)


def int8_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [N, K].T`` as fp32 ``[M, N]``, each sum rounded to bf16.

    Args:
        a: int8 ``[M, K]`` (the activation codes).
        b: int8 ``[N, K]`` (the weight codes ``CB``), which :func:`weight_supported` takes.
    """
    assert weight_supported(b), "a weight the kernel cannot read in place"
    y = torch.ops.aten._weight_int8pack_mm(_aligned(a), b, _unit_scales(b.shape[0]))  # [M, N] bf16
    return y.float()


def matmul_int8_outlier(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, threshold: float,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8 ``x @ W.T + bias`` as :func:`lowbit.kernels.reference.matmul_int8_outlier` computes
    it (the same outlier columns, row absmax and activation codes), with the integer product in
    PyTorch's kernel (each sum rounded to bf16) and fewer, fused steps: at one token most of the
    call's time is the steps around the product. No autograd (the module's ``_Int8Matmul`` wraps
    :func:`int8_product` when a gradient is recorded).

    Args:
        x: fp ``[..., K]`` on the CPU.
        weight: int8 ``[N, K]`` (``CB``), which :func:`weight_supported` takes.
        scb: fp32 ``[N]``.
        threshold: outlier threshold (0: none).
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    assert weight_supported(weight), "a weight the kernel cannot read in place"
    n, k = weight.shape
    xf = x.reshape(-1, k).float()  # [M, K]
    ax = xf.abs()
    outliers = (ax >= threshold).any(dim=0) if threshold > 0 else None  # [K]
    if outliers is not None and bool(outliers.any()):
        xi = xf.masked_fill(outliers, 0.0)
        row = xi.abs().amax(dim=1)  # [M]
    else:
        outliers, xi, row = None, xf, ax.amax(dim=1)
    # the reference's codes, round(x * 127 / absmax), made bf16 (integers up to 127: exact) rather than int8
    ca = torch.round(xi * (127.0 / row.clamp(min=1e-30)).unsqueeze(1)).to(torch.bfloat16)  # [M, K], 64-byte aligned
    y = torch.ops.aten._weight_int8pack_mm(ca, weight, _unit_scales(n))  # [M, N] bf16
    out = y * (row.unsqueeze(1) * (scb / (127.0 * 127.0)))  # [M, N] fp32
    if outliers is not None:
        out += xf[:, outliers] @ (weight[:, outliers].float() * (scb / 127.0).unsqueeze(1)).t()
    if bias is not None:
        out += bias
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def matmul_weight_only(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (CB * SCB / 127).T + bias`` with x rounded to bf16 for the product.

    Args:
        x: fp ``[..., K]`` on the CPU.
        weight: int8 ``[N, K]`` (``CB``), which :func:`weight_supported` takes.
        scb: fp32 ``[N]``.
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    assert weight_supported(weight), "a weight the kernel cannot read in place"
    n, k = weight.shape
    x2 = _aligned(x.reshape(-1, k))  # [M, K] bf16
    y = torch.ops.aten._weight_int8pack_mm(x2, weight, _unit_scales(n)).float()  # [M, N]
    y = y * (scb / 127.0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
