"""Triton kernels for bitsandbytes' 4-bit format (NF4/FP4): dequantize and fused dequant-matmul.

The weight is read as bitsandbytes stores it (see :mod:`lowbit.formats.blockwise4`): the
row-major ``[N, K]`` codes as one stream of nibbles, element ``i`` in byte ``i // 2`` (even
elements in the high nibble), scaled by ``absmax[i // blocksize]``. With double quant the
absmax is decoded in the kernel: ``nested_quant_map[code] * nested_absmax[b // 256] +
nested_offset``. Reference twins: :func:`lowbit.kernels.reference.dequantize_blockwise4` and
:func:`lowbit.kernels.reference.matmul_blockwise4`, with the same arguments here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton_common import (
    _output_tile,
    _product,
    _store_output,
    finish_split_k,
    input_rows,
    launch_config,
    output_buffer,
)


@triton.jit
def _values(w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, i, mask,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 weight values at flat element indices ``i`` (int64, any shape); nested blocks are 256."""
    byte = tl.load(w_ptr + (i >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (i & 1)) * 4).to(tl.int32)) & 15
    value = tl.load(qmap_ptr + code, mask=mask, other=0.0)
    block = i // BLOCKSIZE
    if NESTED:
        acode = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = (tl.load(nmap_ptr + acode, mask=mask, other=0.0)
                 * tl.load(nabs_ptr + block // 256, mask=mask, other=0.0) + tl.load(noff_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)``; with ``SPLIT_K > 1``, fp32 partials ``y[SPLIT_K, M, N]``."""
    offs_m, offs_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row = offs_n.to(tl.int64) * K  # [BN] flat index of each output row's first weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        i = row[None, :] + offs_k[:, None]  # [BK, BN]
        w = _values(w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, i,
                    mask_k[:, None] & mask_n[None, :], BLOCKSIZE, NESTED)
        acc += _product(x, w, BLOCK_M, DOT_FP32)
    _store_output(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, N, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequantize_kernel(w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, out_ptr, numel,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i]`` for ``BLOCK`` consecutive flat elements."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    v = _values(w_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nmap_ptr, noff_ptr, i, mask, BLOCKSIZE, NESTED)
    tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=mask)


def _operands(weight, absmax, nested_absmax, nested_quant_map, nested_offset):
    """Pointers for the kernels: the packed bytes as uint8, and placeholders where not nested."""
    w = weight.reshape(-1).view(torch.uint8)
    nested = nested_absmax is not None
    if not nested:
        return w, (absmax, absmax, absmax), False
    return w, (nested_absmax, nested_quant_map, nested_offset.reshape(1)), True


def dequantize_blockwise4(weight, absmax, quant_map, blocksize, shape, nested_absmax=None, nested_quant_map=None,
                          nested_offset=None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.dequantize_blockwise4`: ``[N, K]`` in ``dtype``."""
    w, nested_ptrs, nested = _operands(weight, absmax, nested_absmax, nested_quant_map, nested_offset)
    numel = shape[0] * shape[1]
    out = torch.empty(shape, device=w.device, dtype=dtype)
    block = 1024
    _dequantize_kernel[(triton.cdiv(numel, block),)](
        w, absmax, quant_map, *nested_ptrs, out, numel, BLOCKSIZE=blocksize, NESTED=nested, BLOCK=block, num_warps=4)
    return out


def matmul_blockwise4(x, weight, absmax, quant_map, blocksize, shape, nested_absmax=None, nested_quant_map=None,
                      nested_offset=None, bias=None, compute_dtype=None) -> torch.Tensor:
    """Twin of :func:`lowbit.kernels.reference.matmul_blockwise4` (fp16/bf16 compute).

    Args:
        x: ``[..., K]``; cast to ``compute_dtype`` (None: x's dtype) for the product, which
            accumulates in fp32; the result has x's dtype, shape ``[..., N]``.
    """
    n, k = shape
    dtype = compute_dtype or x.dtype
    x2 = input_rows(x, dtype)
    m = x2.shape[0]
    w, nested_ptrs, nested = _operands(weight, absmax, nested_absmax, nested_quant_map, nested_offset)
    cfg = launch_config(m, n, k, 64, x.device)
    y = output_buffer(cfg, m, n, x2)
    _matmul_kernel[cfg.grid(m, n)](
        x2, w, absmax, quant_map, *nested_ptrs, bias if bias is not None else quant_map, y,
        m, n, k, x2.stride(0),
        BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=bias is not None,
        **cfg.kernel_options(dtype),
    )
    return finish_split_k(y, cfg, bias, dtype).to(x.dtype).reshape(*x.shape[:-1], n)
