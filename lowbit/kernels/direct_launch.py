"""Held launches that call Triton's C launcher themselves, skipping the Python around it.

A launch of a compiled Triton kernel (``compiled[grid](*args)``) runs, in Triton 3.5 to 3.9, a
Python runner that asks the active driver for the current device and stream, builds the launch's
metadata for the launch hooks (``HookChain`` objects, never None), and calls the ``CudaLauncher``,
a Python object that allocates no scratch for lowbit's kernels and then calls the C ``launch``
function with the hooks, which call Python again (two empty ``HookChain`` calls). That Python took
2.8-3.4 µs a launch on a 2-core AMD EPYC with Triton 3.5 to 3.9, against 0.5-0.8 µs through
:func:`direct_runner`, the C function stubbed (``python bench/dispatch.py``);
``bench/dispatch.py --gpu`` times both ways with real launches.

:func:`direct_runner` returns a launch that calls the same C function with the same arguments,
but for the launch metadata and the hooks, which are None (the C launcher then skips them). It
does so only while no launch hook is installed (a profiler's): then it takes Triton's runner,
and the hooks see every launch. It applies only to the launcher layouts it was written against
(:data:`LAYOUTS`: Triton 3.5 to 3.9 on NVIDIA; ``tests/test_direct_launch.py`` compares its
arguments with those of the installed Triton's own runner), for kernels without global or profile
scratch (or 3.8's and 3.9's sanitizer); otherwise it returns None and the held launch is Triton's
runner. AMD's launcher takes its arguments in another order and keeps Triton's runner.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

DIRECT_LAUNCH = os.environ.get("LOWBIT_DIRECT_LAUNCH", "1") not in ("", "0")
"""Whether a held launch that :func:`direct_runner` made calls the C launcher itself (on unless
``LOWBIT_DIRECT_LAUNCH=0``; read at each launch, so a bench can compare both ways in one process)."""

LAYOUTS = {(3, 5): "arguments", (3, 6): "arguments", (3, 7): "tuple", (3, 8): "tuple", (3, 9): "tuple"}
"""The C ``launch`` function's arguments in each Triton version :func:`direct_runner` calls:
3.5 and 3.6 take the scratch buffers before the kernel's metadata and the kernel's arguments one by
one; 3.7 to 3.9 take the scratch buffers after the hooks, then the launcher's argument annotations
and signature, and the kernel's arguments as one tuple."""

VERSIONS = tuple(LAYOUTS)


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def direct_runner(compiled, grid: tuple[int, int, int], runner: Callable) -> Callable | None:
    """A launch of ``compiled`` (a ``CompiledKernel`` whose handles are loaded) over ``grid``:
    ``launch(*every_argument)``, as ``runner`` (Triton's ``compiled[grid]``) launches it, calling
    the C launcher directly; None where the installed Triton's launcher is not one this calls
    (see the module's docstring)."""
    from triton import knobs
    from triton.runtime.driver import driver

    layout = LAYOUTS.get(triton_version())
    launcher = getattr(compiled, "run", None)  # (a stand-in for a compiled kernel may have none)
    if (layout is None or type(launcher).__name__ != "CudaLauncher" or launcher.global_scratch_size
            or launcher.profile_scratch_size or getattr(launcher, "gsan_enabled", False)):
        return None
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not (hasattr(enter, "calls") and hasattr(leave, "calls")):
        return None
    c_launch = launcher.launch
    device = driver.active.get_current_device
    if device is torch.cuda.current_device:  # the same value without its Python call, once CUDA is initialised
        device = torch._C._cuda_getDevice
    stream = driver.active.get_current_stream
    gx, gy, gz = grid
    function, packed = compiled.function, compiled.packed_metadata
    cooperative, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
    if layout == "tuple":
        annotations, signature = launcher.arg_annotations, launcher.kernel_signature

    def launch(*args) -> None:
        hooks = runtime.launch_enter_hook, runtime.launch_exit_hook
        if not DIRECT_LAUNCH or hooks[0] is not enter or hooks[1] is not leave or enter.calls or leave.calls:
            runner(*args)
        elif layout == "arguments":  # no global or profile scratch, the kernel's metadata, no launch metadata or hooks
            c_launch(gx, gy, gz, stream(device()), function, cooperative, pdl, None, None, packed, None, None, None,
                     *args)
        else:  # the kernel's metadata, no launch metadata or hooks, no scratch, then the argument tuple
            c_launch(gx, gy, gz, stream(device()), function, cooperative, pdl, packed, None, None, None, None, None,
                     annotations, signature, args)

    return launch
