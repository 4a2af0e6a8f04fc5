"""Round-to-nearest (RTN): the baseline every calibrated method must beat."""

from __future__ import annotations

from torch import nn

from lowbit.config import RtnConfig
from lowbit.formats.int_grouped import IntGroupedLinear
from lowbit.methods.base import QUANTIZERS, Stats
from lowbit.methods.grouped import IntGroupedQuantizer


@QUANTIZERS.register("rtn")
class RtnQuantizer(IntGroupedQuantizer[RtnConfig]):
    """Group-wise round-to-nearest into :class:`IntGroupedLinear`; needs no data."""

    requires_calibration = False

    def quantize_layer(self, name: str, linear: nn.Module, stats: Stats | None) -> IntGroupedLinear:
        return self.round_to_nearest(name, linear, self.config.sym)
