"""Kernel registry: which implementation runs a quantized module's forward.

Each storage format (``QuantLinear.format``) has a list of :class:`KernelImpl`. The plain
PyTorch reference is registered at priority 0 for every format, so ``kernel="auto"`` always
finds one; faster implementations register with a higher priority and say whether they are
``available()`` (packages, hardware) and whether they ``supports()`` a given module and input.
``LOWBIT_KERNEL=<name>`` in the environment forces a kernel by name (e.g. ``reference``).

A kernel that computes in a narrower type than some inputs (``KernelImpl.narrows``: the CPU int4
kernel rounds fp32 inputs to bf16) is passed over by ``"auto"`` for those inputs inside
:func:`exact_kernels`, which quantization's calibration runs under.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

ENV_VAR = "LOWBIT_KERNEL"


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of a format's forward: ``fn(x, module) -> y``; ``narrows``: the input
    dtypes it computes in a narrower type (see :func:`exact_kernels`)."""

    name: str
    priority: int
    available: Callable[[], bool]
    supports: Callable[[torch.nn.Module, torch.Tensor], bool]
    fn: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]
    narrows: frozenset[torch.dtype] = frozenset()


_KERNELS: dict[str, list[KernelImpl]] = {}


def register_kernel(fmt: str, impl: KernelImpl) -> None:
    """Add ``impl`` to the kernels of storage format ``fmt`` (names are unique per format)."""
    impls = _KERNELS.setdefault(fmt, [])
    if any(i.name == impl.name for i in impls):
        raise ValueError(f"kernel {impl.name!r} is already registered for format {fmt!r}")
    impls.append(impl)
    impls.sort(key=lambda i: -i.priority)


def kernels_for(fmt: str) -> list[KernelImpl]:
    """The registered kernels of ``fmt``, highest priority first."""
    return list(_KERNELS.get(fmt, []))


def always() -> bool:
    """``available``/``supports`` helper for implementations that run everywhere."""
    return True


@functools.cache
def _gcn_arch(index: int) -> str:
    return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]


def device_arch(device: torch.device) -> str | None:
    """The AMD architecture (``"gfx942"``, ``"gfx1100"``, ...) of a ROCm device; None on CUDA or CPU."""
    if device.type != "cuda" or torch.version.hip is None:
        return None
    return _gcn_arch(device.index if device.index is not None else torch.cuda.current_device())


def triton_gpu_available() -> bool:
    """Triton is importable and PyTorch sees a CUDA or ROCm GPU that Triton compiles for. An RDNA2
    or RDNA1 ``gfx10xx`` Radeon counts only where the installed Triton compiles for its
    architecture (:func:`lowbit.kernels.triton_common.compiles_for`: Triton 3.5 to 3.8 for gfx1030,
    not 3.9); otherwise it takes the reference path."""
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    arch = device_arch(torch.device("cuda", 0))
    if arch is None or not arch.startswith("gfx10"):
        return True
    from lowbit.kernels import triton_common

    return triton_common.compiles_for(arch)


_AVAILABLE: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result
def _available(fmt: str, name: str) -> bool:
    """Whether kernel ``name`` of format ``fmt`` can run on this machine: asked once, and a
    constant to ``torch.compile`` (which would otherwise trace the package and device probes)."""
    key = (fmt, name)
    if key not in _AVAILABLE:
        impl = next(i for i in _KERNELS[fmt] if i.name == name)
        _AVAILABLE[key] = bool(impl.available())
    return _AVAILABLE[key]


_EXACT: ContextVar[bool] = ContextVar("lowbit_exact_kernels", default=False)


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Within this, ``kernel="auto"`` takes no kernel that computes an input in a narrower type than
    its own (:attr:`KernelImpl.narrows`). Quantization runs its calibration forwards under it, so
    that the statistics of later layers see the quantized layers' outputs at the model's precision."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def select_kernel(module: torch.nn.Module, x: torch.Tensor, kernel: str = "auto") -> KernelImpl:
    """Pick the implementation that runs ``module(x)``.

    ``kernel="auto"`` takes the highest-priority implementation that is available and
    supports the input (under :func:`exact_kernels`, one that does not narrow its dtype), unless
    ``LOWBIT_KERNEL`` names one. A named kernel that is unknown, unavailable or does not support
    the input raises ``ValueError``.
    """
    fmt = type(module).format
    impls = _KERNELS.get(fmt)
    if not impls:
        raise ValueError(f"no kernel is registered for format {fmt!r}")
    forced = os.environ.get(ENV_VAR) or None
    name = forced if forced and kernel == "auto" else kernel
    if name == "auto":
        for impl in impls:
            # (traced code never runs under exact_kernels, and dynamo cannot trace ContextVar.get)
            if impl.narrows and x.dtype in impl.narrows and not torch.compiler.is_compiling() and _EXACT.get():
                continue
            if _available(fmt, impl.name) and impl.supports(module, x):
                return impl
        raise ValueError(f"no registered kernel of format {fmt!r} supports this input")
    for impl in impls:
        if impl.name == name:
            if not _available(fmt, impl.name):
                raise ValueError(f"kernel {name!r} for format {fmt!r} is not available on this machine")
            if not impl.supports(module, x):
                raise ValueError(
                    f"kernel {name!r} does not support this input "
                    f"(dtype {x.dtype}, device {x.device.type}) for format {fmt!r}"
                )
            return impl
    known = ", ".join(i.name for i in impls)
    source = f"{ENV_VAR}={name}" if forced and kernel == "auto" else f"kernel={name!r}"
    raise ValueError(f"unknown kernel in {source} for format {fmt!r}; known: {known}")
