"""What every method that emits :class:`IntGroupedLinear` shares (RTN, GPTQ, AWQ)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.int_grouped import IntGroupedLinear, check_grouping
from lowbit.methods.affine import group_index, quantize_grouped
from lowbit.methods.base import C, Quantizer
from lowbit.methods.walk import linear_shape


class IntGroupedQuantizer(Quantizer[C]):
    """A quantizer whose config has ``bits`` and ``group_size`` and whose modules are
    :class:`IntGroupedLinear`."""

    def group_size(self, in_features: int) -> int:
        """The config's group size, with -1 resolved to ``in_features``."""
        return in_features if self.config.group_size == -1 else self.config.group_size

    def check_layer(self, name: str, linear: nn.Module) -> None:
        k, _ = linear_shape(linear)
        try:
            check_grouping(k, self.config.bits, self.config.group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    def round_to_nearest(self, name: str, linear: nn.Module, sym: bool,
                         scale_dtype: torch.dtype = torch.float16) -> IntGroupedLinear:
        """The linear's (checked) weight rounded group-wise to ``config.bits``, contiguous groups.

        ``scale_dtype``: the scale the codes and zero points are chosen with (see
        :func:`~lowbit.methods.affine.choose_qparams`); the module stores it in fp16 either way.
        """
        w = self.checked_weight(name, linear)  # [N, K]
        k, _ = linear_shape(linear)
        group_size = self.group_size(k)
        q, scales, zeros = quantize_grouped(w, self.config.bits, group_size, sym, scale_dtype)  # [N,K] [G,N] [G,N]
        return self.build(linear, q, scales, zeros, group_index(k, group_size))

    def build(self, linear: nn.Module, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor) -> IntGroupedLinear:
        """The module for codes ``q`` int ``[N, K]``, ``scales`` ``[G, N]`` (stored fp16),
        ``zeros`` int ``[G, N]`` and ``g_idx`` int ``[K]``; the linear's bias is stored fp16, as the
        GPTQ layout stores it."""
        k, _ = linear_shape(linear)
        bias = linear.bias.data.to(torch.float16) if linear.bias is not None else None
        return IntGroupedLinear.from_quantized(q, scales.to(torch.float16), zeros, g_idx.to(q.device),
                                               bits=self.config.bits, group_size=self.group_size(k), bias=bias)

    def empty_module(self, name: str, linear: nn.Module, dtype: torch.dtype) -> IntGroupedLinear:
        k, n = linear_shape(linear)
        return IntGroupedLinear(k, n, bits=self.config.bits, group_size=self.config.group_size,
                                bias=linear.bias is not None, scales_dtype=torch.float16, bias_dtype=torch.float16,
                                device="meta")
