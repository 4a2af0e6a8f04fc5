"""Quantization algorithms; each emits a module from :mod:`lowbit.formats`.

Importing this package registers every built-in quantizer in ``QUANTIZERS``.
"""

from lowbit.methods import aqlm, awq, bnb, gptq, rtn  # noqa: F401  (register "aqlm", "awq", "bitsandbytes", "gptq", "rtn")
from lowbit.methods.base import QUANTIZERS, Quantizer

__all__ = ["QUANTIZERS", "Quantizer"]
