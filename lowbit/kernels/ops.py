"""The Triton entry points as ``torch.library`` custom ops: ``torch.ops.lowbit.*``.

A quantized module's Triton forward calls these ops instead of the launch wrappers, so that
``torch.compile(fullgraph=True)`` sees one opaque node per quantized matmul (the wrappers read
device properties and choose launch configurations in Python, which tracing cannot follow), and
CUDA-graph capture replays the launches. Each op has

- an implementation: the Triton wrapper (imported on the first call, so the package imports
  without Triton);
- a fake implementation: output shape and dtype only, for tracing;
- for the matmuls, a backward: ``grad_x = grad_y @ W`` through the op's dequantize twin, so a
  frozen quantized layer passes gradients to the layers before it (adapters trained on top of it,
  QLoRA style). The quantized buffers get no gradient.

The backward keeps the quantized buffers as plain attributes of the autograd context, not through
``save_for_backward``: they are frozen (no gradient, never written during a step), and a model
quantized under ``torch.inference_mode`` holds inference tensors, which ``save_for_backward``
refuses.

Every op computes what the format's reference in :mod:`lowbit.kernels.reference` does; the tests
compare them (under ``TRITON_INTERPRET=1`` on CPU) and run ``torch.library.opcheck`` on each.

The modules call the ``*_linear`` entry points, not the ops. They take the op only where it is
needed, under ``torch.compile`` and when a gradient is to be recorded, and otherwise call the
Triton wrapper themselves: the dispatcher's path into a Python custom op costs tens of
microseconds per call on a CPU core (:func:`dispatch_free`), more than a one-token kernel runs.
Called directly, a wrapper also gets the weight's held eager calls (the module's
:class:`~lowbit.kernels.held.HeldCalls`, or the grouped-int layout's), which the op never sees.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.group_order import GroupOrdered
from lowbit.kernels import reference
from lowbit.kernels.held import HeldCalls


def dispatch_free(x: Tensor) -> bool:
    """Whether a call with input ``x`` may launch the Triton wrapper directly instead of the op:
    plain eager (not traced by ``torch.compile``, ``x`` not a fake or functional tensor) with no
    gradient to record for ``x``."""
    return (not torch.compiler.is_compiling() and type(x) is Tensor
            and not (x.requires_grad and torch.is_grad_enabled()))


# --- grouped int ---------------------------------------------------------------------------


def _int_grouped_matmul(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, perm: Tensor | None,
                        bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    """``x @ W.T + bias`` for a weight in the group-ordered layout.

    Args:
        x: fp16/bf16/fp32 ``[..., K]``.
        qweight, scales, qzeros, perm, bits, group_size: the fields of a
            :class:`~lowbit.formats.group_order.GroupOrdered` weight (``qweight`` int32
            ``[ceil(K*bits/32), N]``, ``scales`` ``[G, N]``, ``qzeros`` int32 ``[G, ceil(N*bits/32)]``,
            ``perm`` int32 ``[K]`` or None).
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    from lowbit.kernels import triton_int_grouped

    w = GroupOrdered(qweight, scales, qzeros, perm, bits, group_size)
    return triton_int_grouped.matmul_group_ordered(x, w, bias, hold=False)  # a layout for this call only


int_grouped_matmul = torch.library.custom_op("lowbit::int_grouped_matmul", _int_grouped_matmul, mutates_args=())


def int_grouped_linear(x: Tensor, w: GroupOrdered, bias: Tensor | None) -> Tensor:
    """:func:`int_grouped_matmul` with layout ``w``, through the dispatcher only where needed
    (:func:`dispatch_free`). Called without it, the wrapper gets ``w`` itself, and so the eager
    launches ``w`` holds (a module passes the layout it keeps)."""
    if dispatch_free(x):
        from lowbit.kernels import triton_int_grouped

        return triton_int_grouped.matmul_group_ordered(x, w, bias)
    return int_grouped_matmul(x, w.qweight, w.scales, w.qzeros, w.perm, bias, w.bits, w.group_size)


@int_grouped_matmul.register_fake
def _(x, qweight, scales, qzeros, perm, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


@torch.library.custom_op("lowbit::int_grouped_dequantize", mutates_args=())
def int_grouped_dequantize(qweight: Tensor, scales: Tensor, qzeros: Tensor, perm: Tensor | None, bits: int,
                           group_size: int, k: int, dtype: torch.dtype) -> Tensor:
    """The group-ordered weight as ``[N, K]`` in ``dtype``, columns in the input order."""
    from lowbit.kernels import triton_int_grouped

    w = GroupOrdered(qweight, scales, qzeros, perm, bits, group_size)
    return triton_int_grouped.dequantize_group_ordered(w, k, dtype)


@int_grouped_dequantize.register_fake
def _(qweight, scales, qzeros, perm, bits, group_size, k, dtype):
    return scales.new_empty(scales.shape[1], k, dtype=dtype)


def _int_grouped_setup(ctx, inputs, output):
    x, qweight, scales, qzeros, perm, _bias, bits, group_size = inputs
    ctx.weight = (qweight, scales, qzeros, perm)  # frozen buffers: see the module docstring
    ctx.meta = (bits, group_size, x.shape[-1])


def _int_grouped_backward(ctx, grad):
    qweight, scales, qzeros, perm = ctx.weight
    bits, group_size, k = ctx.meta
    w = int_grouped_dequantize(qweight, scales, qzeros, perm, bits, group_size, k, grad.dtype)  # [N, K]
    return grad @ w, None, None, None, None, None, None, None


int_grouped_matmul.register_autograd(_int_grouped_backward, setup_context=_int_grouped_setup)

# --- NF4 / FP4 -----------------------------------------------------------------------------


def _blockwise4_matmul(x: Tensor, weight: Tensor, absmax: Tensor, quant_map: Tensor, nested_absmax: Tensor | None,
                       nested_quant_map: Tensor | None, nested_offset: Tensor | None, bias: Tensor | None,
                       blocksize: int, n: int, k: int, compute_dtype: torch.dtype | None) -> Tensor:
    """``x @ W.T + bias`` for an NF4/FP4 weight of shape ``[n, k]`` (the buffers of
    :class:`~lowbit.formats.blockwise4.Blockwise4Linear`); ``[..., N]`` in x's dtype."""
    from lowbit.kernels import triton_blockwise4

    return triton_blockwise4.matmul_blockwise4(x, weight, absmax, quant_map, blocksize, (n, k), nested_absmax,
                                               nested_quant_map, nested_offset, bias, compute_dtype)


blockwise4_matmul = torch.library.custom_op("lowbit::blockwise4_matmul", _blockwise4_matmul, mutates_args=())


def blockwise4_linear(x: Tensor, weight: Tensor, absmax: Tensor, quant_map: Tensor, nested_absmax: Tensor | None,
                      nested_quant_map: Tensor | None, nested_offset: Tensor | None, bias: Tensor | None,
                      blocksize: int, n: int, k: int, compute_dtype: torch.dtype | None,
                      held: HeldCalls | None = None) -> Tensor:
    """:func:`blockwise4_matmul`, through the dispatcher only where needed (:func:`dispatch_free`);
    without it, the wrapper holds its one-token launches in ``held`` (the module's)."""
    if dispatch_free(x):
        from lowbit.kernels import triton_blockwise4

        return triton_blockwise4.matmul_blockwise4(x, weight, absmax, quant_map, blocksize, (n, k), nested_absmax,
                                                   nested_quant_map, nested_offset, bias, compute_dtype, held=held)
    return blockwise4_matmul(x, weight, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, bias,
                             blocksize, n, k, compute_dtype)


@blockwise4_matmul.register_fake
def _(x, weight, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, bias, blocksize, n, k,
      compute_dtype):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("lowbit::blockwise4_dequantize", mutates_args=())
def blockwise4_dequantize(weight: Tensor, absmax: Tensor, quant_map: Tensor, nested_absmax: Tensor | None,
                          nested_quant_map: Tensor | None, nested_offset: Tensor | None, blocksize: int, n: int,
                          k: int, dtype: torch.dtype) -> Tensor:
    """The NF4/FP4 weight as ``[n, k]`` in ``dtype``."""
    from lowbit.kernels import triton_blockwise4

    return triton_blockwise4.dequantize_blockwise4(weight, absmax, quant_map, blocksize, (n, k), nested_absmax,
                                                   nested_quant_map, nested_offset, dtype)


@blockwise4_dequantize.register_fake
def _(weight, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, n, k, dtype):
    return quant_map.new_empty(n, k, dtype=dtype)


def _blockwise4_setup(ctx, inputs, output):
    x, weight, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, _bias, blocksize, n, k, _ = inputs
    ctx.weight = (weight, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset)
    ctx.meta = (blocksize, n, k)


def _blockwise4_backward(ctx, grad):
    blocksize, n, k = ctx.meta
    w = blockwise4_dequantize(*ctx.weight, blocksize, n, k, grad.dtype)  # [N, K]
    return (grad @ w,) + (None,) * 11


blockwise4_matmul.register_autograd(_blockwise4_backward, setup_context=_blockwise4_setup)

# --- AQLM codebooks ------------------------------------------------------------------------


def _codebook_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W.T + bias`` for an AQLM weight (the buffers of
    :class:`~lowbit.formats.codebook.AqlmLinear`, ``out_group_size`` 1); ``[..., N]`` in x's dtype."""
    from lowbit.kernels import triton_codebook

    return triton_codebook.matmul_codebook(x, codes, codebooks, scales, bias)


codebook_matmul = torch.library.custom_op("lowbit::codebook_matmul", _codebook_matmul, mutates_args=())


def codebook_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                    held: HeldCalls | None = None) -> Tensor:
    """:func:`codebook_matmul`, through the dispatcher only where needed (:func:`dispatch_free`);
    without it, the wrapper holds its one-token launches in ``held`` (the module's)."""
    if dispatch_free(x):
        from lowbit.kernels import triton_codebook

        return triton_codebook.matmul_codebook(x, codes, codebooks, scales, bias, held=held)
    return codebook_matmul(x, codes, codebooks, scales, bias)


@codebook_matmul.register_fake
def _(x, codes, codebooks, scales, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("lowbit::codebook_dequantize", mutates_args=())
def codebook_dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The AQLM weight as ``[N, K]`` in ``dtype``."""
    from lowbit.kernels import triton_codebook

    return triton_codebook.dequantize_codebook(codes, codebooks, scales, dtype)


@codebook_dequantize.register_fake
def _(codes, codebooks, scales, dtype):
    return scales.new_empty(codes.shape[0], codes.shape[1] * codebooks.shape[3], dtype=dtype)


def _codebook_setup(ctx, inputs, output):
    _x, codes, codebooks, scales, _bias = inputs
    ctx.weight = (codes, codebooks, scales)


def _codebook_backward(ctx, grad):
    w = codebook_dequantize(*ctx.weight, grad.dtype)  # [N, K]
    return grad @ w, None, None, None, None


codebook_matmul.register_autograd(_codebook_backward, setup_context=_codebook_setup)

# --- LLM.int8 ------------------------------------------------------------------------------


def _int8_outlier_matmul(x: Tensor, weight: Tensor, scb: Tensor, bias: Tensor | None, threshold: float,
                         weight_only: bool = False) -> Tensor:
    """LLM.int8 ``x @ W.T + bias`` (the buffers of :class:`~lowbit.formats.int8_outlier.Int8Linear`);
    ``weight_only``: x stays in floating point (``threshold`` unused). ``[..., N]`` in x's dtype."""
    from lowbit.kernels import triton_int8

    return triton_int8.matmul_int8_outlier(x, weight, scb, threshold, bias, weight_only=weight_only)


int8_outlier_matmul = torch.library.custom_op("lowbit::int8_outlier_matmul", _int8_outlier_matmul, mutates_args=())


def int8_outlier_linear(x: Tensor, weight: Tensor, scb: Tensor, bias: Tensor | None, threshold: float,
                        weight_only: bool = False, held: HeldCalls | None = None) -> Tensor:
    """:func:`int8_outlier_matmul`, through the dispatcher only where needed (:func:`dispatch_free`);
    without it, the wrapper holds its one-token launches in ``held`` (the module's)."""
    if dispatch_free(x):
        from lowbit.kernels import triton_int8

        return triton_int8.matmul_int8_outlier(x, weight, scb, threshold, bias, weight_only=weight_only, held=held)
    return int8_outlier_matmul(x, weight, scb, bias, threshold, weight_only)


@int8_outlier_matmul.register_fake
def _(x, weight, scb, bias, threshold, weight_only=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _int8_outlier_setup(ctx, inputs, output):
    _x, weight, scb, _bias, _threshold, _weight_only = inputs
    ctx.weight = (weight, scb)


def _int8_outlier_backward(ctx, grad):
    return reference.int8_input_grad(grad, *ctx.weight), None, None, None, None, None


int8_outlier_matmul.register_autograd(_int8_outlier_backward, setup_context=_int8_outlier_setup)
