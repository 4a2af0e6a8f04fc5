"""Round-to-nearest (RTN): the baseline every calibrated method must beat."""

from __future__ import annotations

from torch import nn

from lowbit.config import RtnConfig
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.methods.affine import group_index, quantize_grouped
from lowbit.methods.base import QUANTIZERS, Stats
from lowbit.methods.grouped import IntGroupedQuantizer
from lowbit.methods.walk import linear_shape


@QUANTIZERS.register("rtn")
class RtnQuantizer(IntGroupedQuantizer[RtnConfig]):
    """Group-wise round-to-nearest into :class:`IntGroupedLinear`; needs no data."""

    requires_calibration = False

    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> IntGroupedLinear:
        w = self.checked_weight(name, linear)  # [N, K]
        k, _ = linear_shape(linear)
        group_size = self.group_size(k)
        q, scales, zeros = quantize_grouped(w, self.config.bits, group_size, self.config.sym)  # [N,K] [G,N] [G,N]
        return self.build(linear, q, scales, zeros, group_index(k, group_size))
