"""Round-to-nearest (RTN): the baseline every calibrated method must beat."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import RtnConfig
from lowbit.formats.int_grouped import IntGroupedLinear, check_grouping
from lowbit.methods.affine import group_index, quantize_grouped
from lowbit.methods.base import QUANTIZERS, Quantizer, Stats
from lowbit.methods.walk import linear_shape, linear_weight


@QUANTIZERS.register("rtn")
class RtnQuantizer(Quantizer[RtnConfig]):
    """Group-wise round-to-nearest into :class:`IntGroupedLinear`; needs no data."""

    requires_calibration = False

    def check_layer(self, name: str, linear: nn.Module) -> None:
        k, _ = linear_shape(linear)
        try:
            check_grouping(k, self.config.bits, self.config.group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> IntGroupedLinear:
        cfg = self.config
        self.check_layer(name, linear)
        k, _ = linear_shape(linear)
        group_size = k if cfg.group_size == -1 else cfg.group_size
        w = linear_weight(linear)  # [N, K]
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight contains NaN or Inf; refusing to quantize it")
        q, scales, zeros = quantize_grouped(w, cfg.bits, group_size, cfg.sym)  # [N,K] [G,N] [G,N]
        bias = linear.bias.data if linear.bias is not None else None
        return IntGroupedLinear.from_quantized(
            q, scales.to(torch.float16), zeros, group_index(k, group_size).to(w.device),
            bits=cfg.bits, group_size=group_size, bias=bias,
        )

    def empty_module(self, name: str, linear: nn.Module, dtype: torch.dtype) -> IntGroupedLinear:
        k, n = linear_shape(linear)
        return IntGroupedLinear(
            k, n, bits=self.config.bits, group_size=self.config.group_size,
            bias=linear.bias is not None, scales_dtype=torch.float16, bias_dtype=dtype, device="meta",
        )
