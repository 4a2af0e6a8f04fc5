"""Held launches through Triton's C launcher (``lowbit.kernels.direct_launch``): the same arguments
reach the C ``launch`` function as through Triton's own runner, but for the launch metadata and the
hooks; a launch hook, or the switch off, takes Triton's runner; launchers it was not written
against are left to Triton.

The compiled kernel here is the installed Triton's ``CompiledKernel`` and ``CudaLauncher`` code with
the handles stood in for and the C ``launch`` function replaced by a recorder, so this runs without
a GPU. The comparison with Triton's runner needs a Triton whose launcher :func:`direct_runner` calls
(3.5 to 3.9: CI's 3.9 and the GPU machine's 3.6 were both run); with another only the refusals are
checked. Real kernels go through it in the GPU tests of ``tests/test_launch_cache.py`` and
``tests/test_held_calls.py``."""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")
D = pytest.importorskip("lowbit.kernels.direct_launch")
C = pytest.importorskip("lowbit.kernels.triton_common")

KNOWN = D.triton_version() in D.VERSIONS
GRID = (64, 16, 1)
PACKED = (4, 1, 0)  # the kernel's metadata as the launcher takes it: warps, CTAs, shared memory
FUNCTION = 0x7F00


class _Driver:
    """The active driver's two calls a launch makes: device 0 and a stream of its own."""

    STREAM = 0x5A

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        assert device == 0
        return self.STREAM


def _compiled(monkeypatch, calls: list, global_scratch: int = 0, launcher_class: str = "CudaLauncher"):
    """A ``CompiledKernel`` whose launcher (the installed Triton's ``CudaLauncher.__call__``) records
    the C ``launch`` function's arguments in ``calls``, with the active driver stood in for."""
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    monkeypatch.setattr(driver, "_active", _Driver())
    launcher = type(launcher_class, (), {"__call__": CudaLauncher.__call__})()
    launcher.launch = lambda *args: calls.append(args)
    launcher.global_scratch_size, launcher.profile_scratch_size = global_scratch, 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.num_ctas, launcher.launch_cooperative_grid, launcher.launch_pdl = 1, False, True
    launcher.gsan_enabled = False  # 3.8, 3.9
    launcher.arg_annotations, launcher.kernel_signature = ("annotations",), b"signature"  # 3.7 to 3.9
    stand_in = type("StandInCompiledKernel", (CompiledKernel,), {"__del__": lambda self: None})  # unloads nothing
    compiled = object.__new__(stand_in)
    compiled.module, compiled.function, compiled.packed_metadata = object(), FUNCTION, PACKED  # handles loaded
    compiled._run = launcher
    compiled.name, compiled.metadata = "stand_in_kernel", None
    compiled.src = types.SimpleNamespace(fn=types.SimpleNamespace(launch_metadata=None, arg_names=()))
    return compiled


def _hooks_at(call: tuple) -> tuple:
    """Where the C function got the enter and exit hooks (the layout's positions)."""
    return call[11:13] if D.LAYOUTS[D.triton_version()] == "arguments" else call[9:11]


def _args() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, generator=gen), torch.randn(5, generator=gen), 4096, 11008, 0.5, True, 128)


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s launcher is not one direct_runner calls")
def test_direct_launch_passes_what_tritons_runner_passes(monkeypatch):
    """The C function gets the runner's grid, stream, function, flags, metadata and arguments (the
    very objects), and None for the launch metadata and both hooks, which hold nothing."""
    calls = []
    compiled = _compiled(monkeypatch, calls)
    runner = compiled[GRID]
    launch = D.direct_runner(compiled, GRID, runner)
    assert launch is not None
    args = _args()
    runner(*args)
    launch(*args)
    via_triton, direct = calls
    assert len(direct) == len(via_triton)
    if D.LAYOUTS[D.triton_version()] == "arguments":  # scratch, metadata, launch metadata, hooks, arguments
        head, metadata_at, args_at = (*GRID, _Driver.STREAM, FUNCTION, False, True, None, None, PACKED), 10, 13
        assert all(a is b for a, b in zip(via_triton[args_at:], direct[args_at:], strict=True))
        assert direct[args_at:] == args
    else:  # metadata, launch metadata, hooks, scratch, annotations, signature, the argument tuple
        head, metadata_at = (*GRID, _Driver.STREAM, FUNCTION, False, True, PACKED), 8
        assert direct[11:] == via_triton[11:] == (None, None, ("annotations",), b"signature", args)
        assert direct[-1] is via_triton[-1] or all(a is b for a, b in zip(direct[-1], via_triton[-1], strict=True))
    assert direct[:metadata_at] == via_triton[:metadata_at] == head
    assert direct[metadata_at:metadata_at + 3] == (None, None, None)  # launch metadata, enter and exit hooks
    hooks = _hooks_at(via_triton)  # what Triton passes: the hook chains, empty here
    assert not hooks[0].calls and not hooks[1].calls


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s launcher is not one direct_runner calls")
def test_a_launch_hook_or_the_switch_off_takes_tritons_runner(monkeypatch):
    from triton import knobs

    calls = []
    compiled = _compiled(monkeypatch, calls)
    launch = D.direct_runner(compiled, GRID, compiled[GRID])
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        launch(*_args())
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert _hooks_at(calls[-1])[0] is knobs.runtime.launch_enter_hook  # Triton's runner, which hands the hook on
    launch(*_args())
    assert _hooks_at(calls[-1]) == (None, None)  # hooks gone: direct again
    monkeypatch.setattr(D, "DIRECT_LAUNCH", False)
    launch(*_args())
    assert _hooks_at(calls[-1])[0] is knobs.runtime.launch_enter_hook


@pytest.mark.parametrize("case", ["older-version", "newer-version", "scratch", "sanitizer", "other-launcher"])
def test_launchers_it_was_not_written_for_are_left_to_triton(monkeypatch, case):
    """A Triton version whose launcher it does not know, a kernel with global scratch or the
    sanitizer's arguments, or a launcher that is not CUDA's ``CudaLauncher`` (AMD's
    ``HIPLauncher``): no direct launch, and the held launch is Triton's runner."""
    calls = []
    compiled = _compiled(monkeypatch, calls, global_scratch=256 if case == "scratch" else 0,
                         launcher_class="HIPLauncher" if case == "other-launcher" else "CudaLauncher")
    compiled.run.gsan_enabled = case == "sanitizer"
    version = {"older-version": (3, 4), "newer-version": (3, 10)}.get(case, D.VERSIONS[-1])
    monkeypatch.setattr(D, "triton_version", lambda: version)
    assert D.direct_runner(compiled, GRID, compiled[GRID]) is None
    monkeypatch.setattr(C, "direct_runner", D.direct_runner)
    assert C.held_runner(compiled, GRID).__qualname__.startswith("CompiledKernel.__getitem__")  # Triton's runner


@pytest.mark.skipif(not KNOWN, reason=f"Triton {triton.__version__}'s launcher is not one direct_runner calls")
def test_held_runner_takes_the_direct_launch(monkeypatch):
    calls = []
    compiled = _compiled(monkeypatch, calls)
    held = C.held_runner(compiled, GRID[:2])  # a 2-D grid, padded to 3
    assert held.__qualname__.startswith("direct_runner.")
    held(*_args())
    assert calls[-1][:4] == (*GRID, _Driver.STREAM) and _hooks_at(calls[-1]) == (None, None)
