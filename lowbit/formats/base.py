"""``QuantLinear``: the base of every quantized linear module."""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
from torch import nn

from lowbit.kernels import select_kernel
from lowbit.kernels.held import HeldCalls

M = TypeVar("M", bound=nn.Module)


def modules_of(model: nn.Module, cls: type[M]) -> dict[str, M]:
    """Every submodule of ``model`` that is a ``cls``, by dotted name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized.

    Subclasses hold buffers and name their storage ``format``; the forward runs whichever
    kernel :func:`lowbit.kernels.select_kernel` picks for the input (``self.kernel`` is
    ``"auto"`` unless set). ``dequantize()`` always goes through the reference path.
    """

    format: ClassVar[str]
    packed_buffers: ClassVar[frozenset[str]] = frozenset()
    """Buffers holding packed bits in a float dtype (never checked for NaN: any bit pattern is valid)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = "auto"
        self.held_calls = HeldCalls()  # eager launches a Triton wrapper holds for this module's buffers

    def _apply(self, fn, recurse=True):
        self.held_calls.clear()  # they hold the buffers that this replaces
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., K) -> (..., N)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        return select_kernel(self, x, self.kernel).fn(x, self)

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 ``[N, K]``."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Build whatever the kernels cache from the buffers, now rather than in the first forward
        (which ``torch.compile`` may trace instead of running); default: nothing."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def prepare_model(model: nn.Module) -> nn.Module:
    """Call :meth:`QuantLinear.prepare` on every quantized linear of ``model`` (after loading)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    return model
