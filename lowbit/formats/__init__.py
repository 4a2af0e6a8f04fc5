"""Canonical in-memory quantized modules: buffers and kernel dispatch, no math."""

from lowbit.formats.base import QuantLinear
from lowbit.formats.int_grouped import IntGroupedLinear

__all__ = ["IntGroupedLinear", "QuantLinear"]
