"""Held launches that call Triton's launcher themselves, skipping the Python around it.

A launch of a compiled Triton kernel (``compiled[grid](*args)``) runs, in Triton 3.5 to 3.9, a
Python runner that asks the active driver for the current device and stream, builds the launch's
metadata for the launch hooks (``HookChain`` objects, never None), and calls the launcher
(``CudaLauncher`` or AMD's ``HIPLauncher``), a Python object that allocates any scratch the
kernel needs (lowbit's need none) and then calls the C ``launch`` function with the hooks, which
call Python again (two empty ``HookChain`` calls).

:func:`direct_runner` returns a launch that passes None for the launch metadata and both hooks
(the C launcher then skips them) and the same everything else, in one of two ways:

- **the C function itself**, for a ``CudaLauncher`` whose C arguments it knows (:data:`LAYOUTS`:
  Triton 3.5 to 3.9) and a kernel without global or profile scratch or 3.8/3.9's sanitizer;
- **the launcher**, otherwise (AMD, or a kernel with scratch): the launcher's own ``__call__``
  then does its scratch and C call, with the arguments every version's runner passes it.

On a 2-core AMD EPYC, with the C function stubbed (``python bench/dispatch.py``), the Python of
one held launch took 2.8-3.4 µs through Triton's runner, 1.1-1.4 µs through the launcher and
0.5-0.8 µs through the C function; ``bench/dispatch.py --gpu`` times them with real launches.

While a launch hook is installed (a profiler's), or with :data:`DIRECT_LAUNCH` off, a launch takes
Triton's runner, so the hooks see every launch. ``tests/test_direct_launch.py`` compares the
arguments that reach the C function both ways, through the installed Triton's own code. Other
Triton versions keep Triton's runner (3.4's hooks are None by default, not chains).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

DIRECT_LAUNCH = os.environ.get("LOWBIT_DIRECT_LAUNCH", "1") not in ("", "0")
"""Whether a held launch that :func:`direct_runner` made skips Triton's runner (on unless
``LOWBIT_DIRECT_LAUNCH=0``; read at each launch, so a bench can compare both ways in one process)."""

LAYOUTS = {(3, 5): "arguments", (3, 6): "arguments", (3, 7): "tuple", (3, 8): "tuple", (3, 9): "tuple"}
"""The ``CudaLauncher``'s C ``launch`` arguments in each version: 3.5 and 3.6 take the scratch
buffers before the kernel's metadata and the kernel's arguments one by one; 3.7 to 3.9 take the
scratch buffers after the hooks, then the launcher's argument annotations and signature, and the
kernel's arguments as one tuple."""

VERSIONS = tuple(LAYOUTS)
"""Triton versions whose runner :func:`direct_runner` stands in for (those of :data:`LAYOUTS`): each
calls its launcher as ``launcher(gx, gy, gz, stream, function, kernel_metadata, launch_metadata,
enter_hook, exit_hook, *args)``, with hook chains."""


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def direct_runner(compiled, grid: tuple[int, int, int], runner: Callable) -> Callable | None:
    """A launch of ``compiled`` (a ``CompiledKernel`` whose handles are loaded) over ``grid``:
    ``launch(*every_argument)``, as ``runner`` (Triton's ``compiled[grid]``) launches it, without
    the runner; None where the installed Triton or launcher is not one this knows (see the
    module's docstring)."""
    version = triton_version()
    launcher = getattr(compiled, "run", None)  # (a stand-in for a compiled kernel may have none)
    kind = type(launcher).__name__
    if version not in VERSIONS or kind not in ("CudaLauncher", "HIPLauncher"):
        return None
    from triton import knobs  # (not in Triton before 3.4)
    from triton.runtime.driver import driver

    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not (hasattr(enter, "calls") and hasattr(leave, "calls")):
        return None
    layout = LAYOUTS.get(version) if kind == "CudaLauncher" else None
    if layout is not None and (launcher.global_scratch_size or launcher.profile_scratch_size
                               or getattr(launcher, "gsan_enabled", False)):
        layout = None  # the launcher allocates the scratch
    c_launch = launcher.launch if layout is not None else None
    device = driver.active.get_current_device
    if device is torch.cuda.current_device:  # the same value without its Python call, once CUDA is initialised
        device = torch._C._cuda_getDevice
    stream = driver.active.get_current_stream
    gx, gy, gz = grid
    # the function handle lives while ``compiled`` does (3.8 and 3.9 unload its module when it goes):
    # ``runner``, which this launch keeps, holds it
    function, packed = compiled.function, compiled.packed_metadata
    cooperative, pdl = launcher.launch_cooperative_grid, getattr(launcher, "launch_pdl", False)
    if layout == "tuple":
        annotations, signature = launcher.arg_annotations, launcher.kernel_signature

    def launch(*args) -> None:
        hooks = runtime.launch_enter_hook, runtime.launch_exit_hook
        if not DIRECT_LAUNCH or hooks[0] is not enter or hooks[1] is not leave or enter.calls or leave.calls:
            runner(*args)
        elif layout is None:  # the launcher, as the runner calls it, without launch metadata or hooks
            launcher(gx, gy, gz, stream(device()), function, packed, None, None, None, *args)
        elif layout == "arguments":  # no global or profile scratch, the kernel's metadata, no launch metadata or hooks
            c_launch(gx, gy, gz, stream(device()), function, cooperative, pdl, None, None, packed, None, None, None,
                     *args)
        else:  # the kernel's metadata, no launch metadata or hooks, no scratch, then the argument tuple
            c_launch(gx, gy, gz, stream(device()), function, cooperative, pdl, packed, None, None, None, None, None,
                     annotations, signature, args)

    return launch
