"""Quantization algorithms; each emits a module from :mod:`lowbit.formats`.

Importing this package registers every built-in quantizer in ``QUANTIZERS``.
"""

from lowbit.methods import gptq, rtn  # noqa: F401  (register "gptq", "rtn")
from lowbit.methods.base import QUANTIZERS, Quantizer

__all__ = ["QUANTIZERS", "Quantizer"]
