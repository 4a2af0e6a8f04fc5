"""``QuantLinear``: the base of every quantized linear module."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import nn

from lowbit.kernels import select_kernel
from lowbit.kernels.held import Derived, HeldCalls

M = TypeVar("M", bound=nn.Module)
L = TypeVar("L")


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
        # by layout name: what held_layout() built and what it was built from
        self._layouts: Derived = Derived()  # a copy of the module starts without them

    def _apply(self, fn, recurse=True):
        self.held_calls.clear()  # they hold the buffers that this replaces
        self._layouts.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._layouts.clear()

    def held_layout(self, name: str, sources: tuple[torch.Tensor | None, ...], build: Callable[[], L]) -> L | None:
        """``build()``, a layout of this module's buffers ``sources`` for a kernel, built once and
        held under ``name``; rebuilt when a source is replaced, moved or written in place. The
        buffers, and so the checkpoint, keep the canonical layout.

        Under ``torch.compile`` nothing is built (tracing cannot follow the data-dependent
        reorderings layouts make): the held layout is used if it was built from these very
        sources, else None (the caller's kernel does not apply).
        """
        cached = self._layouts.get(name)  # (sources, those not None, those with a write counter, state, layout)
        same = cached is not None and len(cached[0]) == len(sources) and all(map(operator.is_, cached[0], sources))
        if torch.compiler.is_compiling():
            return cached[4] if same else None
        if same:
            present, tracked = cached[1], cached[2]
        else:
            present = tuple(t for t in sources if t is not None)
            # inference tensors (a model quantized under torch.inference_mode) keep no write
            # counter, and can only be written inside it
            tracked = tuple(t for t in present if not t.is_inference())
        state = (*map(torch.Tensor.data_ptr, present), *[t._version for t in tracked])
        if same and cached[3] == state:
            return cached[4]
        self._layouts[name] = cached = (sources, present, tracked, state, build())
        return cached[4]

    def last_held(self, name: str):
        """The layout :meth:`held_layout` last returned under ``name``, not checked again: for a
        kernel's forward, whose ``supports`` checked it in this very call's kernel selection
        (every forward selects, and selecting runs ``supports``)."""
        return self._layouts[name][4]

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
    """Call :meth:`QuantLinear.prepare` on every quantized linear of ``model`` (after loading), and
    on a CPU build now what the kernel ``auto`` takes there for the model's dtype holds (the CPU
    int4 kernel's layouts). Built at the first forward instead, between that forward's
    temporaries, they keep glibc's heap from shrinking after it: an 8-bit SmolLM2 evaluated at
    1,578 MiB peak RSS that way against 1,124 with the layouts built first."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
            if all(b.is_cpu for b in m.buffers()):
                _select_for_one_row(m, dtype)
    return model


def _select_for_one_row(m: QuantLinear, dtype: torch.dtype) -> None:
    """Select ``m``'s kernel for one row of ``dtype`` on the CPU, which builds what it holds; a
    kernel named that cannot run raises at the forward instead."""
    with torch.no_grad():
        try:
            select_kernel(m, torch.zeros(1, m.in_features, dtype=dtype), m.kernel)
        except ValueError:
            pass
