"""Canonical in-memory quantized modules: buffers and kernel dispatch, no math."""

from lowbit.formats.base import QuantLinear
from lowbit.formats.blockwise4 import Blockwise4Linear
from lowbit.formats.codebook import AqlmLinear
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.formats.int_grouped import IntGroupedLinear

__all__ = ["AqlmLinear", "Blockwise4Linear", "Int8Linear", "IntGroupedLinear", "QuantLinear"]
