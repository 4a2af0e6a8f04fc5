"""``IntGroupedLinear``: 2/3/4/8-bit group-affine integer weights (GPTQ, AWQ, RTN).

Buffers (the canonical layout; ecosystem layouts translate to and from it):

========  ==========  ===========================  =========================================
name      dtype       shape                        meaning
========  ==========  ===========================  =========================================
qweight   int32       ``[ceil(K*bits/32), N]``     codes packed along K, LSB first
qzeros    int32       ``[G, ceil(N*bits/32)]``     true zero points packed along N
scales    fp16/bf16   ``[G, N]``                   per-group scales
g_idx     int32       ``[K]``                      group of each input column
bias      fp16        ``[N]``                      optional
========  ==========  ===========================  =========================================

``G = ceil(K / group_size)``; ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``.
When ``group_size`` does not divide K the last group is shorter (``K - (G-1)*group_size``
columns), as in the AutoGPTQ layout, whose ``scales`` also have ``ceil(K / group_size)`` rows:
SmolLM2's K = 576 at group size 128 gives four groups of 128 and one of 64. Layouts and kernels
that need whole groups (AutoAWQ GEMM, Marlin) check divisibility themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from lowbit.formats.base import QuantLinear
from lowbit.formats.group_order import GroupOrdered, in_group_order, to_group_ordered
from lowbit.formats.packing import SUPPORTED_BITS, pack_int, packed_length
from lowbit.kernels import KernelImpl, always, register_kernel, triton_gpu_available
from lowbit.kernels import cpu_dequant, ops, reference
from lowbit.kernels.cpu_int4 import BITS as CPU_INT4_BITS
from lowbit.kernels.cpu_int4 import DTYPES as CPU_INT4_DTYPES
from lowbit.kernels.cpu_int4 import CpuInt4, available as cpu_int4_available, matmul_cpu_int4, to_cpu_int4

L = TypeVar("L")


class IntGroupedLinear(QuantLinear):
    """Grouped-integer linear layer; see the module docstring for its buffers."""

    format = "int_grouped"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool,
        scales_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        check_grouping(in_features, bits, group_size)
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        groups = -(-in_features // self.group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scales_dtype, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw) if bias else None)

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> "IntGroupedLinear":
        """Build from unpacked codes.

        Args:
            q: int ``[N, K]`` codes in ``[0, 2**bits)``.
            scales: fp ``[G, N]`` (stored in its own dtype).
            zeros: int ``[G, N]``.
            g_idx: int ``[K]``.
            bias: ``[N]`` or None.
        """
        n, k = q.shape
        mod = cls(k, n, bits=bits, group_size=group_size, bias=bias is not None,
                  scales_dtype=scales.dtype, bias_dtype=bias.dtype if bias is not None else torch.float16,
                  device="meta")
        mod.qweight = pack_int(q.t(), bits, dim=0)  # [K, N] -> [ceil(K*bits/32), N]
        mod.qzeros = pack_int(zeros, bits, dim=1)  # [G, N] -> [G, ceil(N*bits/32)]
        mod.scales = scales.contiguous()
        mod.g_idx = g_idx.to(torch.int32).contiguous()
        mod.bias = None if bias is None else bias.detach().clone()
        return mod

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize_int_grouped(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits)

    def is_act_order(self) -> bool:
        """Whether ``g_idx`` is permuted (act-order) rather than ``k // group_size``."""
        return not in_group_order(self.g_idx, self.group_size)

    def group_ordered(self) -> GroupOrdered | None:
        """This weight in the Triton kernels' group order, or None if its groups are unequal
        (:func:`~lowbit.formats.group_order.to_group_ordered`; held as :meth:`_layout` says).

        An act-order weight's layout costs one reordered copy of ``qweight``. :meth:`prepare` builds
        the layout eagerly when the module moves to a GPU or loads a state dict, and lowbit calls it
        after quantizing or loading a model, so a model compiled before its first eager call finds it.
        """
        return self._layout("group_ordered", to_group_ordered)

    def cpu_int4(self) -> CpuInt4 | None:
        """This weight in the layout of PyTorch's CPU int4 kernel, or None where that kernel cannot
        hold it (:func:`~lowbit.kernels.cpu_int4.to_cpu_int4`; held as :meth:`_layout` says). It is a
        copy of the codes (half a byte a weight, a byte at 8 bits, beside the canonical ``qweight``),
        built when lowbit finishes a model on a CPU (:func:`~lowbit.formats.base.prepare_model`), else at
        the first CPU forward that uses it."""
        return self._layout("cpu_int4", to_cpu_int4)

    def _layout(self, name: str, build: Callable[..., L]) -> L | None:
        """The layout ``build(qweight, scales, qzeros, g_idx, bits)`` of this module's buffers, held
        as :meth:`~lowbit.formats.base.QuantLinear.held_layout` says (under ``torch.compile``, None
        unless built before: the reference path)."""
        b = self._buffers  # not nn.Module.__getattr__: this runs in every forward
        bufs = (b["qweight"], b["scales"], b["qzeros"], b["g_idx"])
        return self.held_layout(name, bufs, lambda: build(*bufs, self.bits))

    def prepare(self) -> None:
        """Drop the held layouts, and rebuild the group-ordered one now if the weight is on a GPU
        (see :meth:`group_ordered`); called after a move, a state-dict load and a model load."""
        self._layouts.clear()
        if self.qweight.is_cuda:
            self.group_ordered()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.prepare()
        return module

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


def check_grouping(in_features: int, bits: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``bits``/``group_size`` can hold a layer of ``in_features``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported by the grouped-int format; use one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size={group_size} must be -1 (one group per row) or positive")
    if in_features <= 0:
        raise ValueError(f"in_features={in_features} must be positive")


def _reference_forward(x: torch.Tensor, m: IntGroupedLinear) -> torch.Tensor:
    return reference.matmul_int_grouped(x, m.qweight, m.scales, m.qzeros, m.g_idx, m.bits, m.bias)


def _triton_supports(m: IntGroupedLinear, x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and m.group_ordered() is not None


def _triton_forward(x: torch.Tensor, m: IntGroupedLinear) -> torch.Tensor:
    return ops.int_grouped_linear(x, m.last_held("group_ordered"), m.bias)  # checked by the supports of this call


register_kernel(
    IntGroupedLinear.format,
    KernelImpl("reference", 0, available=always, supports=lambda m, x: x.is_floating_point(), fn=_reference_forward),
)


def _cpu_int4_supports(m: IntGroupedLinear, x: torch.Tensor) -> bool:
    # the kernel has no backward: a gradient to record goes through the reference
    return (x.is_cpu and m.bits in CPU_INT4_BITS and x.dtype in CPU_INT4_DTYPES
            and not (x.requires_grad and torch.is_grad_enabled()) and m.cpu_int4() is not None)


def _cpu_int4_forward(x: torch.Tensor, m: IntGroupedLinear) -> torch.Tensor:
    return matmul_cpu_int4(x, m.last_held("cpu_int4"), m.bias)  # checked by the supports of this call


register_kernel(
    IntGroupedLinear.format,
    KernelImpl("cpu-int4", 5, available=cpu_int4_available, supports=_cpu_int4_supports, fn=_cpu_int4_forward,
               narrows=frozenset({torch.float32})),
)


def _cpu_dequant_forward(x: torch.Tensor, m: IntGroupedLinear) -> torch.Tensor:
    return cpu_dequant.matmul_int_grouped(x, m.qweight, m.scales, m.qzeros, m.g_idx, m.bits, m.group_size, m.bias)


def _cpu_dequant_supports(m: IntGroupedLinear, x: torch.Tensor) -> bool:
    # 8-bit codes: two planes in cpu-int4, so this path pays from fewer rows
    return cpu_dequant.applies(x, m.in_features, cpu_dequant.PLANES_MIN_ROWS if m.bits == 8 else cpu_dequant.MIN_ROWS)


register_kernel(
    IntGroupedLinear.format,
    # above cpu-int4: it takes only inputs of many rows (cpu_dequant.MIN_ROWS, PLANES_MIN_ROWS for
    # 8 bits), where it is faster
    KernelImpl("cpu-dequant", 6, available=always, supports=_cpu_dequant_supports, fn=_cpu_dequant_forward,
               narrows=frozenset({torch.float32})),
)
register_kernel(
    IntGroupedLinear.format,
    KernelImpl("triton", 10, available=triton_gpu_available, supports=_triton_supports, fn=_triton_forward),
)
